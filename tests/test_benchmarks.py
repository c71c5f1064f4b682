"""benchmarks/memory_plan.py's arithmetic by hand, and benchmarks/gpu_check.py's skip on a machine without CUDA."""
import argparse
import os
import subprocess
import sys

import pytest

from scripts import ROOT, env

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import memory_plan as mp  # noqa: E402


def test_memory_plan_by_hand(tokenizer):
    from nanorlhf import world
    s = mp.shape(world.make_model(tokenizer).config)
    # the world's Llama: 76,096 parameters (tied embeddings once); a block: q 64x64 + k, v 64x32 each + o 64x64
    # + MLP 3 x 64x128 + 2 norms of 64 = 4096 + 2 x 2048 + 4096 + 24576 + 128 = 36,992; kv dim 2 heads x 16 = 32
    assert (s["params"], s["block"], s["kv"]) == (76096, 36992, 32)
    a = argparse.Namespace(method="rloo", nproc=2, fsdp=True, bf16=False, use_peft=False, lora_params=0,
                           gradient_checkpointing=False, sharded_generation=False, per_device_train_batch_size=8,
                           gradient_accumulation_steps=1, rows_per_step=16, local_rollout_forward_batch_size=64,
                           prompt_length=10, response_length=6, max_length=64, attn_scores=False)
    out = mp.plan(a, s)
    assert out == {
        "trained weights (float32)": 4 * 76096 / 2, "gradients (float32)": 4 * 76096 / 2,  # 152,192 bytes each
        "AdamW moments (float32)": 8 * 76096 / 2, "reference (frozen, float32)": 4 * 76096 / 2,
        "KV cache while sampling": 16 * 16 * 2 * 2 * 32 * 4,  # 16 rows x 16 tokens x 2 layers x (k, v) x 32 x 4 B
        "policy gathered for sampling (FSDP2)": 4 * 76096 - 4 * 76096 / 2,  # the whole policy, less its own shard
        "all-gathered blocks (FSDP2, 2 in flight)": 2 * 36992 * 4,
        # per token and layer 6 x 64 + 2 x 32 + 4 x 128 = 960 elements; 8 rows x 16 tokens x 960 x 4 B x 2 layers
        # = 983,040, plus the logits and their gradient: 2 x 8 rows x 6 completion tokens x 32 x 4 B = 12,288
        "activations and logits (training forward)": 983040 + 12288}
    a.gradient_checkpointing = True  # a block's input per layer (8 x 16 x 64 x 4 x 2 = 65,536) + one block
    assert mp.plan(a, s)["activations and logits (training forward)"] == 65536 + 491520 + 12288
    a.gradient_accumulation_steps = 2  # FSDP2 keeps unsharded gradients between micro-batches
    assert mp.plan(a, s)["gradients (float32)"] == 4 * 76096


def test_gpu_check_skips_without_cuda():
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the check itself runs there")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")], capture_output=True,
                       text=True, env=env(), timeout=120)
    assert r.returncode == 0 and "no CUDA device: skipped" in r.stdout and "save + --resume" in r.stdout


def test_gpu_check_random_model_of_a_preset_shape_trains(world_root, tmp_path, monkeypatch):
    """gpu_check.py's "scale" part on CPU at a tiny shape: the random-initialized folder of a memory_plan preset
    (the tokenizer's vocabulary, bf16 on disk) loads and trains one RLOO step under the script."""
    import gpu_check
    import torch
    from transformers import AutoModelForCausalLM
    monkeypatch.setitem(mp.PRESETS, "tiny", (64, 128, 2, 4, 2, 151936, True))
    folder = tmp_path / "tiny"
    cfg = gpu_check.random_model("tiny", (os.path.join(world_root, "policy"), None), str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert cfg.vocab_size == model.config.vocab_size < 151936  # the world tokenizer's, not Qwen's
    assert next(model.parameters()).dtype == torch.bfloat16 and mp.shape(cfg)["layers"] == 2
    from scripts import metrics, run
    run("train_rloo.py", "--model_name_or_path", folder, "--dataset_name", os.path.join(world_root, "prompts"),
        "--reward_fn", "nanorlhf.world:gold_reward", "--per_device_train_batch_size", 4, "--rloo_k", 2,
        "--total_episodes", 4, "--response_length", 8, "--num_eval_prompts", 0, "--num_sample_generations", 0,
        "--save_steps", 0, "--output_dir", tmp_path / "out")
    assert [r["step"] for r in metrics(tmp_path / "out") if "objective/kl" in r] == [1]

"""What real Hugging Face checkpoints need: bf16 weights trained in float32, TRL's AdamW defaults, and
--resume refusing a run it would continue differently (another global batch, another flag)."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from scripts import checkpoint_state, run

LR = 5e-7  # tiny: in bf16 most such updates round away (measured 421 of 76,096 weights would change)


@pytest.fixture(scope="module")
def bf16_policy(world_root, tmp_path_factory):
    """The world's policy saved in bfloat16, as hub checkpoints are."""
    out = tmp_path_factory.mktemp("bf16") / "policy"
    model = AutoModelForCausalLM.from_pretrained(os.path.join(world_root, "policy"))
    model.to(torch.bfloat16).save_pretrained(out)
    for name in os.listdir(os.path.join(world_root, "policy")):
        if "token" in name or name.endswith(".jinja"):
            with open(os.path.join(world_root, "policy", name), "rb") as src, open(out / name, "wb") as dst:
                dst.write(src.read())
    assert json.load(open(out / "config.json"))["dtype"] == "bfloat16"
    return out


def _first_checkpoint(out):
    name = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))[0]
    return checkpoint_state(os.path.join(out, name))


@pytest.fixture(scope="module")
def rloo_run(world_root, bf16_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("rloo") / "out"
    run("train_rloo.py", "--model_name_or_path", bf16_policy, "--dataset_name", os.path.join(world_root, "prompts"),
        "--reward_fn", "nanorlhf.world:gold_reward", "--learning_rate", LR, "--per_device_train_batch_size", 8,
        "--total_episodes", 16, "--response_length", 8, "--num_ppo_epochs", 1, "--num_eval_prompts", 8,
        "--num_sample_generations", 0, "--save_steps", 1, "--output_dir", out)
    return out


def test_a_bf16_checkpoint_trains_every_weight_in_float32(bf16_policy, rloo_run):
    """AdamW's first step moves a weight by lr * g / (|g| + eps): about lr (5e-7) wherever |g| >> eps (1e-8).
    Kept in float32 essentially every weight moves; kept in bf16 (an ulp of 4.9e-4 at 0.1) about 1% would.
    "Essentially": the world's <unk> token is never an input and never sampled, so its tied row's gradient is
    only what its ~1e-7 probability gives (measured -6.6e-11 at one element), the step lr * 6.6e-11 / 1.0e-8 =
    3.3e-9 is under half a float32 ulp of that element's 0.123 (3.7e-9), and the element keeps its value."""
    before = AutoModelForCausalLM.from_pretrained(bf16_policy).state_dict()  # bfloat16, as saved
    after = _first_checkpoint(rloo_run)["model"]  # after one AdamW step at lr 5e-7
    assert all(v.dtype == torch.float32 for v in after.values())
    unique = {v.data_ptr(): (k, v) for k, v in after.items()}.values()  # tied embeddings counted once
    total = sum(v.numel() for _, v in unique)
    changed = sum(int((v != before[k].float()).sum()) for k, v in unique)
    changed_bf16 = sum(int((v.to(torch.bfloat16) != before[k]).sum()) for k, v in unique)
    assert changed >= 0.999 * total, f"only {changed} of {total} weights changed in float32"
    assert changed_bf16 <= 0.05 * total, f"{changed_bf16} of {total} would change in bf16: the step is too large"


def test_adamw_defaults_are_trls(rloo_run):
    group = _first_checkpoint(rloo_run)["optimizer"]["param_groups"][0]
    assert group["eps"] == 1e-8 and group["weight_decay"] == 0.0 and group["betas"] == (0.9, 0.999)


def test_reward_model_defaults_are_trls(world_root, bf16_policy, tmp_path):
    out = tmp_path / "rm"
    run("train_reward.py", "--model_name_or_path", bf16_policy, "--dataset_name",
        os.path.join(world_root, "preferences"), "--max_steps", 2, "--save_steps", 1, "--learning_rate", LR,
        "--per_device_train_batch_size", 4, "--adam_epsilon", 1e-6, "--weight_decay", 0.1, "--output_dir", out)
    saved = json.load(open(out / "args.json"))
    assert saved["gradient_checkpointing"] is True and saved["world_size"] == 1  # TRL's RewardConfig default
    state = _first_checkpoint(out)
    group = state["optimizer"]["param_groups"][0]
    assert group["eps"] == 1e-6 and group["weight_decay"] == 0.1  # the flags reach the optimizer
    before = AutoModelForCausalLM.from_pretrained(bf16_policy, dtype=torch.float32).state_dict()
    body = {k: v for k, v in state["model"].items() if k in before}
    assert body and all(v.dtype == torch.float32 and not torch.equal(v, before[k]) for k, v in body.items())


def test_resume_with_another_global_batch_or_flags_is_refused_before_any_collective(world_root, bf16_policy,
                                                                                      rloo_run):
    common = ["--model_name_or_path", bf16_policy, "--dataset_name", os.path.join(world_root, "prompts"),
              "--reward_fn", "nanorlhf.world:gold_reward", "--learning_rate", LR, "--total_episodes", 16,
              "--response_length", 8, "--num_ppo_epochs", 1, "--num_eval_prompts", 8, "--num_sample_generations", 0,
              "--save_steps", 1, "--output_dir", rloo_run, "--resume"]
    # 2 processes may resume a 1-process run (the checkpoint reshards) only with the same global batch: 8 x 1 x 1
    r = run("train_rloo.py", *common, "--per_device_train_batch_size", 8, procs=2, check=False, timeout=180)
    assert r.returncode != 0 and ("global batch (per_device_train_batch_size x gradient_accumulation_steps x "
                                  "processes): saved 8 x 1 x 1 = 8, given 8 x 1 x 2 = 16") in r.stdout + r.stderr
    r = run("train_rloo.py", *common, "--per_device_train_batch_size", 8, "--max_prompt_length", 100,
            "--missing_eos_penalty", 1.0, check=False)
    err = r.stdout + r.stderr
    assert r.returncode != 0 and "--max_prompt_length: saved 512, given 100" in err
    assert "--missing_eos_penalty: saved None, given 1.0" in err

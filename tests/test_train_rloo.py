"""train_rloo.py end to end: 1 process, DDP, FSDP2, 1 vs 2 processes, resume, pipeline, bad inputs."""
import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from scripts import fails, kill_after, metrics, run, weights

SCRIPT = "train_rloo.py"
# 4 prompts x k=2 = 8 completions per step, 8 new tokens at most, 16 eval prompts
FAST = ["--per_device_train_batch_size", 8, "--total_episodes", 16, "--response_length", 8, "--num_eval_prompts", 16,
        "--num_sample_generations", 0]


def _check(out, world_root, steps):
    recs = metrics(out)
    train = [r for r in recs if "objective/kl" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(math.isfinite(v) for r in train for v in r.values())
    assert all(r["objective/entropy"] > 0 and r["policy/entropy_avg"] > 0 for r in train)
    evals = [r for r in recs if "eval/gold_reward" in r]
    assert [r["step"] for r in evals] == [0, steps]
    AutoModelForCausalLM.from_pretrained(out)
    before, after = weights(os.path.join(world_root, "policy")), weights(out)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[key], after[key])
    return train


# DDP also runs in test_one_and_two_processes_train_the_same; this variant is `slow`
@pytest.mark.parametrize("procs, extra", [(1, []), pytest.param(2, [], marks=pytest.mark.slow), (2, ["--fsdp"])],
                         ids=["1proc", "ddp", "fsdp"])
def test_two_steps(world_root, tmp_path, procs, extra):
    # 8 completions per step in 2 mini-batches: 4 x 1 process or 2 x 2 processes
    run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--num_ppo_epochs", 2, "--num_mini_batches", 2,
        "--per_device_train_batch_size", 8 // 2 // procs, *extra, procs=procs)
    _check(str(tmp_path / "out"), world_root, 2)


def test_one_epoch_one_mini_batch_is_reinforce(world_root, tmp_path):
    # the first (and only) update sees the sampling policy itself: ratio exactly 1, nothing clipped,
    # and the loss mean(-A) is 0 because leave-one-out advantages sum to 0 per prompt
    run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--total_episodes", 8, "--num_ppo_epochs", 1,
        "--num_mini_batches", 1)
    (r,) = [r for r in metrics(tmp_path / "out") if "val/ratio" in r]
    assert r["val/ratio"] == 1.0 and r["val/ratio_var"] == 0.0 and r["policy/clipfrac_avg"] == 0.0
    assert abs(r["loss/policy_avg"]) < 1e-7


def test_ratio_metrics_and_lr_are_trls(world_root, tmp_path):
    # 2 PPO epochs of one micro-batch each: TRL's val/ratio is the mean of the micro-batches' token-ratio
    # means [1 (first epoch: the sampling policy itself), m], val/ratio_var their variance (ddof 1), so
    # var = 2 (1 - val/ratio)^2; lr is the step's rate (TRL: the schedule moves once per step): the first of 1
    run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--total_episodes", 8, "--num_ppo_epochs", 2)
    (r,) = [r for r in metrics(tmp_path / "out") if "val/ratio" in r]
    assert r["val/ratio"] != 1.0
    assert r["val/ratio_var"] == pytest.approx(2 * (1 - r["val/ratio"]) ** 2, rel=1e-4)
    assert r["lr"] == pytest.approx(3e-4)


def test_lr_schedule_is_trls_over_steps(world_root, tmp_path):
    # TRL: the scheduler runs over steps (rollout batches), with ceil(warmup_ratio x steps) warmup steps, and moves
    # once per step. 3 steps, warmup_ratio 0.4 -> ceil(1.2) = 2 warmup steps; linear: step 1: 0/2 -> 0,
    # step 2: 1/2 -> 5e-5, step 3: (3 - 2)/(3 - 2) -> 1e-4 (int(1.2) = 1 would give 0, 1e-4, 5e-5)
    run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--total_episodes", 24, "--num_ppo_epochs", 2,
        "--num_mini_batches", 2, "--per_device_train_batch_size", 4, "--learning_rate", 1e-4, "--warmup_ratio", 0.4)
    train = [r for r in metrics(tmp_path / "out") if "val/ratio" in r]
    assert [r["lr"] for r in train] == pytest.approx([0.0, 5e-5, 1e-4])
    assert [r["episode"] for r in train] == [8, 16, 24]  # RLOO: 4 x 1 accumulation x 2 mini-batches per step
    # the rate is the same for all 4 updates of a step: at rate 0 none of them moves the policy (ratio 1 in all)
    assert train[0]["val/ratio"] == 1.0 and train[0]["val/ratio_var"] == 0.0 and train[1]["val/ratio"] != 1.0


def test_one_and_two_processes_train_the_same(world_root, tmp_path):
    common = [*FAST, "--num_ppo_epochs", 2, "--normalize_advantage"]
    run(SCRIPT, "--output_dir", tmp_path / "one", *common)
    run(SCRIPT, "--output_dir", tmp_path / "two", *common, "--per_device_train_batch_size", 4, procs=2)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert m1[-1]["eval/gold_reward"] == pytest.approx(m2[-1]["eval/gold_reward"], abs=1e-6)


def test_kill_and_resume_reproduces_the_uninterrupted_run(world_root, tmp_path):
    common = [*FAST, "--total_episodes", 240, "--save_steps", 3, "--eval_steps", 10]
    run(SCRIPT, "--output_dir", tmp_path / "full", *common)
    kill_after(SCRIPT, *common, output_dir=tmp_path / "cut", checkpoint="checkpoint-00000006")
    r = run(SCRIPT, "--output_dir", tmp_path / "cut", "--resume", *common)
    assert "resumed from" in r.stdout
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda recs: [{k: v for k, v in r.items() if k != "eps"} for r in recs]  # noqa: E731 (speed varies)
    assert drop(metrics(tmp_path / "full")) == drop(metrics(tmp_path / "cut"))


def test_pipeline_with_a_trained_reward_model(world_root, tmp_path):
    run("train_reward.py", "--output_dir", tmp_path / "rm", "--max_steps", 2, "--per_device_train_batch_size", 4)
    run(SCRIPT, "--output_dir", tmp_path / "out", "--reward_model_path", tmp_path / "rm", *FAST)
    evals = [r for r in metrics(tmp_path / "out") if "eval/reward" in r]
    assert "eval/gold_reward" in evals[-1] and evals[-1]["eval/reward"] != evals[-1]["eval/gold_reward"]


def _fails(*args, pythonpath=()):
    return fails(SCRIPT, *args, pythonpath=pythonpath)


def test_bad_inputs(world_root, tmp_path):
    out = lambda name: ["--output_dir", tmp_path / name]  # noqa: E731 (a failed run may leave args.json)
    gold = ["--reward_fn", "nanorlhf.world:gold_reward"]
    assert "--rloo_k must be >= 2" in _fails(*out("a"), "--rloo_k", 1)
    assert "must be divisible by rloo_k = 3" in _fails(*out("b"), *FAST, "--rloo_k", 3)
    assert "unknown argument(s) --kl" in _fails(*out("c"), "--kl", 0.1)
    (tmp_path / "rewards.py").write_text(
        "def short(prompts, completions):\n    return [0.0]\n"
        "def nan(prompts, completions):\n    return [float('nan')] * len(completions)\n")
    err = _fails(*out("d"), *FAST, "--reward_fn", "rewards:short", pythonpath=[tmp_path])
    assert "--reward_fn rewards:short: short returned 1 values for 16 completions" in err
    err = _fails(*out("e"), *FAST, "--reward_fn", "rewards:nan", pythonpath=[tmp_path])
    assert "nan returned nan for sample 0" in err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "happy " * 600}) + "\n")
    err = _fails(*out("f"), "--dataset_name", prompts, *gold, "--max_prompt_length", 64)
    assert "1 dropped > max_prompt_length 64" in err and "no prompts left" in err
    assert "pass --reward_model_path or --reward_fn" in _fails(*out("g"), "--dataset_name", prompts)
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty.jsonl: empty file" in _fails(*out("h"), "--dataset_name", tmp_path / "empty.jsonl", *gold)
    from transformers import LlamaConfig, LlamaForSequenceClassification
    LlamaForSequenceClassification(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               num_labels=2)).save_pretrained(tmp_path / "two")
    assert "num_labels=2; a reward model has 1" in _fails(*out("i"), *FAST, "--reward_model_path", tmp_path / "two")
    run(SCRIPT, *out("j"), *FAST, "--save_steps", 1)
    assert "one with other flags" in _fails(*out("j"), *FAST, "--save_steps", 1, "--kl_coef", 0.2)
    ckpt = sorted(p for p in os.listdir(tmp_path / "j") if p.startswith("checkpoint-"))[-1]
    (tmp_path / "j" / ckpt / "__0_0.distcp").write_bytes(b"garbage")
    assert "cannot load checkpoint" in _fails(*out("j"), *FAST, "--save_steps", 1, "--resume")

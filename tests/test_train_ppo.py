"""train_ppo.py end to end: 1 process, DDP, FSDP2, 1 vs 2 processes, resume, pipeline, bad inputs."""
import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from scripts import fails, kill_after, metrics, run, weights

SCRIPT = "train_ppo.py"
# 8 prompts (one completion each) per step, 8 new tokens at most, 16 eval prompts
FAST = ["--per_device_train_batch_size", 8, "--total_episodes", 16, "--response_length", 8, "--num_eval_prompts", 16,
        "--num_sample_generations", 0]
KEY = "model.layers.0.self_attn.q_proj.weight"


def both(out):
    """Saved policy and value model tensors, by name (the value model's prefixed 'value.')."""
    return {**weights(out), **{f"value.{k}": v for k, v in weights(os.path.join(out, "value_model")).items()}}


def _check(out, world_root, steps):
    recs = metrics(out)
    train = [r for r in recs if "objective/kl" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(math.isfinite(v) for r in train for v in r.values())
    assert all(r["objective/entropy"] > 0 and r["policy/entropy_avg"] > 0 and r["loss/value_avg"] > 0 for r in train)
    evals = [r for r in recs if "eval/gold_reward" in r]
    assert [r["step"] for r in evals] == [0, steps]
    AutoModelForCausalLM.from_pretrained(out)
    assert AutoModelForSequenceClassification.from_pretrained(os.path.join(out, "value_model")).config.num_labels == 1
    # both trained: the value model started as the policy's backbone (plus a fresh head)
    start, after = weights(os.path.join(world_root, "policy")), both(out)
    assert not torch.equal(start[KEY], after[KEY]) and not torch.equal(start[KEY], after["value." + KEY])
    return train


# DDP also runs in test_one_and_two_processes_train_the_same; this variant is `slow`
@pytest.mark.parametrize("procs, extra", [(1, []), pytest.param(2, [], marks=pytest.mark.slow), (2, ["--fsdp"])],
                         ids=["1proc", "ddp", "fsdp"])
def test_two_steps(world_root, tmp_path, procs, extra):
    # 8 completions per step (TRL's PPO: per_device x accumulation x processes) in 2 mini-batches of one
    # micro-batch each: 4 x 2 x 1 process or 2 x 2 x 2 processes
    run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--num_ppo_epochs", 2, "--num_mini_batches", 2,
        "--per_device_train_batch_size", 4 // procs, "--gradient_accumulation_steps", 2, *extra, procs=procs)
    train = _check(str(tmp_path / "out"), world_root, 2)
    assert all(r["val/ratio"] != 1.0 for r in train)  # later updates see a changed policy


def test_batch_and_lr_schedule_are_trls(world_root, tmp_path):
    # TRL v0.21 PPO: a step holds per_device x accumulation completions per process (4 x 2 = 8), split into
    # num_mini_batches updates (2 of 4); the scheduler runs over the 3 steps with ceil(0.4 x 3) = 2 warmup steps and
    # moves once per step: linear rates 0/2 -> 0, 1/2 -> 5e-5, (3 - 2)/(3 - 2) -> 1e-4 (int(1.2) = 1: 0, 1e-4, 5e-5)
    run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--total_episodes", 24, "--num_ppo_epochs", 2,
        "--num_mini_batches", 2, "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2,
        "--learning_rate", 1e-4, "--warmup_ratio", 0.4)
    train = [r for r in metrics(tmp_path / "out") if "val/ratio" in r]
    assert [r["episode"] for r in train] == [8, 16, 24] and [r["lr"] for r in train] == pytest.approx([0, 5e-5, 1e-4])
    # one rate for all 4 updates of a step: at rate 0 none moves policy or value model (ratio 1, value clip idle)
    assert train[0]["val/ratio"] == 1.0 and train[0]["val/ratio_var"] == 0.0 and train[0]["val/clipfrac_avg"] == 0.0
    assert train[1]["val/ratio"] != 1.0
    err = _fails("--output_dir", tmp_path / "bad", *FAST, "--num_mini_batches", 2)
    assert "--num_mini_batches 2 must divide --gradient_accumulation_steps 1" in err


def test_first_update_has_ratio_one(world_root, tmp_path):
    # one epoch, one mini-batch: the update's own forwards are the old policy and the old values, so the token
    # ratio is exactly 1, nothing is clipped, and the value clip is idle (V = V_old)
    run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--total_episodes", 8, "--num_ppo_epochs", 1)
    (r,) = [r for r in metrics(tmp_path / "out") if "val/ratio" in r]
    assert r["val/ratio"] == 1.0 and r["val/ratio_var"] == 0.0 and r["policy/clipfrac_avg"] == 0.0
    assert r["policy/approxkl_avg"] == 0.0 and r["val/clipfrac_avg"] == 0.0
    # whitened advantages have mean 0 over the tokens, and at ratio 1 the loss is their mean: 0
    assert abs(r["loss/policy_avg"]) < 1e-6


def test_one_and_two_processes_train_the_same(world_root, tmp_path):
    # one process accumulating 2 micro-batches of 4 vs two processes of 4: the loss is a mean over the tokens of the
    # whole mini-batch, whitening uses all ranks' statistics, so policy and value model end the same
    common = [*FAST, "--num_ppo_epochs", 2, "--per_device_train_batch_size", 4, "--whiten_rewards"]
    run(SCRIPT, "--output_dir", tmp_path / "one", *common, "--gradient_accumulation_steps", 2)
    run(SCRIPT, "--output_dir", tmp_path / "two", *common, procs=2)
    a, b = both(tmp_path / "one"), both(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert m1[-1]["eval/gold_reward"] == pytest.approx(m2[-1]["eval/gold_reward"], abs=1e-6)


def test_kill_and_resume_reproduces_the_uninterrupted_run(world_root, tmp_path):
    common = [*FAST, "--total_episodes", 240, "--save_steps", 3, "--eval_steps", 10, "--num_ppo_epochs", 2]
    run(SCRIPT, "--output_dir", tmp_path / "full", *common)
    kill_after(SCRIPT, *common, output_dir=tmp_path / "cut", checkpoint="checkpoint-00000006")
    r = run(SCRIPT, "--output_dir", tmp_path / "cut", "--resume", *common)
    assert "resumed from" in r.stdout
    a, b = both(tmp_path / "full"), both(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda recs: [{k: v for k, v in r.items() if k != "eps"} for r in recs]  # noqa: E731 (speed varies)
    assert drop(metrics(tmp_path / "full")) == drop(metrics(tmp_path / "cut"))


def test_pipeline_with_a_trained_reward_model(world_root, tmp_path):
    # the seed repository's pipeline: the value model starts from the reward model (TRL's example)
    run("train_reward.py", "--output_dir", tmp_path / "rm", "--max_steps", 2, "--per_device_train_batch_size", 4)
    r = run(SCRIPT, "--output_dir", tmp_path / "out", "--reward_model_path", tmp_path / "rm", *FAST,
            "--kl_estimator", "k3")
    assert f"value model: from {tmp_path / 'rm'}" in r.stdout
    evals = [r for r in metrics(tmp_path / "out") if "eval/reward" in r]
    assert "eval/gold_reward" in evals[-1] and evals[-1]["eval/reward"] != evals[-1]["eval/gold_reward"]
    assert all(r["objective/kl"] >= 0 for r in metrics(tmp_path / "out") if "objective/kl" in r)  # k3 >= 0
    # a saved value model goes back in with --value_model_path
    r = run(SCRIPT, "--output_dir", tmp_path / "again", "--value_model_path", tmp_path / "out" / "value_model", *FAST)
    assert f"value model: from {tmp_path / 'out' / 'value_model'}" in r.stdout


def _fails(*args, pythonpath=()):
    return fails(SCRIPT, *args, pythonpath=pythonpath)


def test_bad_inputs(world_root, tmp_path):
    out = lambda name: ["--output_dir", tmp_path / name]  # noqa: E731 (a failed run may leave args.json)
    gold = ["--reward_fn", "nanorlhf.world:gold_reward"]
    assert "--gamma 1.5: must be in [0, 1]" in _fails(*out("a"), "--gamma", 1.5)
    assert "--lam -0.1: must be in [0, 1]" in _fails(*out("a"), "--lam", -0.1)
    assert "--vf_coef -1.0: must be >= 0" in _fails(*out("a"), "--vf_coef", -1)
    assert "--kl_estimator must be k1 or k3, got 'k2'" in _fails(*out("a"), "--kl_estimator", "k2")
    assert "unknown argument(s) --kl" in _fails(*out("c"), "--kl", 0.1)
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification
    cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForSequenceClassification(LlamaConfig(vocab_size=32, num_labels=2, **cfg)).save_pretrained(tmp_path / "two")
    assert "num_labels=2; a value model has 1" in _fails(*out("v"), *FAST, "--value_model_path", tmp_path / "two")
    LlamaForSequenceClassification(LlamaConfig(vocab_size=99, num_labels=1, **cfg)).save_pretrained(tmp_path / "v99")
    err = _fails(*out("v"), *FAST, "--value_model_path", tmp_path / "v99")
    assert "must be a decoder sequence classifier (a per-token .score head) on the policy's vocabulary" in err
    BertForSequenceClassification(BertConfig(vocab_size=32, num_labels=1, **cfg)).save_pretrained(tmp_path / "bert")
    assert "a per-token .score head" in _fails(*out("v"), *FAST, "--value_model_path", tmp_path / "bert")
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
    assert "num_labels=2; a reward model has 1" in _fails(*out("i"), *FAST, "--reward_model_path", tmp_path / "two")
    run(SCRIPT, *out("j"), *FAST, "--save_steps", 1)
    assert "one with other flags" in _fails(*out("j"), *FAST, "--save_steps", 1, "--vf_coef", 0.2)
    ckpt = sorted(p for p in os.listdir(tmp_path / "j") if p.startswith("checkpoint-"))[-1]
    (tmp_path / "j" / ckpt / "__0_0.distcp").write_bytes(b"garbage")
    assert "cannot load checkpoint" in _fails(*out("j"), *FAST, "--save_steps", 1, "--resume")


def test_fsdp_ranks_with_and_without_a_repeated_prompt(world_root, tmp_path):
    # one completion per prompt: a rank may hold a prompt twice (its rows share a prompt forward) while the other
    # holds none twice; under FSDP2 both must still run the same number of forwards (they once ran 2 and 1: hang)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(42)).tolist()  # the script's epoch order
    texts = ["happy cat rain", "gloomy box", "happy road hill", "gloomy tree", "happy cup", "gloomy hill road",
             "happy box tree", "gloomy cat"]
    texts[order[1]] = texts[order[0]]  # rank 0's first two rows: the same prompt; rank 1's four: all different
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": [{"role": "user", "content": t}]}) + "\n"
                                              for t in texts))
    run(SCRIPT, "--output_dir", tmp_path / "out", "--dataset_name", tmp_path / "p.jsonl", "--reward_fn",
        "nanorlhf.world:gold_reward", "--model_name_or_path", os.path.join(world_root, "policy"),
        "--per_device_train_batch_size", 4, "--total_episodes", 8, "--response_length", 8, "--num_ppo_epochs", 2,
        "--fsdp", procs=2, timeout=120)
    assert [r["step"] for r in metrics(tmp_path / "out") if "loss/value_avg" in r] == [1]

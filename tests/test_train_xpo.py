"""train_xpo.py end to end: 1 process, DDP, FSDP2, online DPO mode, ipo, 1 vs 2 processes, resume, bad inputs."""
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from scripts import fails, kill_after, metrics, run, weights

SCRIPT = "train_xpo.py"
# 4 prompts per micro-batch, 8 new tokens at most, 16 eval prompts
FAST = ["--per_device_train_batch_size", 4, "--max_steps", 2, "--max_new_tokens", 8, "--num_eval_prompts", 16,
        "--num_sample_generations", 0]


def _check(out, world_root, steps):
    recs = metrics(out)
    train = [r for r in recs if "loss/dpo" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(math.isfinite(v) for r in train for v in r.values())
    assert all(r["objective/entropy"] > 0 and r["logps/chosen"] < 0 for r in train)
    assert [r["step"] for r in recs if "eval/gold_reward" in r] == [0, steps]
    AutoModelForCausalLM.from_pretrained(out)
    before, after = weights(os.path.join(world_root, "policy")), weights(out)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[key], after[key])
    return train


# DDP also runs in test_one_vs_two_processes, and ipo's loss is checked by hand in test_losses: both `slow`
@pytest.mark.parametrize("procs, extra", [(1, []), pytest.param(2, [], marks=pytest.mark.slow), (2, ["--fsdp"]),
                                          pytest.param(1, ["--loss_type", "ipo"], marks=pytest.mark.slow)],
                         ids=["1proc", "ddp", "fsdp", "ipo"])
def test_two_steps(world_root, tmp_path, procs, extra):
    run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--per_device_train_batch_size", 4 // procs,
        "--gradient_accumulation_steps", 2 // procs, *extra, procs=procs)
    train = _check(str(tmp_path / "out"), world_root, 2)
    assert train[0]["alpha"] == 1e-5 and train[0]["loss/xpo"] < 0  # alpha * S(l(y~)), log-probs < 0
    # TRL's objective/kl averages S(l - lref) over both samples, and rewards/chosen + rewards/rejected is
    # beta times the sum of the two samples' log-ratios
    for r in train:
        assert r["rewards/chosen"] + r["rewards/rejected"] == pytest.approx(2 * r["beta"] * r["objective/kl"], abs=1e-6)


def test_online_dpo_mode_trains(world_root, tmp_path):
    run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--second_sample", "policy", "--alpha", "0.0")
    train = _check(str(tmp_path / "out"), world_root, 2)
    for r in train:  # OnlineDPOTrainer's names and definitions; none of XPO's own
        assert not {"loss/xpo", "alpha", "objective/model_scores", "val/model_contain_eos_token"} & set(r)
        assert r["objective/scores_margin"] >= 0 and 0 <= r["val/contain_eos_token"] <= 1
        assert r["objective/non_score_reward"] == pytest.approx(-r["beta"] * r["objective/kl"], abs=1e-6)
        assert r["objective/rlhf_reward"] == pytest.approx(r["objective/scores"] + r["objective/non_score_reward"],
                                                           abs=1e-6)


def test_one_vs_two_processes(world_root, tmp_path):
    common = [*FAST, "--max_steps", 3, "--beta", "0.1:0.05"]
    run(SCRIPT, "--output_dir", tmp_path / "one", *common)
    run(SCRIPT, "--output_dir", tmp_path / "two", *common, "--per_device_train_batch_size", 2, procs=2)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert [r["beta"] for r in metrics(tmp_path / "one") if "beta" in r] == pytest.approx([0.1, 0.1 - 0.05 / 3,
                                                                                           0.1 - 0.1 / 3])


def test_kill_and_resume_reproduces_the_uninterrupted_run(world_root, tmp_path):
    common = [*FAST, "--max_steps", 30, "--save_steps", 3, "--eval_steps", 10]
    run(SCRIPT, "--output_dir", tmp_path / "full", *common)
    kill_after(SCRIPT, *common, output_dir=tmp_path / "cut", checkpoint="checkpoint-00000006")
    assert "resumed from" in run(SCRIPT, "--output_dir", tmp_path / "cut", "--resume", *common).stdout
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda recs: [{k: v for k, v in r.items() if k != "eps"} for r in recs]  # noqa: E731 (speed varies)
    assert drop(metrics(tmp_path / "full")) == drop(metrics(tmp_path / "cut"))


def test_bad_inputs(world_root, tmp_path):
    out = lambda name: ["--output_dir", tmp_path / name]  # noqa: E731 (a failed run may leave args.json)
    assert "--alpha -1: values must be in [0.0, inf]" in fails(SCRIPT, *out("a"), "--alpha", -1)
    assert "--loss_type 'hinge': use sigmoid or ipo" in fails(SCRIPT, *out("b"), "--loss_type", "hinge")
    assert "online DPO: pass --alpha 0" in fails(SCRIPT, *out("c"), "--second_sample", "policy")
    assert "--second_sample 'judge'" in fails(SCRIPT, *out("d"), "--second_sample", "judge")
    (tmp_path / "xpo_rewards.py").write_text("def inf(prompts, completions):\n    return [float('inf')] * "
                                             "len(completions)\n")
    err = fails(SCRIPT, *out("e"), *FAST, "--reward_fn", "xpo_rewards:inf", pythonpath=[tmp_path])
    assert "--reward_fn xpo_rewards:inf: inf returned inf for sample 0" in err
    assert "unknown argument(s) --judge" in fails(SCRIPT, *out("f"), "--judge", "x")

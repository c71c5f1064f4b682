"""train_nash_md.py end to end: 1 process, DDP, FSDP2, 1 vs 2 processes, resume, preference functions, bad inputs."""
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from scripts import fails, kill_after, metrics, run, weights

SCRIPT = "train_nash_md.py"
# 4 prompts per micro-batch, 8 new tokens at most, 16 eval prompts
FAST = ["--per_device_train_batch_size", 4, "--max_steps", 2, "--max_new_tokens", 8, "--num_eval_prompts", 16,
        "--num_sample_generations", 0]


def _check(out, world_root, steps):
    recs = metrics(out)
    train = [r for r in recs if "loss/kl" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(math.isfinite(v) for r in train for v in r.values())
    assert all(r["objective/entropy"] > 0 and 0 <= r["rewards/probabilities"] <= 1 for r in train)
    # TRL's definitions: logps/rejected is the reference's S(lref(y)), rewards/margins = S(l(y)) - S(lref(y))
    assert all(r["logps/chosen"] - r["logps/rejected"] == pytest.approx(r["rewards/margins"], abs=1e-5) for r in train)
    assert [r["step"] for r in recs if "eval/gold_reward" in r] == [0, steps]
    AutoModelForCausalLM.from_pretrained(out)
    before, after = weights(os.path.join(world_root, "policy")), weights(out)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[key], after[key])
    return train


# DDP also runs in test_schedules_and_one_vs_two_processes; this variant is `slow`
@pytest.mark.parametrize("procs, extra", [(1, []), pytest.param(2, [], marks=pytest.mark.slow), (2, ["--fsdp"])],
                         ids=["1proc", "ddp", "fsdp"])
def test_two_steps(world_root, tmp_path, procs, extra):
    run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--per_device_train_batch_size", 4 // procs,
        "--gradient_accumulation_steps", 2 // procs, *extra, procs=procs)
    _check(str(tmp_path / "out"), world_root, 2)


def test_schedules_and_one_vs_two_processes(world_root, tmp_path):
    # beta and mixture_coef follow their 'start:end' schedules; 1 and 2 processes end with the same weights
    common = [*FAST, "--beta", "0.2:0.0", "--mixture_coef", "0.5:1.0", "--max_steps", 4]
    run(SCRIPT, "--output_dir", tmp_path / "one", *common)
    run(SCRIPT, "--output_dir", tmp_path / "two", *common, "--per_device_train_batch_size", 2, procs=2)
    train = [r for r in metrics(tmp_path / "one") if "beta" in r]
    assert [r["beta"] for r in train] == pytest.approx([0.2, 0.15, 0.1, 0.05])
    assert [r["mixture_coef"] for r in train] == pytest.approx([0.5, 0.625, 0.75, 0.875])
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_kill_and_resume_reproduces_the_uninterrupted_run(world_root, tmp_path):
    common = [*FAST, "--max_steps", 30, "--save_steps", 3, "--eval_steps", 10]
    run(SCRIPT, "--output_dir", tmp_path / "full", *common)
    kill_after(SCRIPT, *common, output_dir=tmp_path / "cut", checkpoint="checkpoint-00000006")
    assert "resumed from" in run(SCRIPT, "--output_dir", tmp_path / "cut", "--resume", *common).stdout
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda recs: [{k: v for k, v in r.items() if k != "eps"} for r in recs]  # noqa: E731 (speed varies)
    assert drop(metrics(tmp_path / "full")) == drop(metrics(tmp_path / "cut"))


def test_preference_function(world_root, tmp_path):
    (tmp_path / "prefs.py").write_text(
        "def longer(prompts, a, b):\n    return [1.0 if len(x) > len(y) else 0.0 for x, y in zip(a, b)]\n")
    run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--preference_fn", "prefs:longer",
        "--per_device_train_batch_size", 1, "--max_steps", 4, pythonpath=[tmp_path])
    train = [r for r in metrics(tmp_path / "out") if "loss/kl" in r]
    assert "rewards/chosen" not in train[0] and 0 <= train[0]["rewards/probabilities"] <= 1
    # one prompt per step: rewards/accuracies is TRL's [S(l) - S(lref) > 0] of that prompt (not [P > 1/2])
    assert all(r["rewards/accuracies"] == float(r["rewards/margins"] > 0) for r in train)


def test_bad_inputs(world_root, tmp_path):
    out = lambda name: ["--output_dir", tmp_path / name]  # noqa: E731 (a failed run may leave args.json)
    assert "--mixture_coef 1.5: values must be in [0.0, 1.0]" in fails(SCRIPT, *out("a"), "--mixture_coef", 1.5)
    assert "--beta -0.1: values must be in [0.0, inf]" in fails(SCRIPT, *out("b"), "--beta", -0.1)
    assert "--beta '0.1:x': expected a number or 'start:end'" in fails(SCRIPT, *out("c"), "--beta", "0.1:x")
    (tmp_path / "prefs.py").write_text(
        "def nan(prompts, a, b):\n    return [float('nan')] * len(a)\n"
        "def big(prompts, a, b):\n    return [2.0] * len(a)\n")
    err = fails(SCRIPT, *out("d"), *FAST, "--preference_fn", "prefs:nan", pythonpath=[tmp_path])
    assert "--preference_fn prefs:nan: nan returned nan for sample 0 (must be a finite number in [0.0, 1.0])" in err
    err = fails(SCRIPT, *out("e"), *FAST, "--preference_fn", "prefs:big", pythonpath=[tmp_path])
    assert "big returned 2.0 for sample 0" in err
    assert "pass one of" in fails(SCRIPT, *out("f"), "--preference_fn", "prefs:big", "--reward_fn", "prefs:big")
    assert "unknown argument(s) --alpha" in fails(SCRIPT, *out("g"), "--alpha", 0.1)

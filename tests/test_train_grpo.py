"""train_grpo.py end to end: 1 process, 1 vs 2 processes (DDP, FSDP2), resume, num_iterations, reward functions
with dataset columns and weights, a reward model, bad inputs."""
import json
import math
import os

import pytest
import torch

from scripts import fails, kill_after, metrics, run, weights

SCRIPT = "train_grpo.py"
# 4 prompts x G=4 = 16 completions per step, 8 new tokens at most, 16 eval prompts
FAST = ["--per_device_train_batch_size", 16, "--num_generations", 4, "--max_steps", 2, "--max_completion_length", 8,
        "--num_eval_prompts", 16, "--learning_rate", 3e-4, "--logging_steps", 1]


def _train(out):
    return [r for r in metrics(out) if "loss" in r]


def test_two_steps_and_trls_metrics(world_root, tmp_path):
    run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--beta", 0.1)
    train = _train(tmp_path / "out")
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert all(math.isfinite(v) for v in r.values())
        assert r["entropy"] > 0 and r["kl"] >= 0 and 0 <= r["frac_reward_zero_std"] <= 1
        assert r["completions/min_length"] <= r["completions/mean_length"] <= r["completions/max_length"] <= 8
        # on-policy, one update per generation batch: the ratio is exactly 1, nothing clipped
        assert r["clip_ratio/region_mean"] == 0.0
        assert r["rewards/gold_reward/mean"] == pytest.approx(r["reward"])
    assert train[0]["kl"] == 0.0  # the reference is the initial policy
    evals = [r for r in metrics(tmp_path / "out") if "eval/gold_reward" in r]
    assert [r["step"] for r in evals] == [0, 2] and "eval/kl" in evals[0]
    before, after = weights(os.path.join(world_root, "policy")), weights(tmp_path / "out")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[key], after[key])


def test_beta_zero_loads_no_reference(world_root, tmp_path):
    r = run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--max_steps", 1)
    recs = metrics(tmp_path / "out")
    assert not any("kl" in k for rec in recs for k in rec)  # no k3 in the loss, no eval/kl
    assert "eval step 1" in r.stdout


@pytest.mark.parametrize("extra", [["--loss_type", "dapo"],
                                   pytest.param(["--loss_type", "grpo", "--scale_rewards", "batch"],
                                                marks=pytest.mark.slow),
                                   ["--fsdp", "--loss_type", "dapo"]], ids=["ddp-dapo", "ddp-grpo-batch", "fsdp"])
def test_one_and_two_processes_train_the_same(world_root, tmp_path, extra):
    # the same 16 completions per step: 16 x 1 process, or 8 x 2 (each rank 2 prompts' groups); dapo's token mean
    # and batch scaling span both ranks, as in one process; grpo's mean of completions too (equal rows per rank).
    # (bnpo, TRL's too, is a mean over each rank's own tokens: it differs with the number of processes)
    common = [*FAST, "--beta", 0.05, *[x for x in extra if x != "--fsdp"]]
    if "--fsdp" not in extra:
        run(SCRIPT, "--output_dir", tmp_path / "one", *common)
    else:
        run(SCRIPT, "--output_dir", tmp_path / "one", *common, procs=1, torchrun=True)
    run(SCRIPT, "--output_dir", tmp_path / "two", *common, "--per_device_train_batch_size", 8, *extra[:1] if
        extra[0] == "--fsdp" else [], procs=2)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    m1, m2 = _train(tmp_path / "one"), _train(tmp_path / "two")
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "kl", "entropy", "loss"):
        assert m1[-1][key] == pytest.approx(m2[-1][key], abs=1e-5), key


def test_num_iterations_keeps_the_old_log_probs(world_root, tmp_path):
    # 2 passes over each generation batch, 2 micro-batches per pass, 1 micro-batch per optimizer step: 4 steps per
    # generation; from the second on the policy has moved, so rho != 1 and with a high rate some tokens clip
    run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--per_device_train_batch_size", 8,
        "--steps_per_generation", 2, "--num_iterations", 2, "--max_steps", 4, "--learning_rate", 3e-3)
    train = _train(tmp_path / "out")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[0]["clip_ratio/region_mean"] == 0.0  # the first step: the sampling policy itself
    assert max(r["clip_ratio/region_mean"] for r in train[1:]) > 0
    assert [r["episode"] for r in train] == [16] * 4  # one generation batch of 16 completions
    assert "reward" in train[0] and "reward" not in train[1]  # as TRL: a generation's metrics logged once


def test_kill_and_resume_reproduces_the_uninterrupted_run(world_root, tmp_path):
    common = [*FAST, "--max_steps", 12, "--save_steps", 3, "--eval_steps", 5, "--beta", 0.05]
    run(SCRIPT, "--output_dir", tmp_path / "full", *common)
    kill_after(SCRIPT, *common, output_dir=tmp_path / "cut", checkpoint="checkpoint-00000006")
    r = run(SCRIPT, "--output_dir", tmp_path / "cut", "--resume", *common)
    assert "resumed from" in r.stdout
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda recs: [{k: v for k, v in r.items() if k not in ("eps", "num_tokens")} for r in recs]  # noqa: E731
    assert drop(metrics(tmp_path / "full")) == drop(metrics(tmp_path / "cut"))


REWARDS = """
def answer_reward(prompts, completions, answer, **kwargs):
    # TRL's call: the dataset's other columns by keyword, one value per completion
    return [1.0 if a in c[0]["content"].split() else 0.0 for c, a in zip(completions, answer)]

def sometimes_none(prompts, completions, completion_ids, **kwargs):
    assert all(isinstance(ids, list) for ids in completion_ids)
    return [None if len(ids) % 2 else 0.5 for ids in completion_ids]
"""


def test_reward_functions_get_dataset_columns_and_weights(world_root, tmp_path):
    (tmp_path / "myrewards.py").write_text(REWARDS)
    rows = [json.loads(line) for line in open(os.path.join(world_root, "prompts", "train.jsonl"))][:64]
    with open(tmp_path / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "answer": "good"}) + "\n")
    run(SCRIPT, "--output_dir", tmp_path / "out", *FAST, "--dataset_name", tmp_path / "train.jsonl",
        "--model_name_or_path", os.path.join(world_root, "policy"),
        "--reward_funcs", "myrewards.answer_reward", "myrewards:sometimes_none", "--reward_weights", 2.0, 1.0,
        pythonpath=[tmp_path])
    for r in _train(tmp_path / "out"):
        assert 0 <= r["rewards/answer_reward/mean"] <= 1 and r["rewards/sometimes_none/mean"] == 0.5
        # the weighted sum: 2 x answer + 0.5 where the second scored, 2 x answer where it returned None
        assert 2 * r["rewards/answer_reward/mean"] <= r["reward"] <= 2 * r["rewards/answer_reward/mean"] + 0.5


def test_with_a_trained_reward_model(world_root, tmp_path):
    run("train_reward.py", "--output_dir", tmp_path / "rm", "--max_steps", 2, "--per_device_train_batch_size", 4)
    run(SCRIPT, "--output_dir", tmp_path / "out", "--reward_model_path", tmp_path / "rm", *FAST,
        "--reward_funcs", "nanorlhf.world:gold_reward", "--reward_weights", 1.0, 0.0)
    r = _train(tmp_path / "out")[-1]
    assert r["reward"] == pytest.approx(r["rewards/rm/mean"], abs=1e-5) and "rewards/gold_reward/mean" in r


def test_bad_inputs(world_root, tmp_path):
    out = lambda name: ["--output_dir", tmp_path / name]  # noqa: E731
    assert "--num_generations must be >= 2" in fails(SCRIPT, *out("a"), "--num_generations", 1)
    assert "must be divisible by num_generations = 3" in fails(SCRIPT, *out("b"), *FAST, "--num_generations", 3)
    assert "--loss_type 'sapo': use grpo, bnpo, dr_grpo, dapo, cispo" in fails(SCRIPT, *out("c"), "--loss_type",
                                                                               "sapo")
    assert "--scale_rewards 'mean'" in fails(SCRIPT, *out("d"), "--scale_rewards", "mean")
    assert "--reward_weights: 2 weights for 1 rewards" in fails(SCRIPT, *out("e"), "--reward_weights", 1, 2)
    err = fails(SCRIPT, *out("f"), *FAST, "--gradient_accumulation_steps", 2, "--steps_per_generation", 1)
    assert "must be a multiple of gradient_accumulation_steps = 2" in err
    assert "no function 'nope'" in fails(SCRIPT, *out("g"), "--reward_funcs", "nanorlhf.world.nope")
    err = fails(SCRIPT, *out("h"), *FAST, "--max_steps", 3, "--steps_per_generation", 2,
                "--per_device_train_batch_size", 8)
    assert "--max_steps 3: use a multiple of the 2 steps per generation batch" in err


@pytest.mark.parametrize("script", ["train_grpo.py", pytest.param("train_rloo.py", marks=pytest.mark.slow)])
def test_a_log_file_gets_the_step_lines_and_no_progress_bar(world_root, tmp_path, script):
    # output to a file (not a terminal): tqdm's redrawn bars ("\r...") stay out, the step lines stay in
    import subprocess
    import sys

    from scripts import ROOT, env
    e = {k: v for k, v in env().items() if k != "TQDM_DISABLE"}
    budget = ["--max_steps", 2] if script == "train_grpo.py" else ["--total_episodes", 128]
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--output_dir", str(tmp_path / "run"),
                            *map(str, budget), "--num_eval_prompts", "8"], env=e, stdout=out, stderr=err)
    assert r.returncode == 0
    out, err = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert "step     1 |" in out and "step     2 |" in out
    assert f"{script[6:-3]}:" not in out + err  # no "grpo:  50%|..." bar (transformers' own load and save bars
    # come once, before and after the training)

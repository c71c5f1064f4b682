"""Reliability, by class: resume under torchrun, nothing lost, non-finite numbers stop the run, flags
validated where parsed, wrong inputs refused, and every refusal one clean message (no traceback)."""
import gzip
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

import nanorlhf as nr
from scripts import checkpoint_state, fails, kill_after, metrics, run, survivors, weights

REWARD = ["--per_device_train_batch_size", 4, "--per_device_eval_batch_size", 16, "--logging_steps", 1]
RLOO = ["--per_device_train_batch_size", 8, "--total_episodes", 16, "--response_length", 8, "--num_eval_prompts", 16,
        "--num_sample_generations", 0]


def _clean(r, code):
    """A refusal from a subprocess: the exit code, one short message on stderr, no traceback."""
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stderr


# ----------------------------------------------------------------------------- 1. resume under torchrun
@pytest.mark.parametrize("extra", [pytest.param([], id="ddp"), pytest.param(["--fsdp"], id="fsdp",
                                                                             marks=pytest.mark.slow)])
def test_two_process_kill_and_resume_is_bit_identical(world_root, tmp_path, extra):
    # --resume under torchrun used to hang: rank 0 waited in a broadcast that rank 1 had skipped
    common = ["--max_steps", 24, "--save_steps", 4, *REWARD, "--logging_steps", 3, *extra]
    run("train_reward.py", "--output_dir", tmp_path / "full", *common, procs=2)
    kill_after("train_reward.py", *common, output_dir=tmp_path / "cut", checkpoint="checkpoint-00000008", procs=2)
    assert not survivors(tmp_path / "cut")
    r = run("train_reward.py", "--output_dir", tmp_path / "cut", "--resume", *common, procs=2, timeout=300)
    assert "resumed from" in r.stdout
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m.get("loss") for m in metrics(tmp_path / "full")] == [m.get("loss") for m in metrics(tmp_path / "cut")]


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [("train_rloo.py", []), ("train_ppo.py", ["--fsdp", "--num_ppo_epochs", 2])])
def test_two_process_kill_and_resume_rl(world_root, tmp_path, script, extra):
    common = [*RLOO, "--total_episodes", 160, "--save_steps", 3, "--per_device_train_batch_size", 4, *extra]
    run(script, "--output_dir", tmp_path / "full", *common, procs=2)
    kill_after(script, *common, output_dir=tmp_path / "cut", checkpoint="checkpoint-00000006", procs=2)
    run(script, "--output_dir", tmp_path / "cut", "--resume", *common, procs=2, timeout=300)
    for sub in ["", "value_model"] if script == "train_ppo.py" else [""]:  # PPO: the value model too
        a, b = weights(tmp_path / "full" / sub), weights(tmp_path / "cut" / sub)
        assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- 2. nothing is lost
def test_nothing_is_lost(world_root, tmp_path):
    out = tmp_path / "o"
    common = ["--output_dir", out, "--max_steps", 6, "--save_steps", 1, *REWARD]
    r = run("train_reward.py", *common, "--save_total_limit", 0)
    assert len(nr.checkpoints(out)) == 5  # 0 keeps every checkpoint (the last step saves the model instead)
    assert "--save_total_limit -1: must be >= 0" in _clean(run("train_reward.py", *common, "--save_total_limit", -1,
                                                               "--overwrite_output_dir", check=False), 2)
    before = weights(out)
    # a typo in --dataset_name with --overwrite_output_dir: refused before anything of the old run is deleted
    err = _clean(run("train_reward.py", *common, "--overwrite_output_dir", "--dataset_name", tmp_path / "nope.jsonl",
                     check=False), 1)
    assert "nope.jsonl: no such file or folder" in err and len(nr.checkpoints(out)) == 5
    assert os.path.exists(out / "metrics.jsonl") and all(torch.equal(before[k], v) for k, v in weights(out).items())
    # the same command twice: the finished run is redone, not refused; another flag is still refused
    r = run("train_reward.py", *common, "--save_total_limit", 0)
    assert "holds a finished run of this same command" in r.stdout
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert "one with other flags" in _clean(run("train_reward.py", *common, "--seed", 1, check=False), 1)


def test_resume_survives_a_torn_checkpoint_and_log_line(world_root, tmp_path):
    out = tmp_path / "o"
    common = ["--output_dir", out, "--max_steps", 6, "--save_steps", 2, "--save_total_limit", 0, *REWARD]
    run("train_reward.py", *common)
    full = [m for m in metrics(out)]
    os.remove(out / "model.safetensors")
    newest = nr.checkpoints(out)[0]
    with open(os.path.join(newest, "__0_0.distcp"), "r+b") as f:  # a kill mid-write of a file
        f.truncate(1000)
    with open(out / "metrics.jsonl", "a") as f:  # a kill mid-append
        f.write('{"step": 9, "loss": 0.')
    r = run("train_reward.py", *common, "--resume")
    assert "skipping unreadable checkpoints" in r.stdout and "resuming from" in r.stdout
    assert "checkpoint-00000002" in r.stdout.split("resumed from")[1].split("\n")[0]
    assert [m.get("loss") for m in metrics(out)] == [m.get("loss") for m in full]


# ----------------------------------------------------------------------------- 3. non-finite numbers
def test_a_non_finite_advantage_stops_the_run_and_keeps_the_checkpoint(world_root, tmp_path):
    # finite rewards of +-1e308 make an infinite leave-one-out advantage at the third step
    (tmp_path / "huge.py").write_text(
        "calls = [0]\n"
        "def reward(prompts, completions):\n"
        "    calls[0] += 1\n"
        "    if calls[0] < 3:\n        return [0.0] * len(completions)\n"
        "    return [1e308 if i % 2 else -1e308 for i in range(len(completions))]\n")
    out = tmp_path / "o"
    r = run("train_rloo.py", "--output_dir", out, *RLOO, "--total_episodes", 80, "--num_eval_prompts", 0,
            "--save_steps", 1, "--reward_fn", "huge:reward", pythonpath=[tmp_path], check=False)
    err = _clean(r, 1)
    assert "step 3: non-finite advantages" in err and "stopped without saving" in err
    assert not os.path.exists(out / "model.safetensors") and not os.path.exists(out / nr.runs.COMPLETE)
    assert os.path.basename(nr.checkpoints(out)[0]) == "checkpoint-00000002"
    assert all(torch.isfinite(v).all() for v in checkpoint_state(nr.checkpoints(out)[0])["model"].values())


def test_a_nan_weight_stops_reward_training_at_step_one(world_root, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(os.path.join(world_root, "policy"))
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "bad")
    nr.load_tokenizer(os.path.join(world_root, "policy")).save_pretrained(tmp_path / "bad")
    r = run("train_reward.py", "--output_dir", tmp_path / "o", "--model_name_or_path", tmp_path / "bad",
            "--dataset_name", os.path.join(world_root, "preferences"), *REWARD, "--max_steps", 3, check=False)
    assert "step 1: non-finite grad_norm and loss" in _clean(r, 1)


# ----------------------------------------------------------------------------- 4. flags
@pytest.mark.parametrize("script, flags, message", [
    ("train_reward.py", ["--max_grad_norm", -1], "--max_grad_norm -1.0: must be >= 0"),
    ("train_reward.py", ["--learning_rate", -1e-3], "--learning_rate -0.001: must be >= 0"),
    ("train_reward.py", ["--logging_steps", 0], "--logging_steps 0: must be > 0"),
    ("train_reward.py", ["--eval_steps", -5], "--eval_steps -5: must be >= 0"),
    ("train_reward.py", ["--warmup_ratio", 1.5], "--warmup_ratio 1.5: must be in [0, 1]"),
    ("train_reward.py", ["--num_train_epochs", 0], "--num_train_epochs 0.0: must be > 0"),
    ("train_reward.py", ["--fsdp"], "launch with torchrun"),
    ("train_rloo.py", ["--temperature", 0], "--temperature 0.0: must be > 0"),
    ("train_xpo.py", ["--sharded_generation"], "--sharded_generation chooses how an FSDP2-sharded policy samples"),
    ("train_rloo.py", ["--temperature", -1], "--temperature -1.0: must be > 0"),
    ("train_rloo.py", ["--kl_coef", "nan"], "expected a finite number, got 'nan'"),
    ("train_rloo.py", ["--cliprange", 0], "--cliprange 0.0: must be > 0"),
    ("train_xpo.py", ["--beta", "inf"], "--beta inf: values must be finite"),
    ("train_xpo.py", ["--loss_type", "ipo", "--beta", 0], "--beta must be > 0"),
    ("train_nash_md.py", ["--beta", "0.1:0.2:0.3"], "--beta '0.1:0.2:0.3': expected a number or 'start:end'"),
    ("train_nash_md.py", ["--missing_eos_penalty", -1], "--missing_eos_penalty -1.0: must be >= 0"),
])
def test_flags_are_validated_where_parsed(script, flags, message, tmp_path):
    err = fails(script, "--output_dir", tmp_path / "o", *flags)
    assert err.startswith("2\n") and message in err, err


def test_a_given_num_train_epochs_wins_over_the_world_settings():
    args = type("A", (), {"max_steps": -1, "num_train_epochs": 0.5})()
    changed = nr.apply_defaults(args, {"max_steps": 200, "learning_rate": 1e-3}, ["--num_train_epochs", "0.5"])
    assert changed == {"learning_rate": 1e-3} and args.max_steps == -1


# ----------------------------------------------------------------------------- 5. wrong inputs
def test_wrong_models_and_prompts_are_refused(world_root, tmp_path):
    policy = os.path.join(world_root, "policy")
    tok = nr.load_tokenizer(policy)
    cls = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=1, num_attention_heads=2, num_labels=1))
    cls.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    err = fails("train_rloo.py", "--output_dir", tmp_path / "a", "--model_name_or_path", tmp_path / "rm",
                "--dataset_name", os.path.join(world_root, "prompts"), "--reward_fn", "nanorlhf.world:gold_reward")
    assert "a sequence classifier (LlamaForSequenceClassification, a reward model?), not a causal LM policy" in err
    other = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tok) + 8, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2))
    other.save_pretrained(tmp_path / "ref")
    err = fails("train_xpo.py", "--output_dir", tmp_path / "b", "--sft_model_path", tmp_path / "ref")
    assert f"vocabulary of {len(tok) + 8} tokens, the policy's has {len(tok)}" in err
    err = fails("train_nash_md.py", "--output_dir", tmp_path / "c", "--reward_model_path", policy)
    assert "not a reward model" in err
    # conversational prompts for a tokenizer with no chat template
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "plain")
    AutoModelForCausalLM.from_pretrained(policy).save_pretrained(tmp_path / "plain")
    err = fails("train_rloo.py", "--output_dir", tmp_path / "d", "--model_name_or_path", tmp_path / "plain",
                "--dataset_name", os.path.join(world_root, "prompts"), "--reward_fn", "nanorlhf.world:gold_reward")
    assert "conversational prompts need a chat template and this tokenizer has none" in err


def test_reward_function_results():
    import numpy as np
    assert nr.call_reward_fn(lambda p, c: np.array([0.5, 1.0], dtype=np.float32), ["a", "b"], ["x", "y"]).tolist() \
        == [0.5, 1.0]
    assert nr.call_reward_fn(lambda p, c: (1, 2), ["a", "b"], ["x", "y"]).tolist() == [1.0, 2.0]
    with pytest.raises(nr.InputError, match="returned 3.0, expected one number per completion"):
        nr.call_reward_fn(lambda p, c: 3.0, ["a"], ["x"])

    def broken(prompts, completions):
        raise KeyError("mood")
    with pytest.raises(nr.InputError, match=r"broken raised KeyError: 'mood' \(on a batch of 2 completions; the "
                                            r"first: 'x'\)"):
        nr.call_reward_fn(broken, ["a", "b"], ["x", "y"])


# ----------------------------------------------------------------------------- 6. clean messages
def test_every_refusal_is_one_clean_message(world_root, tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with gzip.open(tmp_path / "cut.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(2000))
    data = (tmp_path / "cut.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[:len(data) // 2])
    os.makedirs(tmp_path / "noconfig")
    (tmp_path / "afile").write_text("x")
    gold = ["--reward_fn", "nanorlhf.world:gold_reward"]
    cases = [
        ("train_rloo.py", ["--dataset_name", tmp_path / "latin1.jsonl", *gold], "latin1.jsonl: line 1: not UTF-8"),
        ("train_reward.py", ["--dataset_name", tmp_path / "cut.jsonl.gz"], "the file is cut or corrupt"),
        ("train_reward.py", ["--dataset_name", "data/train.jsonl"], "data/train.jsonl: no such file or folder"),
        ("train_rloo.py", ["--model_name_or_path", tmp_path / "noconfig", *gold],
         "no config.json in this folder, so it is not a Hugging Face model folder"),
        ("train_reward.py", ["--model_name_or_path", "someone/no-such-model"], "someone/no-such-model: cannot load"),
        ("train_reward.py", ["--output_dir", tmp_path / "afile"], "is a file, not a folder"),  # a usage error: 2
        ("train_reward.py", ["--output_dir", "/proc/nanorlhf-test"], "--output_dir /proc/nanorlhf-test: cannot write"),
    ]
    for script, flags, message in cases:
        flags = flags if "--output_dir" in flags else ["--output_dir", tmp_path / "out", *flags]
        r = run(script, *flags, check=False)
        err = _clean(r, 2 if "is a file" in message else 1)
        assert message in err and f"{script}: error: " in err, (script, flags, err)

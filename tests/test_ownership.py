"""A run owns its folder and never destroys what it did not write: one run per folder (an OS lock a killed run
does not leave stuck), no training in place, resume rewinds only its own logs, no run of zero steps."""
import os
import subprocess
import sys
import time

import pytest

from nanorlhf.dist import checkpoints
from scripts import ROOT, env, run

RLOO = ["--per_device_train_batch_size", 8, "--response_length", 8, "--num_eval_prompts", 0,
        "--num_sample_generations", 0]


def _refused(r, code=1):
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stderr


def test_a_busy_folder_is_refused_and_a_killed_runs_lock_is_not(world_root, tmp_path):
    out = tmp_path / "r"
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_rloo.py"), "--output_dir", str(out), *map(
        str, RLOO + ["--total_episodes", 80000, "--save_steps", 1])], env=env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        def newest():  # the step of the last checkpoint the first run finished (one a step), 0 before any
            return int(done[0].rsplit("-", 1)[1]) if (done := checkpoints(out)) else 0

        def wait_past(step):
            deadline = time.time() + 120
            while newest() <= step and first.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            assert first.poll() is None and newest() > step, f"the first run wrote no checkpoint past {step}"

        wait_past(0)
        for flags, procs in (["--overwrite_output_dir"], 1), (["--resume"], 1), (["--overwrite_output_dir"], 2):
            r = run("train_rloo.py", "--output_dir", out, *RLOO, "--total_episodes", 8, *flags, procs=procs,
                    check=False)
            err = _refused(r) if procs == 1 else r.stderr  # (torchrun adds its own ChildFailedError traceback)
            assert r.returncode == 1 and err.count("Traceback") == (procs > 1), err[-3000:]
            assert f"--output_dir {out} is in use by a running run (pid {first.pid} " in err, err
            assert err.count("is in use") == procs  # each rank: one line, no rank left waiting
        wait_past(newest())  # the refused runs touched nothing: the first still trains
    finally:
        first.kill()
        first.wait()
    run("train_rloo.py", "--output_dir", out, *RLOO, "--total_episodes", 8, "--overwrite_output_dir")  # lock freed


def test_training_in_place_is_refused(world_root, tmp_path):
    policy = os.path.join(world_root, "policy")
    link = tmp_path / "link"
    link.symlink_to(policy)
    for flag in ("--model_name_or_path", "--sft_model_path"):
        r = run("train_rloo.py", flag, policy, "--output_dir", link, "--overwrite_output_dir", *RLOO,
                "--total_episodes", 8, check=False)
        assert f"--output_dir {link} is the folder of --" in (err := _refused(r, 2)) and f" {policy}: a run " in err
    (tmp_path / "rm").mkdir()
    (tmp_path / "x").mkdir()
    other = os.path.relpath(tmp_path / "x" / ".." / "rm")  # relative, through another folder
    r = run("train_rloo.py", "--reward_model_path", tmp_path / "rm", "--output_dir", other, "--overwrite_output_dir",
            *RLOO, "--total_episodes", 8, check=False)
    assert f"--output_dir {other} is the folder of --reward_model_path" in _refused(r, 2)
    assert os.path.exists(os.path.join(policy, "model.safetensors"))


def test_a_run_of_zero_steps_is_refused(world_root, tmp_path):
    from scripts import fails
    out = ["--output_dir", tmp_path / "o"]
    for script, flags, message in [  # the online methods and the reward model take ceil(epochs x ...) >= 1 steps
            ("train_rloo.py", ["--total_episodes", -5], "--total_episodes -5, --num_train_epochs 1.0: -5 completions"
                                                       " at 64 per step: the run would take no step"),
            ("train_ppo.py", ["--total_episodes", 0, "--num_train_epochs", 0.0001], "--total_episodes 0, "
             "--num_train_epochs 0.0001: 0 completions at 64 per step: the run would take no step"),
            ("train_nash_md.py", ["--num_train_epochs", 0], "--num_train_epochs 0.0: must be > 0"),
            ("train_reward.py", ["--max_steps", -1, "--num_train_epochs", -2], "--num_train_epochs -2.0: must be > 0")]:
        err = fails(script, *out, *flags)
        assert message in err, (script, err)
        assert not os.path.exists(tmp_path / "o" / "model.safetensors")
    for n in (0, -5):
        assert f"--num_prompts must be >= 1, got {n}" in fails("evaluate.py", "--model_name_or_path", os.path.join(
            world_root, "policy"), "--num_prompts", n, *out)
    run("evaluate.py", "--model_name_or_path", os.path.join(world_root, "policy"), "--baseline_model_path",
        os.path.join(world_root, "policy"), "--num_prompts", 1, "--output_dir", tmp_path / "e")
    import json
    text = (tmp_path / "e" / "eval.json").read_text()
    (r,) = json.loads(text, parse_constant=lambda c: pytest.fail(f"eval.json holds {c}"))["results"]
    assert r["prompts"] == 1 and r["score_ci"] is None  # one prompt: no interval, and strict JSON


def test_no_deprecation_warning_from_our_calls(world_root, tmp_path):
    # the cached forwards (sampling, shared prompts, a decoder reward model on shared prompts) under the installed
    # transformers: no deprecation or future warning on the way (5.24 renamed past_key_values -> cache)
    run("train_reward.py", "--output_dir", tmp_path / "rm", "--max_steps", 2, "--per_device_train_batch_size", 4)
    r = run("train_rloo.py", "--output_dir", tmp_path / "r", *RLOO, "--total_episodes", 16, "--reward_model_path",
            tmp_path / "rm", "--num_eval_prompts", 8, "--num_sample_generations", 1)
    r2 = run("train_nash_md.py", "--output_dir", tmp_path / "n", "--max_steps", 1, "--per_device_train_batch_size", 4,
             "--num_eval_prompts", 0, "--num_sample_generations", 0)
    for out in (r.stdout + r.stderr, r2.stdout + r2.stderr):
        assert "deprecated" not in out.lower() and "FutureWarning" not in out, out[-3000:]


@pytest.mark.parametrize("procs", [1, 2])
def test_sigterm_finishes_the_step_checkpoints_and_says_how_to_resume(world_root, tmp_path, procs):
    import signal
    from scripts import _launcher, metrics
    out = tmp_path / "r"
    flags = [*RLOO, "--total_episodes", 8 * 2000, "--save_steps", 0, "--per_device_train_batch_size", 8 // procs]
    proc = subprocess.Popen([*_launcher(procs), os.path.join(ROOT, "train_rloo.py"), "--output_dir", str(out),
                             *map(str, flags)], env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)  # a scheduler's notice (torchrun forwards it to every rank)
    text = proc.communicate(timeout=120)[0]
    steps = [r["step"] for r in metrics(out) if "objective/kl" in r]
    assert proc.returncode != 0 and f"SIGTERM: stopped after step {steps[-1]}, its checkpoint written in {out}; " \
        "to continue, run the same command with --resume" in text, text[-3000:]
    assert (out / f"checkpoint-{steps[-1]:08d}").is_dir() and not (out / "run_complete.json").exists()
    assert text.count("SIGTERM: stopped") == 1 and "Traceback (most recent call last)" not in text.split("SIGTERM")[0]
    if procs == 1:
        assert proc.returncode == 143
        run("train_rloo.py", "--output_dir", out, *flags, "--resume")  # continues from that step to the end
        assert [r["step"] for r in metrics(out) if "objective/kl" in r] == list(range(1, 2001))


@pytest.fixture
def small_disk(tmp_path):
    """A 1.6 MB tmpfs (needs root, as CI and this machine have; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)])


def test_a_full_disk_is_said_and_loses_nothing(world_root, small_disk):
    # checkpoint 1 (about 0.9 MB: weights and AdamW) fits, checkpoint 2 does not: the run stops saying so, removes
    # the half-written folder and keeps checkpoint 1
    out = small_disk / "r"
    r = run("train_rloo.py", "--output_dir", out, *RLOO, "--total_episodes", 32, "--save_steps", 1, check=False)
    err = _refused(r)
    assert f"disk full writing {out}/checkpoint-00000002.tmp (" in err and "Free space, then --resume" in err, err
    assert sorted(os.listdir(out)) == [".lock", "args.json", "checkpoint-00000001", "metrics.jsonl"]
    # the final model (about 0.3 MB) does not fit: no half-written folder left, nothing marked complete
    import shutil
    shutil.rmtree(out)
    with open(small_disk / "filler", "wb") as f:
        f.write(b"0" * (1600 * 1024 - 300 * 1024))
    r = run("train_rloo.py", "--output_dir", out, *RLOO, "--total_episodes", 32, "--save_steps", 0, check=False)
    assert f"disk full writing {out}/.saving (" in _refused(r)
    assert not os.path.exists(out / ".saving") and not os.path.exists(out / "run_complete.json")


def test_a_reward_function_failing_on_one_rank_gives_one_message(world_root, tmp_path):
    # rank 1's reward function raises; rank 0, waiting in a collective, says its peer stopped, not a traceback
    (tmp_path / "judges.py").write_text("import os\n\ndef flaky(prompts, completions):\n"
                                        "    if os.environ['RANK'] == '1':\n        raise KeyError('mood')\n"
                                        "    return [0.0] * len(completions)\n")
    r = run("train_rloo.py", "--output_dir", tmp_path / "o", *RLOO, "--total_episodes", 16, "--reward_fn",
            "judges:flaky", procs=2, check=False, pythonpath=[tmp_path])
    err = r.stderr
    assert r.returncode != 0 and "flaky raised KeyError: 'mood'" in err, err[-3000:]
    assert err.count("Traceback") <= 1 and "ChildFailedError" in err.split("Traceback")[-1]  # torchrun's own only
    assert "rank 0 stops: another rank stopped first (its error is above)" in err or err.count("error:") == 1


def test_resume_rewinds_only_the_runs_own_logs(world_root, tmp_path):
    from scripts import kill_after
    out = tmp_path / "r"
    flags = [*RLOO, "--total_episodes", 8 * 40, "--save_steps", 3]
    kill_after("train_rloo.py", *flags, output_dir=out, checkpoint="checkpoint-00000006")
    (out / "eval_samples.jsonl").write_text('{"step": 99, "kept": true}\n')  # evaluate.py's, say, written in between
    (out / "notes.jsonl").write_text('{"step": 99}\n')
    run("train_rloo.py", "--output_dir", out, *flags, "--resume")
    assert (out / "eval_samples.jsonl").read_text() == '{"step": 99, "kept": true}\n'
    assert (out / "notes.jsonl").read_text() == '{"step": 99}\n'

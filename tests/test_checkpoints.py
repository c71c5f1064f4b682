"""Sharded checkpoints (torch.distributed.checkpoint): each rank writes its own shard, and a run resumes on another
number of processes, the global batch kept, within float tolerance of the uninterrupted run."""
import os
import shutil

import pytest
import torch

import nanorlhf as nr
from scripts import metrics, run, weights

SCRIPT = "train_rloo.py"
# 8 completions per step, 6 steps, a checkpoint every 2, all kept
COMMON = ["--total_episodes", 48, "--response_length", 8, "--num_eval_prompts", 8, "--num_sample_generations", 0,
          "--save_steps", 2, "--save_total_limit", 0]
TOL = 1e-5  # float32 sums in another order: measured 1.5e-8 (2 -> 1) and 2.8e-8 (1 -> 2) on the world's policy


def _close(a, b):
    a, b = weights(a), weights(b)
    shared = set(a) & set(b)  # an FSDP2 export also writes the tied lm_head; the same tensor
    assert shared >= {k for k in a if not k.startswith("lm_head")}
    return max((a[k] - b[k]).abs().max().item() for k in shared)


def _cut(src, dst, step):
    """dst: src as a run killed right after checkpoint `step` (later checkpoints and the final model gone)."""
    shutil.copytree(src, dst)
    for path in nr.checkpoints(dst):
        if int(path.rsplit("-", 1)[1]) > step:
            shutil.rmtree(path)
    for name in ("model.safetensors", nr.runs.COMPLETE):
        os.remove(os.path.join(dst, name))


@pytest.mark.dist
def test_fsdp2_shards_are_written_by_each_rank_and_resume_on_one_process(world_root, tmp_path):
    run(SCRIPT, "--output_dir", tmp_path / "two", *COMMON, "--per_device_train_batch_size", 4, "--fsdp", procs=2)
    ckpt = nr.checkpoints(tmp_path / "two")[-1]  # checkpoint-2
    sizes = {n: os.path.getsize(os.path.join(ckpt, n)) for n in os.listdir(ckpt) if n.endswith(".distcp")}
    assert len(sizes) == 2  # one file of shards per rank
    total = sum(sizes.values())  # model + AdamW's two moments: 3 x 76,096 float32 = 913 kB, plus the step counts
    assert total > 3 * 76096 * 4 and max(sizes.values()) < 0.6 * total  # about half each, not everything on one
    # killed after checkpoint 2 (as by kill -9), resumed with 1 process and the per-device batch doubled
    _cut(tmp_path / "two", tmp_path / "one", 2)
    r = run(SCRIPT, "--output_dir", tmp_path / "one", *COMMON, "--per_device_train_batch_size", 8, "--fsdp",
            "--resume", torchrun=True)
    assert "written by 2 processes: resharded" in r.stdout and "resumed from" in r.stdout
    assert _close(tmp_path / "two", tmp_path / "one") < TOL
    steps = [m["step"] for m in metrics(tmp_path / "one") if "objective/kl" in m]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.dist
def test_one_process_run_resumes_on_two(world_root, tmp_path):
    run(SCRIPT, "--output_dir", tmp_path / "one", *COMMON, "--per_device_train_batch_size", 8)
    _cut(tmp_path / "one", tmp_path / "two", 4)
    run(SCRIPT, "--output_dir", tmp_path / "two", *COMMON, "--per_device_train_batch_size", 4, "--resume", procs=2)
    assert _close(tmp_path / "one", tmp_path / "two") < TOL


def test_a_checkpoint_of_the_old_format_is_refused(world_root, tmp_path):
    out = tmp_path / "o"
    run(SCRIPT, "--output_dir", out, *COMMON, "--per_device_train_batch_size", 8)
    for ckpt in nr.checkpoints(out):  # as nanorlhf wrote them before DCP: one state.pt each
        shutil.rmtree(ckpt)
        os.makedirs(ckpt)
        torch.save({"model": {}, "step": int(ckpt.rsplit("-", 1)[1])}, os.path.join(ckpt, "state.pt"))
    os.remove(out / nr.runs.COMPLETE)
    r = run(SCRIPT, "--output_dir", out, *COMMON, "--per_device_train_batch_size", 8, "--resume", check=False)
    assert r.returncode != 0 and "single-file format (state.pt)" in r.stderr and "Traceback" not in r.stderr

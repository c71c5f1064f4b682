"""Two processes on gloo via torchrun: all-reduce, DDP gradients, FSDP2 forward / sampling / save."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nanorlhf import global_mean_var, global_whiten

HERE = os.path.dirname(os.path.abspath(__file__))


def torchrun(args, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.path.dirname(HERE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.dist
def test_two_process_plumbing(tmp_path):
    torchrun([os.path.join(HERE, "dist_worker.py"), str(tmp_path)], cwd=tmp_path)
    r0, r1 = (json.load(open(tmp_path / f"result_rank{r}.json")) for r in (0, 1))
    assert r0["mean"] == r1["mean"] == {"a": 0.5, "b": 1.0}
    assert r0["min"] == {"a": 0.0, "b": 0.0} and r0["max"] == {"a": 1.0, "b": 2.0}
    assert r1["sum"] == {"a": 1.0, "b": 2.0}
    assert r0["mean_var"] == r1["mean_var"] == [3.0, 2.5]  # statistics of both ranks' elements together
    assert r0["ddp_grad_max_err"] < 1e-6 and r1["ddp_grad_max_err"] < 1e-6
    assert r0["fsdp_logprob_max_err"] < 1e-5 and r1["fsdp_logprob_max_err"] < 1e-5
    assert r0["fsdp_generate_equal"] and r1["fsdp_generate_equal"]
    assert r0["rollouts_fsdp_equal"] and r1["rollouts_fsdp_equal"] and r0["resharded_after"] and r1["resharded_after"]
    assert r0["saved_max_err"] == 0.0 and r0["saved_tied"]
    assert r0["saved_arch"] == ["LlamaForCausalLM"]
    # --fsdp: the frozen reference and reward model are sharded (half their parameters per rank) and compute as the
    # unsharded model
    for r in (r0, r1):
        assert all(0.45 <= f <= 0.55 for f in r["frozen_local_fraction"]), r["frozen_local_fraction"]
        assert r["fsdp_ref_max_err"] < 1e-5


def test_global_mean_var_is_stable_and_unbiased():
    # scores at offset 300 with std ~0.1: E[x^2] - mean^2 in float32 gave a std of 0.0812 (true 0.1013)
    x = (300.0 + 0.1013 * torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).float()
    mean, var = global_mean_var(x)
    assert mean == pytest.approx(x.double().mean().item(), abs=1e-9)
    assert var == pytest.approx(x.double().var(unbiased=True).item(), rel=1e-9)  # ddof=1, as TRL's whiten
    w = global_whiten(x)
    assert w.dtype == torch.float32 and abs(w.double().mean().item()) < 1e-5 and w.double().std().item() == \
        pytest.approx(1.0, abs=1e-4)

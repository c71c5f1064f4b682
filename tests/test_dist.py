"""Two processes on gloo via torchrun: all-reduce, DDP gradients, FSDP2 forward / sampling / save."""
import json
import os
import subprocess
import sys

import pytest

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
    assert r0["ddp_grad_max_err"] < 1e-6 and r1["ddp_grad_max_err"] < 1e-6
    assert r0["fsdp_logprob_max_err"] < 1e-5 and r1["fsdp_logprob_max_err"] < 1e-5
    assert r0["fsdp_generate_equal"] and r1["fsdp_generate_equal"]
    assert r0["saved_max_err"] == 0.0 and r0["saved_tied"]
    assert r0["saved_arch"] == ["LlamaForCausalLM"]

"""Helpers to run the train_*.py scripts as subprocesses, as a user would."""
import contextlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(pythonpath=()):
    path = os.pathsep.join([ROOT, *map(str, pythonpath)])
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=path, TQDM_DISABLE="1")


def run(script, *args, procs=1, check=True, timeout=600, pythonpath=(), torchrun=False):
    """Run ROOT/script with args (1 process, or torchrun with `procs`, or with torchrun=True torchrun even for 1);
    returns the CompletedProcess."""
    r = subprocess.run([*_launcher(procs, torchrun), os.path.join(ROOT, script), *map(str, args)], env=env(pythonpath),
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    return r


def _launcher(procs, torchrun=False):
    return [sys.executable] if procs == 1 and not torchrun else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]


def survivors(output_dir):
    """Pids of live processes whose command line names output_dir (ranks left behind by a killed launcher)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(output_dir).encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def kill_after(script, *args, output_dir, checkpoint, procs=1):
    """Start a run (torchrun with procs > 1), SIGKILL the launcher as soon as output_dir/checkpoint exists;
    assert it was killed mid-run and that no rank outlives it by more than 10 s."""
    proc = subprocess.Popen([*_launcher(procs), os.path.join(ROOT, script), "--output_dir", str(output_dir),
                             *map(str, args)], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and not os.path.isdir(os.path.join(output_dir, checkpoint)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    deadline = time.time() + 10
    while survivors(output_dir) and time.time() < deadline:
        time.sleep(0.1)
    assert not survivors(output_dir), "ranks outlived their killed launcher"


def weights(output_dir):
    """The saved model's tensors, by name."""
    from safetensors.torch import load_file
    return load_file(os.path.join(output_dir, "model.safetensors"))


def checkpoint_state(path):
    """A sharded checkpoint folder (nanorlhf.save_checkpoint) read back whole in this process: {"model": {name:
    tensor}, "optimizer": {"state": ..., "param_groups": ...}}, plus its trainer.pt ({"step", "scheduler", ...})."""
    import tempfile
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, os.path.join(tmp, "state.pt"))
        state = torch.load(os.path.join(tmp, "state.pt"), weights_only=True)
    return {**state, "trainer": torch.load(os.path.join(path, "trainer.pt"), weights_only=True)}


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def fails(script, *args, pythonpath=()):
    """Run a script inside this process (no 6 s of imports per call) expecting it to refuse; returns the
    message it exits with plus what it printed. Fails the test if the script succeeds."""
    out, argv, path = io.StringIO(), sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = [script, *map(str, args)], [str(p) for p in pythonpath]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            return f"{e.code}\n{out.getvalue()}"
    except Exception as e:  # errors raised by the package (data, reward functions) carry their message
        return f"{type(e).__name__}: {e}\n{out.getvalue()}"
    finally:  # forget the test's own modules (e.g. a reward function file) so the next call imports afresh
        sys.argv, sys.path[:] = argv, path
        for name, module in list(sys.modules.items()):
            if any(str(getattr(module, "__file__", None) or "").startswith(str(p)) for p in pythonpath):
                del sys.modules[name]
    raise AssertionError(f"{script} {args} succeeded; expected a refusal")

"""Helpers to run the train_*.py scripts as subprocesses, as a user would."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(pythonpath=()):
    path = os.pathsep.join([ROOT, *map(str, pythonpath)])
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=path, TQDM_DISABLE="1")


def run(script, *args, procs=1, check=True, timeout=600, pythonpath=()):
    """Run ROOT/script with args (1 process, or torchrun with `procs`); returns the CompletedProcess."""
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(procs)]
    r = subprocess.run([*launcher, os.path.join(ROOT, script), *map(str, args)], env=env(pythonpath),
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    return r


def start(script, *args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]

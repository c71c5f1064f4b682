"""An output directory per run: guard it, log to it (and to experiment trackers: `Tracker`), checkpoint into it,
resume from it. A run calls `check_output_dir` (refusals only), loads data and models, `start_run` (the only
place an old run's state is removed), trains, saves, and `finish_run` (marks the run complete)."""
import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict

import torch.distributed as dist

from .config import InputError, unwritable, usage_error
from .dist import all_reduce_metrics, checkpoints, is_main, load_checkpoint, print0, save_checkpoint, set_rng_state

# flags that change neither the data a step sees nor the update it makes: free to differ on --resume
FREE_ON_RESUME = {"output_dir", "overwrite_output_dir", "resume", "logging_steps", "eval_steps", "save_steps",
                  "save_total_limit", "num_eval_prompts", "num_sample_generations", "per_device_eval_batch_size",
                  "gradient_checkpointing", "sharded_generation", "report_to", "run_name"}
COMPLETE = "run_complete.json"  # written after the final model: the run in this folder finished
LOGS = ("metrics.jsonl", "samples.jsonl")  # what a run appends to: replaced with it, rewound on --resume (no other)


BATCH = ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size")  # their product: the global batch


def _differences(saved, args, world_size, resume=False):
    """Flags of args (and the number of processes) that differ from a saved run's. On --resume the number of
    processes may change (checkpoints reshard) as long as the global batch, the product of BATCH, stays."""
    given = {**asdict(args), "world_size": world_size}
    free = FREE_ON_RESUME | (set(BATCH) if resume else set())
    diff = [f"--{k}: saved {saved.get(k)!r}, given {given.get(k)!r}".replace("--world_size", "number of processes")
            for k in sorted({*saved, *given}) if k not in free and saved.get(k) != given.get(k)]
    if resume:
        sizes = [[d.get(k) or 1 for k in BATCH] for d in (saved, given)]
        (a, b, c), (x, y, z) = sizes
        if a * b * c != x * y * z:
            diff.append(f"global batch (per_device_train_batch_size x gradient_accumulation_steps x processes): saved "
                        f"{a} x {b} x {c} = {a * b * c}, given {x} x {y} x {z} = {x * y * z}")
    return diff


INPUTS = ("model_name_or_path", "sft_model_path", "reward_model_path", "value_model_path")  # folders a run reads
_lock_file = None  # rank 0's open, locked OUT/.lock: the run owns its folder until its process ends (even killed)


def _lock(out):
    """Rank 0 takes an exclusive OS lock (flock; POSIX) on out/.lock until its process ends, naming itself in it;
    returns None, or the holder's line when another live process holds it (the OS frees a killed one's lock)."""
    global _lock_file
    import fcntl
    path = os.path.realpath(os.path.join(out, ".lock"))
    if _lock_file is not None and _lock_file.name != path:  # one run per process (tests call scripts in-process)
        _lock_file.close()
    elif _lock_file is not None:
        return None
    _lock_file = f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder, _lock_file = f.read().strip() or "another process", f.close()
        return holder
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, {os.path.basename(sys.argv[0])}, since {time.ctime()}\n")
    f.flush()


def require_steps(total_steps, why):  # a run of no step would save the initial model as the trained one
    if total_steps < 1:
        usage_error(f"{why}: the run would take no step (it would save the initial model as trained)")


def check_output_dir(args, world_size):
    """Refuse, before anything is loaded or deleted (on every rank, before any collective): an output folder
    that cannot be written; --resume of a run with another global batch or another value of a flag not in
    FREE_ON_RESUME (it would repeat or skip data), each difference named; a non-empty folder without
    --overwrite_output_dir, unless it holds a finished run of the same flags (a command run twice redoes
    it). Returns True when an old run is to be replaced (by start_run, once everything has loaded)."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        usage_error(f"--output_dir {out}: is a file, not a folder")
    for flag in INPUTS:  # the same folder after links and relative paths: training would overwrite its own input
        path = getattr(args, flag, "")
        if path and os.path.isdir(out) and os.path.exists(path) and os.path.samefile(path, out):
            usage_error(f"--output_dir {out} is the folder of --{flag} {path}: a run would overwrite the model it "
                        "reads; write to another folder")
    if why := unwritable(out):
        raise InputError(f"--output_dir {out}: cannot write there ({why})")
    holder = [_lock(out) if is_main() else None]
    if dist.is_initialized():  # every rank learns what rank 0 found (and has probed the folder before anyone
        dist.broadcast_object_list(holder, src=0)  # changes it)
    if holder[0]:
        raise InputError(f"--output_dir {out} is in use by a running run ({holder[0]}): wait for it to end, or use "
                         "another --output_dir")
    saved = None
    if os.path.exists(os.path.join(out, "args.json")):
        try:
            with open(os.path.join(out, "args.json")) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(f"{out}/args.json: unreadable ({e})") from e
    if args.resume:
        if saved is None or not checkpoints(out):
            raise InputError(f"--resume: no checkpoint in {out}")
        diff = _differences(saved, args, world_size, resume=True)
        if diff:
            raise InputError(f"--resume: {out} holds a run with other settings (resuming would repeat or skip data "
                             "or change the update):\n  " + "\n  ".join(diff))
        return False
    if not set(os.listdir(out)) - {".lock"}:  # (the broadcast above: no rank's probe is left)
        return False
    if args.overwrite_output_dir:
        return True
    if saved is not None and os.path.exists(os.path.join(out, COMPLETE)) and not _differences(saved, args,
                                                                                                world_size):
        print0(f"{out} holds a finished run of this same command: it will be replaced")
        return True
    kind = "another run" if saved is None else "an unfinished run, or one with other flags"
    raise InputError(f"{out} is not empty (it holds {kind}); pass --overwrite_output_dir to replace it, --resume "
                     "to continue it, or another --output_dir")


def start_run(args, world_size, replace):
    """Once everything has loaded: remove a replaced run's checkpoints and logs, write args.json (flags and
    number of processes, what --resume checks); the peak memory counts from here (training, not loading)."""
    _peak_memory(reset=True)
    signal.signal(signal.SIGTERM, lambda *_: _sigterm.append(1))  # finish the step, checkpoint, exit (see preempted)
    out = args.output_dir
    if is_main():
        for name in os.listdir(out) if replace else []:  # (check_output_dir made the folder)
            if name.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(out, name))
            elif name in LOGS or name == COMPLETE:
                os.remove(os.path.join(out, name))
        with open(os.path.join(out, "args.json.tmp"), "w") as f:
            json.dump({**asdict(args), "world_size": world_size}, f, indent=1)
        os.replace(os.path.join(out, "args.json.tmp"), os.path.join(out, "args.json"))
    if dist.is_initialized():
        dist.barrier()  # rank 0 is done cleaning before anyone writes


def _peak_memory(reset=False):
    """Bytes since the last reset: the accelerator's peak allocation, or on a CPU the peak resident set size (Linux:
    VmHWM, reset by writing 5 to clear_refs; elsewhere None)."""
    import torch
    if torch.cuda.is_available():
        return torch.cuda.reset_peak_memory_stats() if reset else torch.cuda.max_memory_allocated()
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                return f.write("5") and None
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def finish_run(output_dir, step):
    """Mark the run complete, with the largest peak memory of any rank during training (what
    benchmarks/memory_plan.py --validate and gpu_check.py compare with the plan; see _peak_memory)."""
    peak = _peak_memory()  # a collective: every rank stays until all are done with collectives (a gloo rank that
    peak = peak and int(all_reduce_metrics({"peak": peak}, op="max")["peak"])  # left first aborted one's teardown)
    if is_main():
        with open(os.path.join(output_dir, COMPLETE), "w") as f:
            json.dump({"step": step, "peak_memory_bytes": peak}, f)


def append_jsonl(output_dir, name, records):
    """Rank 0 appends one JSON object per record to output_dir/name."""
    if is_main():
        with open(os.path.join(output_dir, name), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


_sigterm = []  # set by the SIGTERM handler start_run installs: a scheduler's preemption notice


def preempted():
    """Whether any rank has received SIGTERM (a collective, once per step: every rank stops after the same step)."""
    return all_reduce_metrics({"sigterm": float(bool(_sigterm))}, op="max")["sigterm"] > 0


def save_training_state(output_dir, step, model, optimizer, scheduler, keep=2, extra=None, stop=False):
    """Checkpoint everything a resume needs (save_checkpoint: sharded model and optimizer state, each rank's
    RNG) with the scheduler, the step, the number of processes and rank 0's `extra` (e.g. a logging window).
    With stop (preempted), then exit 143 saying how to resume. A collective: call on all ranks; keep = 0 keeps
    every checkpoint."""
    trainer = {"scheduler": scheduler.state_dict(), "step": step, "extra": extra or {},
               "world_size": dist.get_world_size() if dist.is_initialized() else 1}
    save_checkpoint(output_dir, step, model, optimizer, trainer, keep=keep)
    if stop:
        print0(f"\nSIGTERM: stopped after step {step}, its checkpoint written in {output_dir}; to continue, run the "
               "same command with --resume")
        raise SystemExit(143)


def load_training_state(output_dir, model, optimizer, scheduler, extra=None):
    """Restore the newest intact checkpoint, resharded to this run's number of processes (check_output_dir has
    refused another global batch). Log records after its step and a line torn by a kill are dropped (the resumed
    run rewrites them). Returns the step; saved `extra` goes into `extra`."""
    bad = []  # the newest checkpoint that loads; an older one, said so, when a kill tore the newest
    for path in checkpoints(output_dir):
        try:
            state, rng = load_checkpoint(path, model, optimizer)
            break
        except InputError as e:
            bad.append(str(e))
    else:
        raise InputError(f"--resume: no intact checkpoint in {output_dir} (" + "; ".join(bad) + ")")
    if bad:
        print0("skipping unreadable checkpoints (" + "; ".join(bad) + f"): resuming from {path}")
    scheduler.load_state_dict(state["scheduler"])
    if rng is not None:
        set_rng_state(rng)
    else:  # the rollouts and shuffles take their own seeds: only the global RNG's stream differs
        print0(f"{path} was written by {state['world_size']} processes: resharded; each rank's RNG starts afresh")
    if extra is not None:
        extra.update(state.get("extra", {}))
    step = state["step"]
    if is_main():
        for name in (n for n in LOGS if os.path.exists(os.path.join(output_dir, n))):
            keep = []
            with open(os.path.join(output_dir, name)) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= step:
                            keep.append(line)
                    except (ValueError, KeyError, TypeError):
                        pass  # a line torn by a kill mid-append
            with open(os.path.join(output_dir, name), "w") as f:
                f.writelines(keep)
    if dist.is_initialized():
        dist.barrier()
    print0(f"resumed from {path} at step {step}")
    return step

"""An output directory per run: guard it, log to it, checkpoint into it, resume from it. A run calls
`check_output_dir` (refusals only), loads data and models, `start_run` (the only place an old run's
state is removed), trains, saves, and `finish_run` (marks the run complete)."""
import json
import os
import shutil
from dataclasses import asdict

import torch.distributed as dist

from .config import InputError, usage_error
from .dist import checkpoints, full_state_dict, is_main, load_checkpoint, load_full_state_dict, print0, rng_state, \
    save_checkpoint, set_rng_state

# flags that change neither the data a step sees nor the update it makes: free to differ on --resume
FREE_ON_RESUME = {"output_dir", "overwrite_output_dir", "resume", "logging_steps", "eval_steps", "save_steps",
                  "save_total_limit", "num_eval_prompts", "num_sample_generations", "per_device_eval_batch_size",
                  "gradient_checkpointing", "sharded_generation"}
COMPLETE = "run_complete.json"  # written after the final model: the run in this folder finished


def _differences(saved, args, world_size):
    given = {**asdict(args), "world_size": world_size}
    return [f"--{k}: saved {saved.get(k)!r}, given {given.get(k)!r}".replace("--world_size", "number of processes")
            for k in sorted({*saved, *given}) if k not in FREE_ON_RESUME and saved.get(k) != given.get(k)]


def check_output_dir(args, world_size):
    """Refuse, before anything is loaded or deleted (on every rank, before any collective): an output folder
    that cannot be written; --resume of a run with another number of processes or another value of a flag
    not in FREE_ON_RESUME (it would repeat or skip data), each difference named; a non-empty folder without
    --overwrite_output_dir, unless it holds a finished run of the same flags (a command run twice redoes
    it). Returns True when an old run is to be replaced (by start_run, once everything has loaded)."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        usage_error(f"--output_dir {out}: is a file, not a folder")
    probe = os.path.join(out, f".probe-{os.getpid()}")  # writable? (access() says yes to root on read-only mounts)
    try:
        os.makedirs(out, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise InputError(f"--output_dir {out}: cannot write there ({e.strerror or e})") from e
    if dist.is_initialized():
        dist.barrier()  # every rank has probed and read the folder before anyone changes it
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
        diff = _differences(saved, args, world_size)
        if diff:
            raise InputError(f"--resume: {out} holds a run with other settings (resuming would repeat or skip data "
                             "or change the update):\n  " + "\n  ".join(diff))
        return False
    if not os.listdir(out):  # (the barrier above: no rank's probe is left)
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
    number of processes, what --resume checks)."""
    out = args.output_dir
    if is_main():
        for name in os.listdir(out) if replace else []:  # (check_output_dir made the folder)
            if name.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(out, name))
            elif name.endswith(".jsonl") or name == COMPLETE:
                os.remove(os.path.join(out, name))
        with open(os.path.join(out, "args.json.tmp"), "w") as f:
            json.dump({**asdict(args), "world_size": world_size}, f, indent=1)
        os.replace(os.path.join(out, "args.json.tmp"), os.path.join(out, "args.json"))
    if dist.is_initialized():
        dist.barrier()  # rank 0 is done cleaning before anyone writes


def finish_run(output_dir, step):
    if is_main():
        with open(os.path.join(output_dir, COMPLETE), "w") as f:
            json.dump({"step": step}, f)


def append_jsonl(output_dir, name, records):
    """Rank 0 appends one JSON object per record to output_dir/name."""
    if is_main():
        with open(os.path.join(output_dir, name), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


def save_training_state(output_dir, step, model, optimizer, scheduler, keep=2, extra=None):
    """Checkpoint everything a resume needs: full model and optimizer state, scheduler, step, every
    rank's RNG and rank 0's `extra` (e.g. a logging window). A collective: call on all ranks; rank 0
    writes (atomically, see save_checkpoint); keep = 0 keeps every checkpoint."""
    model_state, optim_state = full_state_dict(model, optimizer)
    rngs = [rng_state()]
    if dist.is_initialized():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state())
    save_checkpoint(output_dir, step, {"model": model_state, "optimizer": optim_state, "rng": rngs,
                                       "scheduler": scheduler.state_dict(), "step": step,
                                       "extra": extra or {}}, keep=keep)


def load_training_state(output_dir, model, optimizer, scheduler, extra=None):
    """Restore the newest intact checkpoint: each rank reads it (the output folder is shared, as --resume's
    checks need) and keeps its shard (FSDP2) or a full copy (DDP). Log records after its step and a line torn
    by a kill are dropped (the resumed run rewrites them). Returns the step; saved `extra` goes into `extra`."""
    bad = []  # the newest checkpoint that loads; an older one, said so, when a kill tore the newest
    for path in checkpoints(output_dir):
        try:
            state = load_checkpoint(path)
            break
        except InputError as e:
            bad.append(str(e))
    else:
        raise InputError(f"--resume: no intact checkpoint in {output_dir} (" + "; ".join(bad) + ")")
    if bad:
        print0("skipping unreadable checkpoints (" + "; ".join(bad) + f"): resuming from {path}")
    try:
        load_full_state_dict(model, optimizer, state["model"], state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise InputError(f"{path}: checkpoint does not match this model ({type(e).__name__}: {e})") from e
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][dist.get_rank() if dist.is_initialized() else 0])
    if extra is not None:
        extra.update(state.get("extra", {}))
    step = state["step"]
    if is_main():
        for name in (n for n in os.listdir(output_dir) if n.endswith(".jsonl")):
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

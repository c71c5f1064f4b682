"""An output directory per run: guard it, log to it, checkpoint into it, resume from it."""
import json
import os
import shutil
from dataclasses import asdict

import torch.distributed as dist

from .dist import (full_state_dict, is_main, latest_checkpoint, load_checkpoint, load_full_state_dict, print0,
                   rng_state, save_checkpoint, set_rng_state)


# flags that change neither the data a step sees nor the update it makes: free to differ on --resume
FREE_ON_RESUME = {"output_dir", "overwrite_output_dir", "resume", "logging_steps", "eval_steps", "save_steps",
                  "save_total_limit", "num_eval_prompts", "num_sample_generations", "per_device_eval_batch_size",
                  "gradient_checkpointing"}


def prepare_output_dir(args, world_size):
    """Refuse to mix runs. With args.resume, output_dir must hold a checkpoint of a run with the same number
    of processes and the same value of every flag but FREE_ON_RESUME (anything else would repeat or skip
    data, or change the update); each difference is named. Otherwise a non-empty output_dir needs
    args.overwrite_output_dir (its checkpoints and .jsonl logs are removed; model files are replaced at
    the end). SystemExit on refusal, on every rank, before any collective."""
    out, args_file = args.output_dir, os.path.join(args.output_dir, "args.json")
    if args.resume:
        if not os.path.exists(args_file) or latest_checkpoint(out) is None:
            raise SystemExit(f"--resume: no checkpoint in {out}")
        with open(args_file) as f:
            saved = json.load(f)
        given = {**asdict(args), "world_size": world_size}
        diff = [f"--{k}: saved {saved.get(k)!r}, given {given.get(k)!r}" for k in sorted({*saved, *given})
                if k not in FREE_ON_RESUME and saved.get(k) != given.get(k)]
        diff = [d.replace("--world_size", "number of processes") for d in diff]
        if diff:
            raise SystemExit(f"--resume: {out} holds a run with other settings (resuming would repeat or skip data "
                             "or change the update):\n  " + "\n  ".join(diff))
    elif os.path.isdir(out) and os.listdir(out):
        if not args.overwrite_output_dir:
            raise SystemExit(f"{out} is not empty (it holds another run); pass --overwrite_output_dir to replace it "
                             "or --resume to continue it")
        if is_main():
            for name in os.listdir(out):
                if name.startswith("checkpoint-"):
                    shutil.rmtree(os.path.join(out, name))
                elif name.endswith(".jsonl"):
                    os.remove(os.path.join(out, name))
    if dist.is_initialized():
        dist.barrier()  # rank 0 is done cleaning before anyone writes
    os.makedirs(out, exist_ok=True)


def write_args(args, world_size):
    """Rank 0 writes output_dir/args.json: every flag and the number of processes (what --resume checks)."""
    if is_main():
        path = os.path.join(args.output_dir, "args.json")
        with open(path + ".tmp", "w") as f:
            json.dump({**asdict(args), "world_size": world_size}, f, indent=1)
        os.replace(path + ".tmp", path)


def append_jsonl(output_dir, name, records):
    """Rank 0 appends one JSON object per record to output_dir/name."""
    if is_main():
        with open(os.path.join(output_dir, name), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


def save_training_state(output_dir, step, model, optimizer, scheduler, keep=2, extra=None):
    """Checkpoint everything a resume needs: full model and optimizer state, scheduler, step, every
    rank's RNG and rank 0's `extra` (e.g. a logging window). A collective: call on all ranks; rank 0
    writes (atomically, see save_checkpoint)."""
    model_state, optim_state = full_state_dict(model, optimizer)
    rngs = [rng_state()]
    if dist.is_initialized():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state())
    save_checkpoint(output_dir, step, {"model": model_state, "optimizer": optim_state, "rng": rngs,
                                       "scheduler": scheduler.state_dict(), "step": step,
                                       "extra": extra or {}}, keep=keep)


def load_training_state(output_dir, model, optimizer, scheduler, extra=None):
    """Restore the newest checkpoint on every rank (rank 0 reads and broadcasts); drop log records
    written after it, which the resumed run writes again. Returns the step to continue from; the saved
    `extra` is put into the dict `extra` when one is given."""
    path = latest_checkpoint(output_dir)
    state = load_checkpoint(path) if is_main() else {}
    box = [state.get("step"), state.get("scheduler"), state.get("rng"), state.get("extra", {})]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    step, sched_state, rngs, saved_extra = box
    if extra is not None:
        extra.update(saved_extra)
    try:
        load_full_state_dict(model, optimizer, state.get("model", {}), state.get("optimizer", {}))
    except (KeyError, RuntimeError, ValueError) as e:
        raise SystemExit(f"{path}: checkpoint does not match this model ({type(e).__name__}: {e})") from e
    scheduler.load_state_dict(sched_state)
    set_rng_state(rngs[dist.get_rank() if dist.is_initialized() else 0])
    if is_main():
        for name in (n for n in os.listdir(output_dir) if n.endswith(".jsonl")):
            with open(os.path.join(output_dir, name)) as f:
                keep = [line for line in f if json.loads(line)["step"] <= step]
            with open(os.path.join(output_dir, name), "w") as f:
                f.writelines(keep)
    print0(f"resumed from {path} at step {step}")
    return step

"""Distributed plumbing: process group, rank-0 printing, metric all-reduce, saving, checkpoints."""
import ctypes
import datetime
import glob
import json
import math
import os
import random
import shutil
import signal
import sys

import torch
import torch.distributed as dist

from .config import InputError, writing


def init_distributed():
    """(rank, world_size, device). Under torchrun: nccl on GPU, gloo on CPU. Otherwise one process.

    On CPU without OMP_NUM_THREADS, one intra-op thread: small models run fastest that way, and two
    threads next to any other load were measured 10-40x slower on a 2-core machine.
    """
    cuda = torch.cuda.is_available()
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    if cuda:  # TF32 matmuls for float32 (without --bf16): ~8x the throughput at 10 mantissa bits, as HF's --tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    if sys.platform == "linux":  # die with the launcher: a kill -9 of torchrun leaves no orphan ranks
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # a save of a large model by some ranks can keep the others waiting in a collective for long: 60 minutes,
    # where NCCL's default (10) would kill the job mid-checkpoint
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                            timeout=datetime.timedelta(minutes=60))
    return dist.get_rank(), dist.get_world_size(), device


def shutdown():
    """End a torchrun process after its last collective without the interpreter's teardown (os._exit), where a gloo
    rank under load was seen to abort ("terminate called without an active exception") with all its work written."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_metrics(metrics, op="mean"):
    """{name: scalar} -> {name: float} reduced over ranks ("mean", "sum", "min", "max") in one call;
    every rank passes the same keys (sorted, so the order agrees)."""
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    if dist.is_initialized():
        t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op={"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}.get(op, dist.ReduceOp.SUM))
        if op == "mean":
            t = t / dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def check_finite(step, **values):
    """Stop every rank together, before anything is written, when a value of this step (loss, gradient norm,
    scores) is NaN or infinite. A collective: every rank calls it at the same point."""
    local = {k: float(not torch.isfinite(torch.as_tensor(v.full_tensor() if hasattr(v, "full_tensor") else v,
                                                         dtype=torch.float64)).all()) for k, v in values.items()}
    bad = [k for k, v in all_reduce_metrics(local, op="max").items() if v]
    if bad:
        raise SystemExit(f"step {step}: non-finite {' and '.join(bad)}; stopped without saving (checkpoints and model "
                         "files untouched). Lower --learning_rate, keep --max_grad_norm > 0, check the reward, flags")


def global_mean_var(x):
    """(mean, unbiased variance) of x over all ranks, float64, two passes, ddof=1 as TRL's whiten (E[x^2] - mean^2
    in float32 gave std 0.0812 for scores at offset 300 with std 0.1013)."""
    x = x.detach().double().reshape(-1)
    s = all_reduce_metrics({"n": x.numel(), "s": x.sum().item()}, op="sum")
    mean = s["s"] / s["n"]
    ss = all_reduce_metrics({"ss": ((x - mean) ** 2).sum().item()}, op="sum")["ss"]
    return mean, ss / max(s["n"] - 1, 1)


def global_whiten(x, eps=1e-8, shift_mean=True):
    """(x - mean) / sqrt(var + eps) with the statistics of all ranks (TRL used each rank's own); with
    shift_mean False the mean is added back (only the scale changes, TRL's whiten_rewards)."""
    mean, var = global_mean_var(x)
    return ((x.double() - mean) / math.sqrt(var + eps) + (0.0 if shift_mean else mean)).to(x.dtype)


def transformer_blocks(model):
    """The repeated blocks FSDP2 shards one by one: the first ModuleList (Llama/Qwen2 `model.layers`,
    GPT-2 `transformer.h`, BERT `encoder.layer`)."""
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m):
            return list(m)
    raise ValueError(f"{type(model).__name__}: no list of transformer blocks found to shard")


def shard(model, bf16=False):
    """FSDP2 (--fsdp): fully_shard each transformer block, then the root, on a model still on the CPU: FSDP2 moves
    one block at a time to the device and keeps this rank's shard, so no full copy ever sits on an accelerator.
    With bf16, FSDP2's MixedPrecisionPolicy (parameters all-gathered and used in bf16, gradients reduced in
    float32) replaces autocast. Frozen models (reference, reward model) are sharded alike: each rank holds 1/N of
    their weights and runs the same forwards as the others."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def full_state_dict(model):
    """Full, unsharded CPU state dict of a plain, DDP or FSDP2 model, keyed by parameter name, for export
    (save_pretrained): weights only, never the optimizer. A collective under torchrun; rank 0 gets it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _adapter_base(path):
    """(base model, its gguf_file) of a LoRA adapter folder (adapter_config.json, no config.json), else None."""
    file = lambda name: os.path.join(os.path.expanduser(path), name)  # noqa: E731
    if not os.path.exists(file("adapter_config.json")) or os.path.exists(file("config.json")):
        return None
    with open(file("adapter_config.json")) as f:
        base = json.load(f)["base_model_name_or_path"]
    run = {}  # a train_*.py --use_peft run: its args.json says which GGUF file the base was read from
    if os.path.exists(file("args.json")):
        with open(file("args.json")) as f:
            run = json.load(f)
    return base, run.get("gguf_file")


def _check_model_path(path, gguf_file=None):
    where = os.path.expanduser(path)
    if os.path.isdir(where) and not gguf_file and not os.path.exists(os.path.join(where, "config.json")) and \
            not _adapter_base(path):
        raise InputError(f"{path}: no config.json in this folder, so it is not a Hugging Face model folder")
    if gguf_file and not os.path.exists(os.path.join(where, gguf_file)) and os.path.isdir(where):
        raise InputError(f"{path}: no file {gguf_file} in this folder")
    if not os.path.exists(where) and (path.startswith((".", os.sep, "~")) or path.count("/") > 1):
        raise InputError(f"{path}: no such folder")


def load_tokenizer(path, gguf_file=None):
    """AutoTokenizer.from_pretrained with a clear error; pad = EOS (or UNK) when missing (masks say what is real)."""
    from transformers import AutoTokenizer
    _check_model_path(path, gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {e})") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_hf(auto_class, path, gguf_file=None, dtype=torch.float32, **kwargs):
    """auto_class.from_pretrained(path, gguf_file=...) in `dtype`, float32 by default whatever the checkpoint
    holds (transformers 5 loads dtype="auto": AdamW on bf16 weights drops most small updates); bfloat16 is
    for frozen models under GPU autocast. A dequantized GGUF checkpoint loses its quantized mark (HF would
    refuse to save it)."""
    _check_model_path(path, gguf_file)
    if adapter := _adapter_base(path):  # a LoRA adapter (train_*.py --use_peft): its base with the adapter merged in
        from peft import PeftModel
        base, gguf = adapter
        if "SequenceClassification" in auto_class.__name__:
            kwargs.setdefault("num_labels", 1)  # a reward model's adapter: the saved head has one label
        model = PeftModel.from_pretrained(load_hf(auto_class, base, gguf, dtype, **kwargs), path).merge_and_unload()
        model.config.architectures = [type(model).__name__]
        return model
    try:
        model = auto_class.from_pretrained(path, gguf_file=gguf_file, dtype=dtype, **kwargs)
    except OSError as e:  # not a local folder, and the hub is out of reach or has no such model
        raise InputError(f"{path}: cannot load ({e})") from e
    kinds = model.config.architectures or []
    if auto_class.__name__ == "AutoModelForCausalLM" and kinds and all("ForSequenceClassification" in k
                                                                         for k in kinds):
        raise InputError(f"{path}: a sequence classifier ({kinds[0]}, a reward model?), not a causal LM policy")
    if gguf_file and getattr(model, "hf_quantizer", None) is not None:
        if not all(p.is_floating_point() for p in model.parameters()):
            raise ValueError(f"{path}/{gguf_file}: weights stayed packed GGUF blocks, which cannot be trained")
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    return model


def rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier():
    if dist.is_initialized():
        dist.barrier()


OLD_FORMAT = ("holds a checkpoint of the single-file format (state.pt) of nanorlhf before sharded checkpoints; this "
              "version cannot resume it: start the run again (or finish it with the nanorlhf that wrote it)")


def save_checkpoint(output_dir, step, model, optimizer, trainer, keep=2):
    """Checkpoint model and optimizer with torch.distributed.checkpoint (DCP): every rank writes its own shards
    (FSDP2: its shard of every parameter and AdamW state; DDP: what is replicated is written once, by rank 0), so no
    process ever holds the full state. Beside them: rng-<rank>.pt (each rank's RNG) and trainer.pt (rank 0's
    `trainer`: scheduler, step, ...). All of it goes into checkpoint-<step>.tmp, renamed once every rank has
    finished, so a kill mid-save leaves the previous checkpoint the newest. Keeps the newest `keep` (0: all).
    A collective: call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = os.path.join(output_dir, f"checkpoint-{step:08d}")
    tmp = final + ".tmp"
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)  # sharded under FSDP2: DTensors, no gather
    with writing(tmp):
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp, no_dist=not dist.is_initialized(),
                 planner=dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=True))
        torch.save(rng_state(), os.path.join(tmp, f"rng-{dist.get_rank() if dist.is_initialized() else 0:05d}.pt"))
        if is_main():
            torch.save(trainer, os.path.join(tmp, "trainer.pt"))
    _barrier()  # every rank's files are in place
    if is_main():
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in checkpoints(output_dir)[keep:] if keep > 0 else []:
            shutil.rmtree(old)
    _barrier()


def checkpoints(output_dir):  # complete checkpoint folders (not .tmp ones), newest first
    return sorted(glob.glob(os.path.join(output_dir, "checkpoint-*[0-9]")), reverse=True)


def load_checkpoint(path, model, optimizer):
    """Load a save_checkpoint folder into model and optimizer, resharded to this run's processes (DCP reads each
    rank's part of every tensor, whatever the number of processes that wrote it). Returns (trainer state, this
    rank's RNG state, or None when the checkpoint was written by another number of processes). A clear error
    (InputError) when it is missing, torn or of the old format. A collective: call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    files = os.listdir(path) if os.path.isdir(path) else []
    if "state.pt" in files:
        raise InputError(f"{path}: {OLD_FORMAT}")
    try:
        trainer = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=True)
        model_state, optim_state = get_state_dict(model, optimizer)  # this run's layout (and AdamW state created)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        same = trainer.get("world_size") == world
        rng = torch.load(os.path.join(path, f"rng-{rank:05d}.pt"), weights_only=False) if same else None
    except (Exception, CheckpointException) as e:  # (DCP's CheckpointException, raised on every rank, is no Exception)
        raise InputError(f"{path}: cannot load checkpoint ({type(e).__name__}: {str(e)[-300:]})") from e
    return trainer, rng

"""One small dataclass -> command line parser shared by every script.

`--name value` and `--name=value`; types from the annotations (int, float, str, bool, `X | None`, and
`list[X]`: `--name a b c`); bools accept `--flag`, `--flag true|false`; `--help` prints each field's docstring
(the string literal under the field) and default; unknown flags are rejected with the valid list. And what a user
sees of a bad input: InputError, usage_error, clean_errors, and `writing` (a full disk said in one line).
"""
import argparse
import ast
import contextlib
import dataclasses
import errno
import importlib.util
import inspect
import math
import os
import shutil
import sys
import types
import typing

import torch.distributed as dist


def _docstrings(cls):
    """{field: docstring} from the string literal right below each annotated field."""
    body, docs = ast.parse(inspect.getsource(cls)).body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


class InputError(ValueError):
    """A bad input (file, row, field, model folder, checkpoint, output folder): one message, exit code 1."""


def usage_error(message):
    """A bad flag value: `prog: error: message` on stderr and exit code 2, as argparse does."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# what every script's flags must satisfy, by name (a script checks the ones it has)
NONNEG = ("learning_rate", "max_grad_norm", "weight_decay", "eval_steps", "save_steps", "save_total_limit",
          "kl_coef", "missing_eos_penalty", "center_rewards_coefficient", "num_sample_generations", "num_eval_prompts",
          "vf_coef", "vf_learning_rate", "cliprange_value")
POSITIVE = ("lora_r", "lora_alpha", "logging_steps", "adam_epsilon", "num_train_epochs", "per_device_train_batch_size",
            "per_device_eval_batch_size", "gradient_accumulation_steps", "local_rollout_forward_batch_size",
            "num_mini_batches", "num_ppo_epochs", "response_length", "max_new_tokens", "temperature", "cliprange",
            "reward_clip_range", "max_length", "max_prompt_length")
FRACTION = ("warmup_ratio", "eval_fraction", "gamma", "lam", "lora_dropout")


def check_flags(args):
    """Usage error naming the first flag out of range: NONNEG >= 0, POSITIVE > 0, FRACTION in [0, 1]; None
    (off) passes. --fsdp needs torchrun; --sharded_generation needs --fsdp; --report_to trackers must exist and
    be installed."""
    for names, ok, what in ((NONNEG, lambda v: v >= 0, ">= 0"), (POSITIVE, lambda v: v > 0, "> 0"),
                            (FRACTION, lambda v: 0 <= v <= 1, "in [0, 1]")):
        for name in names:
            value = getattr(args, name, None)
            if value is not None and not ok(value):
                usage_error(f"--{name} {value}: must be {what}")
    if getattr(args, "fsdp", False) and "WORLD_SIZE" not in os.environ:
        usage_error(f"--fsdp shards the model over processes: launch with torchrun, e.g. torchrun --standalone "
                    f"--nproc_per_node 2 {os.path.basename(sys.argv[0])} --fsdp")
    if getattr(args, "sharded_generation", False) and not getattr(args, "fsdp", False):
        usage_error("--sharded_generation chooses how an FSDP2-sharded policy samples: it needs --fsdp")
    if getattr(args, "use_peft", False) and getattr(args, "fsdp", False):
        usage_error("--use_peft with --fsdp: LoRA runs under DDP (the adapter is small); drop one of them")
    if getattr(args, "use_peft", False) and importlib.util.find_spec("peft") is None:
        usage_error('--use_peft needs peft: pip install -e ".[peft]" (or pip install peft)')
    for name in getattr(args, "report_to", []):  # at start, never after an hour of training
        if name not in ("none", "wandb", "tensorboard", "trackio"):
            usage_error(f"--report_to {name}: use none, wandb, tensorboard or trackio (several allowed)")
        if name != "none" and importlib.util.find_spec(name) is None:
            usage_error(f"--report_to {name}: {name} is not installed; run pip install -e \".[{name}]\" "
                        f"(or pip install {name})")


def parse_schedule(flag, text, lo, hi):
    """A flag that is a number or 'start:end' -> f(fraction of training done), linear from start to end;
    both values finite and in [lo, hi], else a usage error naming the flag."""
    parts = str(text).split(":")
    try:
        if len(parts) > 2:
            raise ValueError(text)
        start, end = float(parts[0]), float(parts[-1])
    except ValueError:
        usage_error(f"--{flag} {text!r}: expected a number or 'start:end'")
    if not (math.isfinite(start) and math.isfinite(end)):
        usage_error(f"--{flag} {text}: values must be finite")
    if not (lo <= start <= hi and lo <= end <= hi):
        usage_error(f"--{flag} {text}: values must be in [{lo}, {hi}]")
    return lambda frac: start + (end - start) * frac


def apply_defaults(args, defaults, argv=None):
    """Set recommended settings on the flags not given (a given --num_train_epochs also keeps a recommended
    max_steps / total_episodes away): any flag given wins. Returns what was set."""
    given = given_flags(argv)
    if "num_train_epochs" in given:
        given |= {"max_steps", "total_episodes"}
    changed = {k: v for k, v in defaults.items() if k not in given}
    for k, v in changed.items():
        setattr(args, k, v)
    return changed


def clean_errors():
    """Every script's first call: an uncaught InputError or OSError (bad file, read-only folder, hub out of reach),
    or a peer rank stopping first, prints `prog: error: message` alone and exits 1; bugs keep their traceback."""
    def hook(kind, value, tb):
        if dist.is_initialized() and "closed by peer" in str(value):  # a peer stopped first (it says why)
            value = f"rank {dist.get_rank()} stops: another rank stopped first (its error is above)"
        elif not issubclass(kind, (InputError, OSError)):
            return sys.__excepthook__(kind, value, tb)
        print(f"{os.path.basename(sys.argv[0])}: error: {value}", file=sys.stderr, flush=True)
    sys.excepthook = hook


def number(text):
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _bool(text):
    if text.lower() not in BOOLS:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return BOOLS[text.lower()]


def _converter(tp):
    """(type function, is_bool) for an annotation; `X | None` also accepts the word 'none'; `list[X]` an X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return _converter(args[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        inner, _ = _converter(args[0])
        return (lambda s: None if s.lower() == "none" else inner(s)), False
    return (_bool, True) if tp is bool else (number if tp is float else tp, False)


def parse_args(cls, argv=None, description=None):
    """Parse argv (default sys.argv[1:]) into an instance of the dataclass `cls`."""
    hints, docs = typing.get_type_hints(cls), _docstrings(cls)
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        conv, is_bool = _converter(hints[f.name])
        extra = {"nargs": "?", "const": True} if is_bool else {}
        if typing.get_origin(hints[f.name]) is list:  # --name a b c
            extra = {"nargs": "+"}
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        parser.add_argument(f"--{f.name}", type=conv, default=default, help=docs.get(f.name, " "),
                            metavar=f.name.upper() if not is_bool else "BOOL", **extra)
    ns, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if unknown:
        valid = " ".join(f"--{f.name}" for f in dataclasses.fields(cls))
        parser.error(f"unknown argument(s) {' '.join(unknown)}; valid flags: {valid}")
    return cls(**vars(ns))


def given_flags(argv=None):
    """Names of the flags present on the command line (so built-in defaults never override them)."""
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}


@contextlib.contextmanager
def writing(tmp):
    """Around a write into the temporary folder `tmp`: a full disk (ENOSPC, or PyTorch's "file write failed" and
    safetensors' I/O errors with no free space left) removes `tmp` and ends in one line saying so; the checkpoint
    and model already in place are untouched. Any other error keeps its traceback."""
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        yield
    except (Exception, CheckpointException) as e:  # (DCP's CheckpointException is no Exception)
        parent = os.path.dirname(os.path.abspath(tmp))
        if not (getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
                or shutil.disk_usage(parent).free < 2**20):
            raise
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"disk full writing {tmp} ({shutil.disk_usage(parent).free / 2**20:.1f} MB free): removed "
                         "it; the checkpoints and model already there are kept. Free space, then --resume") from e


def unwritable(folder):
    """Why `folder` cannot be written (a file is made there: access() says yes to root on read-only mounts)."""
    probe = os.path.join(folder, f".probe-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        return e.strerror or str(e)

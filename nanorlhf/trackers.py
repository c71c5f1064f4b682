"""The experiment trackers of --report_to (wandb, tensorboard, trackio): started before a run deletes anything,
and never allowed to lose a record silently."""
import json
import os
import socket
from dataclasses import asdict
from urllib.parse import urlparse

import torch.distributed as dist

from .config import unwritable, usage_error
from .dist import is_main, print0
from .runs import append_jsonl


def _unreachable(names):
    """Why a --report_to tracker cannot log (None if nothing we can see): a wandb server that does not answer
    within 3 s (wandb.init would wait ~90 s), a trackio store that cannot be written (trackio would drop records)."""
    if "wandb" in names and os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled", "dryrun"):
        url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
        port = url.port or (80 if url.scheme == "http" else 443)
        try:
            socket.create_connection((url.hostname, port), timeout=3).close()
        except OSError as e:
            return f"cannot reach {url.hostname} ({e.strerror or e}); set WANDB_MODE=offline to log locally"
    if "trackio" in names:
        from trackio.utils import TRACKIO_DIR
        if why := unwritable(TRACKIO_DIR):
            return f"cannot write its store {TRACKIO_DIR} ({why}); set TRACKIO_DIR to a writable folder"


class Tracker:
    """Where a run's records go: output_dir/metrics.jsonl and samples.jsonl always, and on rank 0 the trackers of
    --report_to (wandb, tensorboard, trackio) with the same names at the same step, the run's arguments as their
    config and sample tables as their table type. Started when made, before start_run cleans the folder; each
    reads its own environment (WANDB_PROJECT / WANDB_ENTITY / WANDB_MODE, TRACKIO_PROJECT, ...)."""

    def __init__(self, args):  # a collective: every rank refuses together if rank 0's trackers cannot start
        self.args, self.out, self.open = args, args.output_dir, {}
        self.names = [n for n in getattr(args, "report_to", []) if n != "none"] if is_main() else []
        self.run_name = getattr(args, "run_name", "") or os.path.basename(os.path.normpath(args.output_dir))
        failed = [_unreachable(self.names)]
        try:
            failed[0] or not self.names or self._start()
        except Exception as e:  # the tracker's own error (no API key, a server that is not wandb's), in one line
            failed[0] = f"cannot start ({type(e).__name__}: {str(e).strip()})"
        if dist.is_initialized():
            dist.broadcast_object_list(failed, src=0)
        if failed[0]:
            usage_error(f"--report_to {' '.join(getattr(args, 'report_to', []))}: {failed[0].splitlines()[0]}")

    def _start(self):
        self.open, config = {}, asdict(self.args)  # (rank 0 only: the others have no names)
        if "wandb" in self.names:  # the modules' own log / Table / finish act on the run they started
            import wandb
            wandb.init(project=os.environ.get("WANDB_PROJECT", "nanorlhf"), name=self.run_name, config=config,
                       dir=self.out)
            self.open["wandb"] = wandb
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter
            self.open["tensorboard"] = SummaryWriter(os.path.join(self.out, "tensorboard", self.run_name))
            self.open["tensorboard"].add_text("args", "    " + json.dumps(config, indent=1).replace("\n", "\n    "))
        if "trackio" in self.names:
            import trackio
            trackio.init(project=os.environ.get("TRACKIO_PROJECT", "nanorlhf"), name=self.run_name, config=config)
            self.open["trackio"] = trackio

    def _each(self, send):
        """send(name, tracker) for each open tracker; one that fails says so once, in one line, and is closed
        (the records stay in metrics.jsonl / samples.jsonl)."""
        for name, t in list(self.open.items()):
            try:
                send(name, t)
            except Exception as e:  # a tracker's own failure (disk, network, its server): the run goes on
                print0(f"--report_to {name}: stopped logging ({type(e).__name__}: {e}); the records go on in "
                       f"{self.out}/metrics.jsonl")
                del self.open[name]

    def log(self, record):
        """One metric record {"step": n, name: number, ...}."""
        append_jsonl(self.out, "metrics.jsonl", [record])
        step, scalars = record["step"], {k: float(v) for k, v in record.items() if k != "step"}
        if self.names:
            self._each(lambda name, t: [t.add_scalar(k, v, step) for k, v in scalars.items()] if name == "tensorboard"
                       else t.log(scalars, step=step))

    def table(self, rows):
        """A table of samples (a list of dicts with the same keys, one of them "step")."""
        append_jsonl(self.out, "samples.jsonl", rows)
        if self.names and rows:
            step, cols = rows[0]["step"], [k for k in rows[0] if k != "step"]
            data = [[r[k] for k in cols] for r in rows]
            text = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "\n".join(
                "| " + " | ".join(str(x).replace("|", "/") for x in row) + " |" for row in data)
            self._each(lambda name, t: t.add_text("samples", text, step) if name == "tensorboard"
                       else t.log({"samples": t.Table(columns=cols, data=data)}, step=step))

    def finish(self):
        self._each(lambda name, t: t.close() if name == "tensorboard" else t.finish())

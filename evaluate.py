"""Is the trained policy better than the one it started from, by how much, at what KL? Win rates with 95%
intervals against a baseline, and the pictures: learning curves and the reward-KL frontier.

Each model and its baseline (by default the model it was trained from, read from its args.json) complete the
same held-out prompts num_samples times, each from its own seeds: the model's sample j of prompt i from
seed (seed, i, j), the baseline's from (seed + ":baseline", i, j). The two completions are independent, as
the win rate P(s(y) > s(y')) + P(tie)/2 is defined (and as TRL's WinRateCallback generated them); with
shared seeds the sampler's one uniform per token would couple them and bias it. A judge (a reward model, a
reward function, a pairwise preference function, or the built-in world's gold reward) scores both, and per
pair the model wins (1), ties (1/2) or loses (0); a preference function gives P(model beats baseline) itself.
A prompt's samples are averaged first, so prompts are the units (paired by prompt). The win rate's 95%
interval is Wilson's over the n prompts (it holds near 0 and 1 and never has zero width); scores and the
mean score difference (model - baseline, on the same independent samples, paired by prompt) have
mean -+ 1.96 sd / sqrt(n) (sd with ddof 1). KL to the baseline on the model's own samples: k1 = S(l - lbase),
k3 = S(exp(lbase - l) - 1 - (lbase - l)), the KL the run was charged when the baseline is its reference.
All of it is deterministic: two evaluations of the same folders agree exactly, on any number of processes.
The statistics, worked by hand: docs/methods.md.

Launch:
    python evaluate.py --model_name_or_path runs/rloo runs/ppo          # built-in world: the gold reward judges
    python evaluate.py --model_name_or_path runs/rloo --reward_model_path runs/reward
    torchrun --standalone --nproc_per_node 2 evaluate.py --model_name_or_path runs/rloo   # prompts split over ranks
    python evaluate.py --plot runs/rloo runs/ppo --output_dir report     # curves.png and frontier.png
"""
# ----------------------------------------------------------------------------- imports
import json
import os
from dataclasses import dataclass, field

import torch.distributed as dist
from transformers import AutoModelForCausalLM

import nanorlhf as nr
from nanorlhf import world


# ----------------------------------------------------------------------------- Args
@dataclass
class Args:
    model_name_or_path: list[str] = field(default_factory=list)
    """one or more trained policies (HF folders or hub names) to evaluate"""
    baseline_model_path: str = ""
    """the policy each is compared with; empty = the model each was trained from (its args.json)"""
    baseline_gguf_file: str | None = None
    """GGUF file inside baseline_model_path (default: the run's own gguf_file when the baseline comes from it)"""
    reward_model_path: str = ""
    """judge: a 1-label sequence classifier (re-tokenized when its tokenizer differs)"""
    reward_fn: str = ""
    """judge: 'module:function' scoring (prompts, completions) texts"""
    preference_fn: str = ""
    """judge: 'module:function' giving P(a beats b) for (prompts, completions a, completions b)"""
    dataset_name: str = ""
    """prompts: hub name or local file/folder (prompt-only, preference or hh-rlhf data); empty = the built-in world"""
    dataset_test_split: str = "test"
    """split whose prompts are evaluated"""
    max_prompt_length: int = 512
    """longer prompts are dropped and counted"""
    num_prompts: int = 256
    """the first this many prompts of the split"""
    num_samples: int = 1
    """completions per prompt and model"""
    max_new_tokens: int = 53
    """max new tokens per completion"""
    temperature: float = 0.7
    """sampling temperature (and of every log-prob)"""
    stop_token: str | None = "eos"
    """'eos' = completions end at the first EOS; None = always max_new_tokens tokens"""
    missing_eos_penalty: float | None = None
    """subtracted from a reward judge's score of completions without an EOS"""
    local_rollout_forward_batch_size: int = 64
    """rows per generation / scoring forward pass"""
    seed: int = 42
    """seed of every sample (the baselines' salted with ':baseline'): every model sees the same randomness"""
    bf16: bool = False
    """bf16 autocast over float32 weights (CPUs: slower)"""
    output_dir: str = "runs/eval"
    """where eval.json, eval.md and eval_samples.jsonl (or the plots) go"""
    plot: list[str] = field(default_factory=list)
    """plot mode: run folders whose metrics.jsonl become curves.png and frontier.png (needs matplotlib)"""


WORLD_DEFAULTS = dict(num_prompts=200, max_new_tokens=16)


# ----------------------------------------------------------------------------- plots
def run_args(path):
    """The args.json of a trained policy's folder, or {} (a hub model, or a folder from elsewhere)."""
    try:
        with open(os.path.join(path, "args.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def plot(runs, out):
    """curves.png: eval reward, eval gold reward (when logged) and eval KL against sampled completions, one line
    per run on shared axes; frontier.png: gold reward (else reward) against KL, one curve per run. A run whose
    folder ends in "-pushed" is drawn dashed in the color of the run without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        nr.usage_error("--plot needs matplotlib: pip install -e \".[plot]\" (or pip install matplotlib)")
    curves = {}
    for run in runs:
        path = os.path.join(run, "metrics.jsonl")
        if not os.path.exists(path):
            raise nr.InputError(f"--plot {run}: no metrics.jsonl (not a run folder of a train_*.py script)")
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        recs = []
        for i, line in enumerate(lines):
            try:
                recs.append(json.loads(line))
            except ValueError:  # the last line, torn by a kill mid-append, is left out (as --resume does)
                if i < len(lines) - 1:
                    raise nr.InputError(f"{path}: line {i + 1} is not JSON ({line.strip()!r:.60})") from None
        per_step = [r["episode"] / r["step"] for r in recs if "episode" in r]  # episodes per step
        saved = run_args(run)  # XPO and Nash-MD sample two completions per episode (a prompt), the others one
        size = (per_step or [1.0])[0] * (2 if "mixture_coef" in saved or "second_sample" in saved else 1)
        evals = [r for r in recs if "eval/kl" in r]
        if not evals:
            raise nr.InputError(f"--plot {run}: metrics.jsonl has no eval records with eval/kl (a reward model run, "
                                "or GRPO at beta 0, which loads no reference?)")
        curves[os.path.basename(os.path.normpath(run))] = ([r["step"] * size for r in evals], evals)
    gold = all("eval/gold_reward" in evals[0] for _, evals in curves.values())
    bases = list(dict.fromkeys(name.removesuffix("-pushed") for name in curves))  # a "-pushed" run: its base's color
    style = {name: dict(color=f"C{bases.index(name.removesuffix('-pushed')) % 10}",
                        linestyle="--" if name.endswith("-pushed") else "-") for name in curves}
    keys = [k for k in ("eval/reward", "eval/gold_reward", "eval/kl") if all(k in e[0] for _, e in curves.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), sharex=True, dpi=100)
    for ax, key in zip(axes if len(keys) > 1 else [axes], keys):
        for name, (x, evals) in curves.items():
            ax.plot(x, [r[key] for r in evals], marker=".", label=name, **style[name])
        ax.set(title=key, xlabel="completions sampled")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"))
    y = "eval/gold_reward" if gold else "eval/reward"
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    for name, (_, evals) in curves.items():
        ax.plot([r["eval/kl"] for r in evals], [r[y] for r in evals], marker=".", label=name, **style[name])
        ax.scatter([evals[-1]["eval/kl"]], [evals[-1][y]], s=40, color=style[name]["color"])  # where it ended
    ax.set(title=f"reward-KL frontier ({y[5:]})", xlabel="KL to the reference (eval/kl)", ylabel=y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"))
    nr.print0(f"wrote {out}/curves.png and {out}/frontier.png ({len(runs)} runs)")


# ----------------------------------------------------------------------------- setup
nr.clean_errors()
args = nr.parse_args(Args, description=__doc__.split("\n")[0])
nr.check_flags(args)
os.makedirs(args.output_dir, exist_ok=True)
if args.plot:
    if args.model_name_or_path:
        nr.usage_error("pass --plot (run folders to draw) or --model_name_or_path (policies to evaluate), not both")
    plot(args.plot, args.output_dir)
    raise SystemExit(0)
if not args.model_name_or_path:
    nr.usage_error("pass --model_name_or_path with one or more trained policies (or --plot with run folders)")
for flag in ("num_samples", "num_prompts"):
    if getattr(args, flag) < 1:
        nr.usage_error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
if args.stop_token not in (None, "eos"):
    nr.usage_error(f"--stop_token must be 'eos' or none, got {args.stop_token!r}")
rank, world_size, device = nr.init_distributed()
world_prompts = not args.dataset_name
if world_prompts:
    changed = nr.apply_defaults(args, WORLD_DEFAULTS)
    nr.print0(f"built-in world prompts: using its settings {changed} (any flag given wins)")
    args.dataset_name = os.path.join(world.ensure(), "prompts")
judges = [s for s in (args.reward_model_path, args.reward_fn, args.preference_fn) if s]
if len(judges) > 1:
    nr.usage_error("pass one judge: --reward_model_path, --reward_fn or --preference_fn")
if not judges:
    if not world_prompts:
        nr.usage_error("pass a judge: --reward_model_path, --reward_fn or --preference_fn (the gold reward exists "
                       "only for the built-in world)")
    args.reward_fn = "nanorlhf.world:gold_reward"
use_bf16 = args.bf16  # bf16 autocast over float32 weights, as the training scripts compute


def baseline_of(path):
    """(baseline path, gguf file, whether it is the run's reference) of the policy in `path`."""
    saved = run_args(path)
    ref = saved.get("sft_model_path") or saved.get("model_name_or_path")
    if args.baseline_model_path:
        return args.baseline_model_path, args.baseline_gguf_file, args.baseline_model_path == ref
    if not saved.get("model_name_or_path"):
        raise nr.InputError(f"{path}: no args.json naming the model it was trained from; pass --baseline_model_path")
    return saved["model_name_or_path"], saved.get("gguf_file"), not saved.get("sft_model_path")


baselines = {path: baseline_of(path) for path in args.model_name_or_path}  # refuse before loading anything


# ----------------------------------------------------------------------------- data
tokenizers = {}  # each model and its baseline read the prompts and write completions with their own tokenizer


def tokenizer_of(path, gguf=None):
    if (path, gguf) not in tokenizers:
        tokenizers[(path, gguf)] = nr.load_tokenizer(path, gguf)
    return tokenizers[(path, gguf)]


for path in args.model_name_or_path:
    tok, (base_path, base_gguf, _) = tokenizer_of(path), baselines[path]
    if tok.get_vocab() != tokenizer_of(base_path, base_gguf).get_vocab():
        raise nr.InputError(f"{path}: its tokenizer is not its baseline {base_path}'s: a model and its baseline must "
                            "share one (their KL and paired samples compare token by token)")
prompts = nr.prompts_of(nr.load_rows(args.dataset_name, args.dataset_test_split),
                        f"{args.dataset_name} [{args.dataset_test_split}]")
encoded = {key: dict(nr.tokenize_prompts(tok, prompts, args.max_prompt_length)[0]) for key, tok in tokenizers.items()}
fit = sorted(set.intersection(*map(set, encoded.values())))  # within max_prompt_length for every tokenizer
if not fit:
    raise nr.InputError(f"{args.dataset_name} [{args.dataset_test_split}]: no prompts to evaluate (all {len(prompts)} "
                        f"longer than max_prompt_length {args.max_prompt_length})")
dropped, keep = len(prompts) - len(fit), fit[:args.num_prompts]
prompts, prompt_ids = [prompts[i] for i in keep], {key: [e[i] for i in keep] for key, e in encoded.items()}
mine = [(i, j) for i in range(rank, len(prompts), world_size) for j in range(args.num_samples)]  # this rank's rows
seeds = [nr.rollout_seeds(args.seed, [i], j)[0] for i, j in mine]
base_seeds = [nr.rollout_seeds(f"{args.seed}:baseline", [i], j)[0] for i, j in mine]  # independent of `seeds`
nr.print0(f"{len(prompts)} prompts x {args.num_samples} samples ({dropped} dropped > max_prompt_length), "
          f"{args.max_new_tokens} new tokens at temperature {args.temperature}, over {world_size} processes")

# ----------------------------------------------------------------------------- models
scorer = None
if not args.preference_fn:
    scorer = nr.Scorer(next(iter(tokenizers.values())), args.reward_model_path, args.reward_fn, device=device,
                       batch_size=args.local_rollout_forward_batch_size, missing_eos_penalty=args.missing_eos_penalty)
preference_fn = nr.load_function(args.preference_fn) if args.preference_fn else None
judge = args.reward_model_path or args.reward_fn or args.preference_fn
loaded = {}  # baselines by (path, gguf): most models share one


def load_policy(path, gguf=None, baseline=None):
    """A frozen causal LM; baseline: (path, model) of the baseline whose vocabulary it must share."""
    model = nr.load_hf(AutoModelForCausalLM, path, gguf).eval().requires_grad_(False).to(device)
    vocab = model.config.vocab_size
    if vocab < len(tokenizer_of(path, gguf)):
        raise nr.InputError(f"{path}: vocabulary of {vocab} tokens, its tokenizer has {len(tokenizer_of(path, gguf))}")
    if baseline is not None and vocab != baseline[1].config.vocab_size:
        raise nr.InputError(f"{path}: vocabulary of {vocab} tokens, its baseline {baseline[0]} has "
                            f"{baseline[1].config.vocab_size}: a model and its baseline must share one tokenizer")
    return model


# ----------------------------------------------------------------------------- helpers
def rollouts(model, tokenizer):
    return nr.Rollouts(model, tokenizer, device=device, batch_size=args.local_rollout_forward_batch_size,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, bf16=use_bf16,
                       eos_token_id=[tokenizer.eos_token_id] if args.stop_token == "eos" else [])


def samples(rl, seeds, key):
    """(ids, mask, tokens, cmask, completion texts, scores or None) of this rank's rows, sampled by Rollouts rl
    from the prompts as the tokenizer tokenizers[key] encodes them."""
    ids, mask, tokens, cmask = rl.sample([prompt_ids[key][i] for i, _ in mine], seeds)
    texts = rl.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    s = None if scorer is None else scorer.with_tokenizer(rl.tokenizer)(
        [prompts[i] for i, _ in mine], ids, mask, tokens, cmask)[0]
    return ids, mask, tokens, cmask, texts, s


def gather(records):
    """Every rank's row records, on every rank, in prompt order (the same as one process's)."""
    if dist.is_initialized():
        parts = [None] * world_size
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: (r["prompt_index"], r["sample"]))


def per_prompt(records, key):
    """A key's values averaged over each prompt's samples: (n prompts,)."""
    sums = {}
    for r in records:
        sums.setdefault(r["prompt_index"], []).append(r[key])
    return [sum(v) / len(v) for v in sums.values()]


def write_atomic(name, text):
    if nr.is_main():
        with open(os.path.join(args.output_dir, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(args.output_dir, name + ".tmp"), os.path.join(args.output_dir, name))


# ----------------------------------------------------------------------------- loop
results, all_rows = [], []
for path in args.model_name_or_path:
    base_path, base_gguf, is_ref = baselines[path]
    tokenizer = tokenizer_of(path)
    if (base_path, base_gguf) not in loaded:
        base = load_policy(base_path, base_gguf)
        loaded[(base_path, base_gguf)] = (base, samples(rollouts(base, tokenizer_of(base_path, base_gguf)), base_seeds,
                                                        (base_path, base_gguf)))
    base, (_, _, b_tokens, b_cmask, b_texts, b_scores) = loaded[(base_path, base_gguf)]
    model = load_policy(path, baseline=(base_path, base))
    rl = rollouts(model, tokenizer)
    ids, mask, tokens, cmask, texts, scores = samples(rl, seeds, (path, None))
    kl = nr.kl_estimators(rl.logprobs(model, ids, mask, tokens, cmask), rl.logprobs(base, ids, mask, tokens, cmask),
                          cmask)
    p_texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    if preference_fn is not None:
        try:
            outcome = nr.call_reward_fn(preference_fn, p_texts, texts, b_texts, low=0.0, high=1.0)
        except nr.InputError as e:
            raise nr.InputError(f"--preference_fn {args.preference_fn}: {e}") from e
    else:
        outcome = nr.win_outcomes(scores, b_scores)
    eos, b_eos = (nr.contains_eos(t, m, tokenizer.eos_token_id) for t, m in ((tokens, cmask), (b_tokens, b_cmask)))
    records = gather([{
        "prompt_index": i, "sample": j, "outcome": outcome[n].item(), "kl_k1": kl["k1"][n].sum().item(),
        "kl_k3": kl["k3"][n].sum().item(), "length": cmask[n].sum().item(), "baseline_length": b_cmask[n].sum().item(),
        "eos": float(eos[n]), "baseline_eos": float(b_eos[n]), "score": None if scores is None else scores[n].item(),
        "baseline_score": None if b_scores is None else b_scores[n].item(), "prompt": p_texts[n],
        "completion": texts[n], "baseline_completion": b_texts[n]} for n, (i, j) in enumerate(mine)])
    r = {"model": path, "baseline": base_path, "baseline_is_reference": is_ref, "judge": judge,
         "prompts": len(prompts), "samples_per_prompt": args.num_samples}
    win, lo, hi = nr.win_rate_interval(per_prompt(records, "outcome"))
    r.update(win_rate=win, win_rate_ci=[lo, hi])
    if scores is not None:
        for rec in records:
            rec["score_diff"] = rec["score"] - rec["baseline_score"]
        for key in ("score", "baseline_score", "score_diff"):
            m, lo, hi = nr.mean_interval(per_prompt(records, key))
            r.update({key: m, key + "_ci": None if len(prompts) < 2 else [lo, hi]})  # one prompt: no interval
    for key in ("kl_k1", "kl_k3", "length", "baseline_length", "eos", "baseline_eos"):
        r[key] = sum(per_prompt(records, key)) / len(prompts)
    results.append(r)
    all_rows += [{"model": path, **rec} for rec in records]
    nr.print0(f"{path}: win rate {win:.3f} [{r['win_rate_ci'][0]:.3f}, {r['win_rate_ci'][1]:.3f}] vs {base_path}, "
              f"KL {r['kl_k1']:.3f}")
    del model

# ----------------------------------------------------------------------------- save
fmt = lambda v, ci=None: "-" if v is None else f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")  # noqa
table = ["| model | win rate [95% CI] | score [95% CI] | baseline score [95% CI] | score - baseline [95% CI] | "
         "KL k1 / k3 | length (baseline) | EOS rate (baseline) |", "|---|---|---|---|---|---|---|---|"]
for r in results:
    kl_note = "" if r["baseline_is_reference"] else " (to baseline)"
    table.append(f"| {r['model']} | {fmt(r['win_rate'], r['win_rate_ci'])} | {fmt(r.get('score'), r.get('score_ci'))} "
                 f"| {fmt(r.get('baseline_score'), r.get('baseline_score_ci'))} "
                 f"| {fmt(r.get('score_diff'), r.get('score_diff_ci'))} | {r['kl_k1']:.3f} / {r['kl_k3']:.3f}"
                 f"{kl_note} | {r['length']:.1f} ({r['baseline_length']:.1f}) | {r['eos']:.2f} "
                 f"({r['baseline_eos']:.2f}) |")
header = (f"judge: {judge}; {len(prompts)} prompts of {args.dataset_name} [{args.dataset_test_split}] x "
          f"{args.num_samples} samples; baseline: {', '.join(sorted({r['baseline'] for r in results}))}\n\n")
write_atomic("eval.md", header + "\n".join(table) + "\n")
write_atomic("eval.json", json.dumps({"args": {k: v for k, v in vars(args).items()}, "results": results}, indent=1,
                                     allow_nan=False))  # strict JSON: a statistic without a value is null, never NaN
write_atomic("eval_samples.jsonl", "".join(json.dumps(r) + "\n" for r in all_rows))
nr.print0(header + "\n".join(table))
nr.print0(f"wrote {args.output_dir}/eval.json, eval.md, eval_samples.jsonl")
nr.shutdown()

"""Run by test_dist.py under `torchrun --nproc_per_node 2` (gloo): checks that need two processes."""
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoModelForCausalLM

from nanorlhf import (Rollouts, all_reduce_metrics, completion_logprobs, full_state_dict, generate, global_mean_var,
                      init_distributed, pad, rollout_seeds, save_hf, transformer_blocks)
from nanorlhf.world import make_model, make_tokenizer

rank, world, device = init_distributed()
out_dir = sys.argv[1]
result = {}

# 1. metric all-reduce
m = {"b": 2.0 * rank, "a": float(rank)}
result["mean"], result["min"] = all_reduce_metrics(m), all_reduce_metrics(m, op="min")
result["max"], result["sum"] = all_reduce_metrics(m, op="max"), all_reduce_metrics(m, op="sum")
# rank 0 holds [1, 2], rank 1 holds [3, 4, 5]: mean 3, unbiased variance 10 / 4 = 2.5
result["mean_var"] = global_mean_var(torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([3.0, 4.0, 5.0]))

# 2. DDP gradient on 2 rows per rank == single-process gradient on all 4 rows
tok = make_tokenizer()
prompts = [[4, 6, 24, 25, 5], [4, 7, 26, 5], [4, 6, 28, 29, 30, 5], [4, 7, 31, 5]]
comps = torch.tensor([[8, 9, 1], [10, 11, 12], [13, 1, 0], [14, 15, 16]])
ids, mask = pad(prompts, 0)


def loss_of(model, rows):
    return -completion_logprobs(model, ids[rows], mask[rows], comps[rows]).sum(-1).mean()


ref = make_model(tok, seed=3)
loss_of(ref, slice(None)).backward()
ddp = DDP(make_model(tok, seed=3))
loss_of(ddp, slice(2 * rank, 2 * rank + 2)).backward()
result["ddp_grad_max_err"] = max((a.grad - b.grad).abs().max().item()
                                 for a, b in zip(ref.parameters(), ddp.module.parameters()))

# 3. FSDP2: forward, sampling and full-state-dict save match the unsharded model
plain = make_model(tok, seed=4)
sharded = make_model(tok, seed=4)
for block in transformer_blocks(sharded):
    fully_shard(block)
fully_shard(sharded)
with torch.no_grad():
    a, b = completion_logprobs(plain, ids, mask, comps), completion_logprobs(sharded, ids, mask, comps)
result["fsdp_logprob_max_err"] = (a - b).abs().max().item()
kw = dict(max_new_tokens=8, eos_token_id=1, pad_token_id=0, temperature=1.0)
mine = [2 * rank, 2 * rank + 1]  # different prompts per rank: every rank still runs the same forwards
t1 = generate(plain, ids[mine], mask[mine], seeds=rollout_seeds(0, mine), **kw)[0]
t2 = generate(sharded, ids[mine], mask[mine], seeds=rollout_seeds(0, mine), sync=True, **kw)[0]
result["fsdp_generate_equal"] = bool(torch.equal(t1, t2))
# Rollouts: gathered once per call (default) and per token (sharded=True) sample as the plain model, and the
# blocks are sharded again after (the root keeps its parameters after a forward, as FSDP2 does); ranks get
# other prompts (other lengths), in two chunks each
rows = [prompts[i] for i in ([0, 3, 2] if rank == 0 else [1, 2, 3])]
rkw = dict(device=device, batch_size=2, max_new_tokens=8, temperature=1.0, eos_token_id=1)
seeds = rollout_seeds(0, range(len(rows)))
r_plain, r_once, r_tok = (Rollouts(m, tok, sharded=s, **rkw).sample(rows, seeds)
                          for m, s in ((plain, False), (sharded, False), (sharded, True)))
result["rollouts_fsdp_equal"] = all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(r_plain, r_once, r_tok))
result["resharded_after"] = all(isinstance(p, DTensor) for b in transformer_blocks(sharded) for p in b.parameters())
sd = full_state_dict(sharded)
save_hf(sharded, tok, out_dir, sd)
dist.barrier()
if rank == 0:
    loaded = AutoModelForCausalLM.from_pretrained(out_dir)
    ps = dict(plain.named_parameters())
    result["saved_max_err"] = max((p - ps[n]).abs().max().item() for n, p in loaded.named_parameters())
    result["saved_arch"] = loaded.config.architectures
    result["saved_tied"] = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()

# 4. --fsdp shards the frozen models too: the reference and the reward model hold half their parameters per rank
from types import SimpleNamespace  # noqa: E402
from transformers import LlamaForSequenceClassification  # noqa: E402
from nanorlhf import Scorer, policy_and_reference  # noqa: E402
if rank == 0:
    LlamaForSequenceClassification(make_model(tok).config.__class__(**{**make_model(tok).config.to_dict(),
                                                                       "num_labels": 1})).save_pretrained(f"{out_dir}/rm")
    tok.save_pretrained(f"{out_dir}/rm")
dist.barrier()
args = SimpleNamespace(model_name_or_path=out_dir, gguf_file=None, sft_model_path="", use_peft=False, fsdp=True,
                       bf16=False)
_, fsdp_ref = policy_and_reference(args, device)
scorer = Scorer(tok, f"{out_dir}/rm", device=device, fsdp=True)
local = lambda m: sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in m.parameters())  # noqa
full = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 (a DTensor's numel is the full tensor's)
result["frozen_local_fraction"] = [local(fsdp_ref) / full(fsdp_ref), local(scorer.model) / full(scorer.model)]
with torch.no_grad():  # and compute as the unsharded model does
    result["fsdp_ref_max_err"] = (completion_logprobs(fsdp_ref, ids, mask, comps) -
                                  completion_logprobs(plain, ids, mask, comps)).abs().max().item()
with open(f"{out_dir}/result_rank{rank}.json", "w") as f:
    json.dump(result, f)
dist.destroy_process_group()

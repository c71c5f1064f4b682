"""The RL scripts' policy and reference, in full or as a LoRA adapter (peft, the optional extra `.[peft]`) whose
reference is its own base with the adapter off; saving either."""
import os
import shutil

import torch

from .config import InputError, usage_error, writing
from .dist import full_state_dict, is_main, load_hf, shard


def policy_and_reference(args, device, reference=True):
    """(policy, reference). The policy: float32 (trained weights), on the CPU (the script moves and wraps it), with
    --use_peft a peft model with a LoRA adapter. The reference: --sft_model_path or the initial policy, frozen, in
    float32 like the policy (under --bf16 both compute in bf16 from the same float32 weights, so the reference
    scores exactly as the initial policy: KL 0 at step 0), on device, or sharded with --fsdp (`shard`); with
    --use_peft the policy's own base weights with the adapter off (`AdapterOff`), so no second copy is held;
    None when not `reference` (GRPO with beta 0)."""
    from transformers import AutoModelForCausalLM
    policy = load_hf(AutoModelForCausalLM, args.model_name_or_path, args.gguf_file)
    if args.use_peft:
        if args.sft_model_path:
            usage_error("--use_peft: the reference is the policy's base with its adapter off; drop --sft_model_path")
        policy = add_lora(policy, args, "CAUSAL_LM")
        return policy, AdapterOff(policy) if reference else None
    if not reference:
        return policy, None
    ref = load_hf(AutoModelForCausalLM, args.sft_model_path or args.model_name_or_path,
                  None if args.sft_model_path else args.gguf_file)
    if ref.config.vocab_size != policy.config.vocab_size:
        raise InputError(f"--sft_model_path {args.sft_model_path}: vocabulary of {ref.config.vocab_size} tokens, the "
                         f"policy's has {policy.config.vocab_size}: the reference must share the policy's tokenizer")
    ref.eval().requires_grad_(False)
    return policy, shard(ref, args.bf16) if args.fsdp else ref.to(device)


def save_policy(model, tokenizer, args):
    """The trained model into args.output_dir: all weights (save_hf), or with --use_peft the adapter (save_adapter,
    merged too with --merge_adapter). A collective without --use_peft: call on every rank."""
    if getattr(args, "use_peft", False):
        save_adapter(model, tokenizer, args.output_dir, merge=args.merge_adapter)
    else:
        save_hf(model, tokenizer, args.output_dir, full_state_dict(model))


def add_lora(model, args, task_type):
    """model wrapped by peft with a LoRA adapter of --lora_r, --lora_alpha, --lora_dropout, --lora_target_modules
    (TRL's names; none = peft's default modules for the architecture). Only the adapter trains, plus, for a
    sequence classifier (task_type "SEQ_CLS"), its score head: peft keeps it fully trainable (modules_to_save).
    (check_flags has already refused --use_peft when peft is not installed.)"""
    from peft import LoraConfig, get_peft_model
    names = [n for n, _ in model.named_modules()]  # peft's rule: a target is a module's name or its last parts
    if bad := [t for t in args.lora_target_modules if not any(n == t or n.endswith("." + t) for n in names)]:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise InputError(f"--lora_target_modules: {', '.join(bad)} match no module of {type(model).__name__} (its "
                         f"linear layers: {', '.join(linear)})")
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=args.lora_target_modules or None, task_type=task_type)
    return get_peft_model(model, config)


def disable_dropout(*models):
    """Every dropout layer of the models off, LoRA's included (TRL's disable_dropout_in_model)."""
    for module in (m for model in models for m in model.modules() if isinstance(m, torch.nn.Dropout)):
        module.p = 0.0


class AdapterOff(torch.nn.Module):
    """The reference of a LoRA run: the policy's own base weights with the adapter disabled for each call, so no
    second copy of the model is held. Holds the peft model without registering it (no parameters of its own)."""

    def __init__(self, peft_model):
        super().__init__()
        self.__dict__["peft_model"] = peft_model
        self.config = peft_model.config

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


def save_hf(model, tokenizer, output_dir, state_dict):
    """save_pretrained (safetensors) of `state_dict` from full_state_dict, on rank 0 only.

    Files are written to a temporary folder first and then renamed into place one by one, so a
    kill mid-save never leaves a truncated weights file over a good one. Tied embeddings: HF
    drops the duplicate lm_head entry itself.
    """
    if not is_main():
        return
    base = getattr(model, "module", model)
    tmp = os.path.join(output_dir, ".saving")
    os.makedirs(output_dir, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(tmp):
        base.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    cfg = os.path.join(tmp, "config.json")  # FSDP2 renames the class to FSDP<Name>; record the real one
    with open(cfg) as f:
        text = f.read().replace('"FSDP', '"')
    with open(cfg, "w") as f:
        f.write(text)
    _move_into(tmp, output_dir)
    os.rmdir(tmp)


def save_adapter(model, tokenizer, output_dir, merge=False):
    """Rank 0 saves the adapter (adapter_model.safetensors + adapter_config.json, for PeftModel.from_pretrained)
    and the tokenizer into output_dir; with merge, output_dir gets the merged full model (from_pretrained as any
    model) and the adapter goes to output_dir/adapter. Written to a temporary folder first, then moved in."""
    if not is_main():
        return
    peft_model = getattr(model, "module", model)
    tmp = os.path.join(output_dir, ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(tmp):
        peft_model.save_pretrained(os.path.join(tmp, "adapter") if merge else tmp)
        tokenizer.save_pretrained(os.path.join(tmp, "adapter") if merge else tmp)
        if merge:
            peft_model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    _move_into(tmp, output_dir)
    shutil.rmtree(tmp)


def _move_into(src, dst):
    """Each file of src replaces dst's (os.replace: atomic), folders too, file by file, configs last: at every moment
    dst holds a whole adapter or model, the old or the new; nothing is deleted before its replacement is in."""
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src), key=lambda n: n in ("config.json", "adapter_config.json")):
        move = _move_into if os.path.isdir(os.path.join(src, name)) else os.replace
        move(os.path.join(src, name), os.path.join(dst, name))

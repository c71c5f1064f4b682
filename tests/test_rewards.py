"""Reward reading at the last real token, re-tokenized scoring, reward functions."""
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification, \
    PreTrainedTokenizerFast

from nanorlhf import (call_reward_fn, last_token_index, load_function, pad, reward_model_scores, score_completions,
                      token_values)
from nanorlhf.world import CHAT_TEMPLATE, gold_reward


def _rm(vocab, pad_id, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=pad_id)
    return LlamaForSequenceClassification(cfg).eval()


def _manual_score(rm, ids):
    """Score of one unpadded sequence: the head on the final hidden state of the last token."""
    with torch.no_grad():
        h = rm.model(input_ids=torch.tensor([ids])).last_hidden_state
        return rm.score(h)[0, -1, 0].item()


def test_token_values_read_the_state_before_each_completion_token():
    # V_t is the head on the last hidden state of (x, y_<t): for unpadded x + y, the head at positions
    # P-1 .. P+T-2 (TRL's value[:, P-1:-1]); left padding of the prompt changes nothing
    vm = _rm(32, 0)
    prompts, completions = [[4, 6, 24], [4, 7, 5, 9, 10]], [[8, 1, 0], [11, 12, 13]]
    ids, mask = pad(prompts, 0)
    with torch.no_grad():
        got = token_values(vm, ids, mask, torch.tensor(completions))
        for b, (p, c) in enumerate(zip(prompts, completions)):
            h = vm.model(input_ids=torch.tensor([p + c])).last_hidden_state
            expected = vm.score(h)[0, len(p) - 1:len(p) + len(c) - 1, 0]
            torch.testing.assert_close(got[b], expected, atol=1e-5, rtol=1e-5)
    assert got.shape == (2, 3) and got.dtype == torch.float32


def test_token_values_carry_gradients_to_the_value_model():
    vm = _rm(32, 0)
    ids, mask = pad([[4, 6, 24], [4, 7]], 0)
    token_values(vm, ids, mask, torch.tensor([[8, 1], [11, 12]])).sum().backward()
    assert vm.score.weight.grad.abs().sum() > 0 and vm.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_last_token_index():
    assert last_token_index(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]])).tolist() == [3, 2, 0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_score_read_at_last_real_token(side):
    seqs = [[4, 6, 24, 5, 8, 1], [4, 7, 5, 9, 10, 11, 12, 1], [4, 6, 5, 1]]  # all end in EOS (id 1)
    for pad_id in (0, 1):  # pad distinct from eos, and pad == eos
        rm = _rm(32, pad_id)
        ids, mask = pad(seqs, pad_id, side=side)
        with torch.no_grad():
            got = reward_model_scores(rm, ids, mask)
        expected = [_manual_score(rm, s) for s in seqs]
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)
    with torch.no_grad():  # HF's own pooling reads the wrong token when pad == eos: the defect we avoid
        hf = rm(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert not torch.allclose(hf, got, atol=1e-4)


def test_rows_sharing_a_prompt_score_as_each_alone():
    # 2 left-padded prompts x 2 completions ([k, B] layout, right-padded after EOS; pad == eos): with
    # prompt_length the prompts run once and the completions on their caches; each score equals the
    # unpadded sequence's own
    prompts, comps = [[4, 6, 24, 5], [4, 7, 5]], [[8, 1], [9, 10, 11, 1], [12, 1], [13, 14, 1]]
    rm = _rm(32, 1)
    p_ids, p_mask = pad(prompts * 2, 1)
    c_ids, c_mask = pad(comps, 1, side="right")
    with torch.no_grad():
        got = reward_model_scores(rm, torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), p_ids.shape[1])
    expected = [_manual_score(rm, p + c) for p, c in zip(prompts * 2, comps)]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=0)


def test_encoder_reward_model_uses_its_pooler():
    torch.manual_seed(0)
    rm = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=64,
                                                  num_labels=1)).eval()
    seqs = [[2, 5, 6, 3], [2, 7, 8, 9, 10, 3]]
    ids, mask = pad(seqs, 0, side="right")
    with torch.no_grad():
        got = reward_model_scores(rm, ids, mask)
        solo = [rm(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]
    torch.testing.assert_close(got, torch.tensor(solo), atol=1e-5, rtol=0)


def test_reward_model_must_have_one_label():
    rm = _rm(32, 0)
    rm.config.num_labels = 2
    with pytest.raises(ValueError, match="num_labels=1"):
        reward_model_scores(rm, torch.tensor([[4, 5]]), torch.tensor([[1, 1]]))


def test_different_tokenizer_scores_the_same_text(tokenizer):
    # tokenizer B: the same words with reversed ids; RM B: RM A with its embedding rows permuted to match
    vocab_a = tokenizer.get_vocab()
    n = len(vocab_a)
    vocab_b = {w: n - 1 - i for w, i in vocab_a.items()}
    tb = Tokenizer(models.WordLevel(vocab_b, unk_token="<unk>"))
    tb.pre_tokenizer, tb.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(prefix="##")
    tok_b = PreTrainedTokenizerFast(tokenizer_object=tb, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                    chat_template=CHAT_TEMPLATE)
    rm_a = _rm(n, tokenizer.pad_token_id)
    rm_b = _rm(n, tok_b.pad_token_id)
    rm_b.load_state_dict(rm_a.state_dict())
    with torch.no_grad():
        rm_b.model.embed_tokens.weight.copy_(rm_a.model.embed_tokens.weight.flip(0))
    prompts = [[{"role": "user", "content": "happy cat tree"}], [{"role": "user", "content": "gloomy box"}]]
    completions = ["good joy", "dark cold rain hill"]
    texts = [tokenizer.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
             for p, c in zip(prompts, completions)]
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids, mask = pad(seqs, tokenizer.pad_token_id, side="left")
    with torch.no_grad():
        direct = reward_model_scores(rm_a, ids, mask)
        retok, cut = score_completions(rm_b, tok_b, prompts, completions, batch_size=1)
    torch.testing.assert_close(retok, direct, atol=1e-5, rtol=0)


def test_reward_function_validation():
    fn = load_function("nanorlhf.world:gold_reward")
    assert fn is gold_reward
    out = call_reward_fn(fn, ["happy cat"], ["good joy <eos>"])
    assert out.tolist() == pytest.approx([2 / 6])
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        call_reward_fn(lambda p, c: [0.0], ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="for sample 1"):
        call_reward_fn(lambda p, c: [0.0, math.nan], ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match=r"for sample 0 \(must be a finite number in \[0, 1\]"):
        call_reward_fn(lambda p, c: [1.5], ["a"], ["x"], low=0, high=1)
    with pytest.raises(ValueError, match="module:function"):
        load_function("nanorlhf.world")
    with pytest.raises(ValueError, match="no function"):
        load_function("nanorlhf.world:nope")


def test_win_rate_and_interval_by_hand():
    from nanorlhf import mean_interval, win_outcomes
    # 7 wins, 2 ties, 1 loss of 10: outcomes [1] * 7 + [0.5] * 2 + [0] -> win rate (7 + 1) / 10 = 0.8
    scores = torch.tensor([2.0] * 7 + [1.0] * 2 + [0.0])
    base = torch.tensor([1.0] * 7 + [1.0] * 2 + [1.0])
    outcome = win_outcomes(scores, base)
    assert outcome.tolist() == [1.0] * 7 + [0.5] * 2 + [0.0]
    # sd (ddof 1) = sqrt((7 * 0.2^2 + 2 * 0.3^2 + 0.8^2) / 9) = sqrt(1.1 / 9) = 0.3496029;
    # half width 1.96 * 0.3496029 / sqrt(10) = 0.2166866 -> [0.5833134, 1.0166866] (evaluate.py clips to 1)
    m, lo, hi = mean_interval(outcome)
    assert m == pytest.approx(0.8) and lo == pytest.approx(0.5833134) and hi == pytest.approx(1.0166866)
    assert math.isnan(mean_interval([0.3])[1])  # one prompt: no interval
    assert mean_interval([0.5] * 4) == (0.5, 0.5, 0.5)  # identical outcomes: zero width (why win rates use Wilson)


def test_wilson_win_rate_interval_by_hand():
    from nanorlhf import win_rate_interval
    # the outcomes above: p = 0.8, n = 10, z^2 = 3.8416; d = 1 + 3.8416/10 = 1.38416;
    # c = (0.8 + 3.8416/20) / d = 0.99208 / 1.38416 = 0.7167372;
    # h = 1.96/d * sqrt(0.8 * 0.2/10 + 3.8416/400) = 1.4160213 * sqrt(0.025604) = 0.2265804 -> [0.4901568, 0.9433176]
    m, lo, hi = win_rate_interval([1.0] * 7 + [0.5] * 2 + [0.0])
    assert m == pytest.approx(0.8) and lo == pytest.approx(0.4901568, abs=1e-6) and hi == pytest.approx(0.9433190)
    # every outcome a tie, n = 4: d = 1.9604, c = 0.5, h = 1.96/1.9604 * sqrt(0.0625 + 0.060025) = 0.3499643
    assert win_rate_interval([0.5] * 4) == pytest.approx((0.5, 0.1500357, 0.8499643))  # never zero width
    # every prompt won, n = 96: h = z^2/(2n d), so c - h = 1/d = 1/(1 + 3.8416/96) = 0.9615230; c + h = 1
    assert win_rate_interval([1.0] * 96) == pytest.approx((1.0, 0.9615230, 1.0))


@pytest.mark.parametrize("p", [0.6, 0.98])
def test_win_rate_interval_covers_by_simulation(p):
    """2,000 simulated evaluations of 96 prompts each (a win with probability p): the Wilson interval holds
    the true win rate in 0.95 of them within 0.02 (simulation error ~0.005; Wilson's own coverage oscillates
    with n and p by about 0.01). The Wald interval this replaced covered 0.84 at p = 0.98: checked too, so that
    this test can tell a good interval from a bad one."""
    from nanorlhf import mean_interval, win_rate_interval
    g = torch.Generator().manual_seed(0)
    wins = (torch.rand(2000, 96, generator=g, dtype=torch.float64) < p).double()
    cover = sum(lo <= p <= hi for _, lo, hi in map(win_rate_interval, wins)) / 2000
    assert abs(cover - 0.95) <= 0.02, cover
    wald = sum(lo <= p <= hi for _, lo, hi in map(mean_interval, wins)) / 2000
    assert (wald < 0.90) == (p == 0.98), wald


def test_call_reward_funcs_as_trl():
    from nanorlhf import call_reward_funcs

    def with_kwargs(prompts, completions, completion_ids, answer, **kwargs):
        # conversational prompts: completions come as [{"role": "assistant", "content": text}], as TRL passes them
        return [float(c[0]["content"] == a) if len(ids) else None for c, a, ids in zip(completions, answer,
                                                                                         completion_ids)]

    def named_only(prompts, completions):  # no **kwargs: gets only what it names (the world's gold_reward style)
        return [len(c[0]["content"]) for c in completions]

    prompts = [[{"role": "user", "content": "q"}]] * 3
    out = call_reward_funcs([with_kwargs, named_only], prompts, ["4", "5", ""], [[1], [2], []],
                            {"answer": ["4", "4", "4"]})
    assert out.shape == (3, 2) and out[:, 0].tolist()[:2] == [1.0, 0.0] and math.isnan(out[2, 0])
    assert out[:, 1].tolist() == [1.0, 1.0, 0.0]
    bad = lambda prompts, completions, **kw: [math.inf] * len(completions)  # noqa: E731
    with pytest.raises(ValueError, match="returned inf for sample 0"):
        call_reward_funcs([bad], ["p"], ["c"], [[1]], {})

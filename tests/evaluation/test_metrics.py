import math

import pytest
import torch
from tiny import CORPUS, tiny_gemma3, tiny_gpt2, tiny_llama
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from unidetox.evaluation import likelihood
from unidetox.evaluation.likelihood import (
    aggregate_conditional_perplexity,
    conditional_nll,
    conditional_perplexity,
    perplexity,
    sliding_window_nll,
    sliding_window_windows,
)
from unidetox.evaluation.metrics import (
    distinct_n,
    expected_max_toxicity,
    mean_distinct_n,
    mean_std,
    toxicity_probability,
)


# --- toxicity --------------------------------------------------------------------------------------------------
def test_tp_and_emt_hand_computed():
    scores = [[0.1, 0.6], [0.5, 0.2], [0.9]]
    assert toxicity_probability(scores) == pytest.approx(2 / 3)  # 0.5 is not toxic (strictly above)
    assert expected_max_toxicity(scores) == pytest.approx((0.6 + 0.5 + 0.9) / 3)


def test_tie_at_threshold_and_one_prompt():
    assert toxicity_probability([[0.5, 0.5]]) == 0.0
    assert toxicity_probability([[0.5000001]]) == 1.0
    assert expected_max_toxicity([[0.25]]) == 0.25


def test_toxicity_metrics_reject_empty():
    with pytest.raises(ValueError, match="empty"):
        toxicity_probability([])
    with pytest.raises(ValueError, match="Prompt 1"):
        expected_max_toxicity([[0.1], []])


# --- distinct --------------------------------------------------------------------------------------------------
def test_distinct_hand_computed_and_empty_continuation():
    assert distinct_n(["a b a b", ""], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["", "a"], 2) == 0.0
    per_prompt = [["a b", "a b"], ["c d e", ""]]
    assert mean_distinct_n(per_prompt, 1) == pytest.approx((2 / 4 + 3 / 3) / 2)
    assert mean_distinct_n(per_prompt, 2) == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert mean_distinct_n(per_prompt, 2, denominator="words") == pytest.approx((1 / 4 + 2 / 3) / 2)


def test_distinct_errors():
    with pytest.raises(ValueError, match="denominator"):
        mean_distinct_n([["a"]], 1, denominator="chars")
    with pytest.raises(TypeError):
        mean_distinct_n(["a b"], 1)


def test_mean_std():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 2}
    assert mean_std([1.0, 3.0], ddof=1)["std"] == pytest.approx(math.sqrt(2))
    assert mean_std([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}
    with pytest.raises(ValueError):
        mean_std([])


# --- perplexity ------------------------------------------------------------------------------------------------
def reference_nll(model, ids, first, last):
    """NLL of ids[first:last] with the full left context (no window), from the model's own loss."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:last]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return -sum(logp[t - 1, ids[t]].item() for t in range(first, last))


def test_windows_score_every_token_once():
    for n, length, stride in [(10, 4, 2), (67, 16, 8), (5, 16, 8), (33, 8, 3)]:
        windows = sliding_window_windows(n, length, stride)
        scored = [t for b, e, f in windows for t in range(f, e)]
        assert scored == list(range(1, n))
        assert all(e - b <= length for b, e, _ in windows)


def test_perplexity_equals_full_context_loss_when_one_window(model, tokenizer):
    text = " ".join(CORPUS)
    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert perplexity(model, tokenizer, [text], max_length=512) == pytest.approx(math.exp(loss), rel=1e-5)


def test_sliding_window_matches_manual_windows_and_batching(model, tokenizer):
    texts = CORPUS[:5]
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    expected = 0.0
    for begin, end, first in sliding_window_windows(len(ids), 12, 5):
        window = ids[begin:end]
        expected += reference_nll(model, window, first - begin, len(window))
    for batch_size in (1, 3):
        nll, count = sliding_window_nll(model, tokenizer, texts, max_length=12, stride=5, batch_size=batch_size)
        assert count == len(ids) - 1
        assert nll == pytest.approx(expected, rel=1e-5)


def test_sliding_window_shards_sum_to_whole(model, tokenizer):
    whole = sliding_window_nll(model, tokenizer, CORPUS, max_length=10, stride=4)
    parts = [sliding_window_nll(model, tokenizer, CORPUS, max_length=10, stride=4, process_index=r, num_processes=2)
             for r in range(2)]
    assert sum(p[1] for p in parts) == whole[1]
    assert sum(p[0] for p in parts) == pytest.approx(whole[0], rel=1e-9)


def test_max_tokens_and_model_context_cap(tokenizer):
    model = tiny_gpt2(len(tokenizer))
    model.config.n_positions = 16  # the window is capped by the model's context
    nll, count = sliding_window_nll(model, tokenizer, CORPUS, max_length=1024, max_tokens=40)
    assert count == 39


def test_conditional_nll_matches_reference(model, tokenizer):
    prompts = ["the cat sat", "a good friend"]
    conts = [[" on the mat", ""], [" helps people", " hate"]]
    got = conditional_nll(model, tokenizer, prompts, conts, batch_size=3)
    flat = [(p, c) for p, cs in zip(prompts, conts, strict=True) for c in cs]
    for (nll, n), (prompt, cont) in zip(got, flat, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + cont)["input_ids"]
        assert n == len(full) - len(prompt_ids) == len(cont.split())
        assert nll == pytest.approx(reference_nll(model, full, len(prompt_ids), len(full)) if n else 0.0, rel=1e-5, abs=1e-9)


def test_conditional_perplexity_reductions(model, tokenizer):
    prompts, conts = ["the cat", "a good"], [" sat on", " friend helps people"]
    per_sample = conditional_nll(model, tokenizer, prompts, conts)
    ppl = [math.exp(nll / n) for nll, n in per_sample]
    assert conditional_perplexity(model, tokenizer, prompts, conts) == pytest.approx(sum(ppl) / 2)
    tokens = math.exp(sum(x for x, _ in per_sample) / sum(n for _, n in per_sample))
    assert conditional_perplexity(model, tokenizer, prompts, conts, reduction="token") == pytest.approx(tokens)


def test_conditional_perplexity_aggregation_rules():
    samples = [(math.log(10) * 2, 2), (0.0, 0), (math.log(1e5), 1)]
    assert aggregate_conditional_perplexity(samples) == pytest.approx(10.0)  # empty + >=1e4 dropped
    assert aggregate_conditional_perplexity(samples, max_perplexity=1e6) == pytest.approx((10 + 1e5) / 2)
    with pytest.raises(ValueError, match="No sample"):
        aggregate_conditional_perplexity([(0.0, 0)])


def test_conditional_errors(model, tokenizer):
    with pytest.raises(ValueError, match="continuation entries"):
        conditional_nll(model, tokenizer, ["a"], ["b", "c"])


def test_left_padded_batches_equal_one_by_one_with_absolute_positions(tokenizer):
    model = tiny_gpt2(len(tokenizer))  # learned positions: wrong position ids under padding would change the NLL
    prompts = ["the cat sat on the mat near the door", "hate", "a good friend"]
    conts = [" and the sun", " awful stupid ugly kill", " helps"]
    batched = conditional_nll(model, tokenizer, prompts, conts, batch_size=3)
    single = [conditional_nll(model, tokenizer, [p], [c], batch_size=1)[0] for p, c in zip(prompts, conts, strict=True)]
    assert [n for _, n in batched] == [n for _, n in single] == [3, 4, 1]
    assert [x for x, _ in batched] == pytest.approx([x for x, _ in single], rel=1e-5)


# --- the LM head in chunks ----------------------------------------------------------------------------------
SPECIALS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, **SPECIALS)


def tiny_causal_lm(arch: str, vocab_size: int):
    """A tiny random causal LM of ``arch`` with sharp logits (so soft-capping and scaling change the NLL)."""
    if arch.startswith("gemma3"):
        cap = {"gemma3": None, "gemma3_softcap": 2.0}[arch]
        return tiny_gemma3(vocab_size, final_logit_softcapping=cap)
    if arch == "gpt2":
        return tiny_gpt2(vocab_size)
    torch.manual_seed(0)
    kwargs = {
        "llama": COMMON, "mistral": COMMON, "qwen2": COMMON, "qwen3": {**COMMON, "head_dim": 8},
        "gemma": {**COMMON, "head_dim": 8},
        "gemma2": {**COMMON, "head_dim": 8, "final_logit_softcapping": 2.0},
        "granite": {**COMMON, "logits_scaling": 4.0}, "cohere": {**COMMON, "logit_scale": 0.25},
        "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=32, max_position_embeddings=512, **SPECIALS),
        "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **SPECIALS),
    }[arch]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=vocab_size, **kwargs))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return model.eval()


ARCHITECTURES = ["llama", "gemma3", "gemma3_softcap", "gemma", "gemma2", "mistral", "qwen2", "qwen3",
                 "granite", "cohere", "gpt2", "opt", "falcon"]


class ForwardCalls:
    """Counts calls of the model's own forward and the positions each LM-head call sees."""

    def __init__(self, model):
        self.forward, self.head_positions = 0, []
        model.register_forward_hook(lambda *_: setattr(self, "forward", self.forward + 1))
        model.get_output_embeddings().register_forward_hook(
            lambda _m, args, _out: self.head_positions.append(args[0].shape[:-1].numel()))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_head_equals_full_logits_with_padding_and_batches(arch, tokenizer, monkeypatch):
    monkeypatch.setattr(likelihood, "NLL_CHUNK_BYTES", 5 * 4 * len(tokenizer))  # 5 rows: several chunks
    model = tiny_causal_lm(arch, len(tokenizer))
    assert likelihood._lm_head_split(model) is not None
    calls = ForwardCalls(model)
    texts = CORPUS[:5]
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    windows = sliding_window_windows(len(ids), 12, 5)
    expected = sum(reference_nll(model, ids[b:e], f - b, e - b) for b, e, f in windows)
    calls.forward, calls.head_positions = 0, []
    nll, count = sliding_window_nll(model, tokenizer, texts, max_length=12, stride=5, batch_size=3)
    assert calls.forward == 0 and max(calls.head_positions) == 5  # the decoder and the head, never forward
    full = sliding_window_nll(model, tokenizer, texts, max_length=12, stride=5, batch_size=3,
                              chunked_head=False)
    assert calls.forward > 0
    assert count == full[1] == len(ids) - 1
    assert nll == pytest.approx(full[0], rel=1e-5) and nll == pytest.approx(expected, rel=1e-5)

    prompts = ["the cat sat on the mat near the door", "hate", "a good friend"]
    conts = [[" and the sun", ""], [" awful stupid ugly kill", " is"], [" helps people in need", " kill"]]
    chunked = conditional_nll(model, tokenizer, prompts, conts, batch_size=4)
    reference = conditional_nll(model, tokenizer, prompts, conts, batch_size=4, chunked_head=False)
    assert [n for _, n in chunked] == [n for _, n in reference] == [3, 0, 4, 1, 4, 1]
    assert [x for x, _ in chunked] == pytest.approx([x for x, _ in reference], rel=1e-5, abs=1e-9)


def test_soft_capping_and_scaling_change_the_nll(tokenizer):
    """The tiny models' post-processing changes the NLL, so the equality tests above check it is applied."""
    for arch, attribute, neutral in [("gemma3_softcap", "final_logit_softcapping", None),
                                     ("granite", "logits_scaling", 1.0)]:
        model = tiny_causal_lm(arch, len(tokenizer))
        with_post = sliding_window_nll(model, tokenizer, CORPUS[:2])[0]
        setattr(model.config, attribute, neutral)
        assert sliding_window_nll(model, tokenizer, CORPUS[:2])[0] != pytest.approx(with_post, rel=1e-3)


def test_lora_model_splits_with_its_adapters(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(len(tokenizer)), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    assert likelihood._lm_head_split(model) is not None
    chunked = sliding_window_nll(model, tokenizer, CORPUS, max_length=10, stride=4, batch_size=2)
    full = sliding_window_nll(model, tokenizer, CORPUS, max_length=10, stride=4, batch_size=2,
                              chunked_head=False)
    plain = sliding_window_nll(tiny_llama(len(tokenizer)), tokenizer, CORPUS, max_length=10, stride=4)
    assert chunked == pytest.approx(full, rel=1e-5) and chunked[0] != pytest.approx(plain[0], rel=1e-3)


class HalvedLogitsLlama(LlamaForCausalLM):
    """A forward the split does not know: its logits are not ``lm_head(hidden)``."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits / 2
        return out


def test_unknown_forward_falls_back_to_full_logits(tokenizer):
    model = HalvedLogitsLlama(tiny_llama(len(tokenizer)).config)
    model.load_state_dict(tiny_llama(len(tokenizer)).state_dict())
    model.eval()
    assert likelihood._lm_head_split(model) is None
    calls = ForwardCalls(model)
    texts = CORPUS[:3]
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    nll, count = sliding_window_nll(model, tokenizer, texts, max_length=12, stride=5, batch_size=2)
    assert calls.forward > 0 and count == len(ids) - 1
    windows = sliding_window_windows(len(ids), 12, 5)
    expected = sum(reference_nll(model, ids[b:e], f - b, e - b) for b, e, f in windows)
    assert nll == pytest.approx(expected, rel=1e-5)
    unhalved = sliding_window_nll(tiny_llama(len(tokenizer)), tokenizer, texts, max_length=12, stride=5)
    assert nll != pytest.approx(unhalved[0], rel=1e-3)  # what a split through lm_head would have given

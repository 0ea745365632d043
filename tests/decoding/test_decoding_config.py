"""The decoding settings are checked once, when made, and a call returns only what its options ask for."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_llama

from unidetox.decoding.config import GenerateOptions, SamplingConfig
from unidetox.decoding.fused import contrastive_generate


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: GenerateOptions(max_new_tokens=0), r"`max_new_tokens` has to be >= 1, but is 0"),
        (lambda: GenerateOptions(min_new_tokens=-1), r"`min_new_tokens` has to be >= 0, but is -1"),
        (lambda: SamplingConfig(alpha=1.5), r"`alpha` has to be a float in \(0, 1\], but is 1.5"),
        (lambda: SamplingConfig(beta=-1.0), r"`beta` has to be None, math.inf or a float >= 0"),
        (lambda: SamplingConfig(temperature=0.0), r"`temperature` has to be > 0"),
    ],
)
def test_bad_settings_are_refused_when_made_naming_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "two-model"])
def test_scores_are_returned_only_when_asked_for(fused):
    base = tiny_llama(32, seed=0)
    torch.manual_seed(1)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    input_ids = torch.tensor([[1, 5, 6], [1, 7, 8]])
    mask = torch.ones_like(input_ids)
    options = GenerateOptions(max_new_tokens=3, do_sample=False, eos_token_id=[], pad_token_id=0)
    plain = contrastive_generate(lora, input_ids, mask, SamplingConfig(), options, fused=fused)
    scored = contrastive_generate(lora, input_ids, mask, SamplingConfig(),
                                  GenerateOptions(**{**vars(options), "output_scores": True}), fused=fused)
    assert plain.scores is None
    assert len(scored.scores) == 3 and scored.scores[0].shape == (2, 32)
    assert torch.equal(plain.sequences, scored.sequences) and plain.sequences.shape == (2, 6)

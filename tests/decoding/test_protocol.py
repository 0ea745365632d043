"""One sampling protocol: the evaluation, the validation callback and the replication share its fields and checks."""

from dataclasses import fields

import pytest

from unidetox.decoding.protocol import ToxicityEvalConfig
from unidetox.detox.callbacks import DetoxEvalConfig
from unidetox.evaluation.prompts import PromptsConfig


def test_validation_config_is_the_protocol_plus_its_seed_and_perplexity():
    protocol = {f.name for f in fields(ToxicityEvalConfig)}
    assert protocol <= {f.name for f in fields(DetoxEvalConfig)}
    config = DetoxEvalConfig(num_samples=7, max_new_tokens=9, top_p=0.8, seed=3, ppl_max_length=64)
    assert config.protocol() == ToxicityEvalConfig(num_samples=7, max_new_tokens=9, top_p=0.8)
    assert config.perplexity_stride == 32


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_samples": 0}, "num_samples"), ({"top_p": 0.0}, "top_p"), ({"temperature": 0}, "temperature"),
     ({"ppl_max_length": 1}, "ppl_max_length"), ({"ppl_batch_size": 0}, "ppl_batch_size")],
)
def test_validation_config_runs_the_protocols_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DetoxEvalConfig(**kwargs)


def test_the_prompt_count_belongs_to_the_prompt_set():
    with pytest.raises(ValueError, match="num_prompts"):
        PromptsConfig(num_prompts=0)

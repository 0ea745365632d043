"""Config errors that help: a key typo names its section and the nearest valid name, the quoting advice parses to
what was meant, and no error that echoes an override echoes a secret."""

import re

import pytest

from unidetox.distill import pipeline as distill
from unidetox.evaluation import pipeline as evaluate
from unidetox.evaluation.scoring import ScorerConfig
from unidetox.hydra_config import compose_config, parse_dataclass

SECRET = "AIzaSENTINEL31"


def test_a_key_typo_names_the_section_the_key_and_the_nearest_valid_name():
    with pytest.raises(ValueError, match=r"'nmu_samples' in section 'distill'.*did you mean num_samples") as err:
        compose_config("distill", ["distill.nmu_samples=5"])
    assert "batch_size" in str(err.value)  # the section's keys
    # Added with '+' (as Hydra advises), the section's dataclass names it the same way.
    with pytest.raises(ValueError, match=r"'nmu_samples' in section 'distill': did you mean num_samples") as err:
        distill.parse_args(["+distill.nmu_samples=5"])
    assert "HfArgumentParser" not in str(err.value)


def test_a_top_level_typo_names_the_nearest_key():
    with pytest.raises(ValueError, match=r"'sed' at the top level.*did you mean seed\?"):
        compose_config("distill", ["sed=1"])


def test_the_quoting_advice_for_a_list_of_overrides_parses_to_that_list():
    meant = ["scorer=perspective", "eval.num_samples=2"]
    with pytest.raises(ValueError) as err:
        compose_config("replicate", ["experiment=tiny", f"test.overrides=[{','.join(meant)}]"])
    advised = re.search(r"pass '(.*?)' \(shell single quotes", str(err.value)).group(1)
    assert list(compose_config("replicate", ["experiment=tiny", advised]).test.overrides) == meant


@pytest.mark.parametrize("recipe, override", [
    ("evaluate", f"scorer.api_key=a={SECRET}"),  # malformed: Hydra's grammar rejects it
    ("evaluate", f"++scorer.api_key=[{SECRET}=x"),
    ("evaluate", f"+hf_token={SECRET}"),  # an unknown top-level key
    ("evaluate", f"scorer.apikey={SECRET}"),  # a typo of the key
    ("replicate", f"test.overrides=[scorer=perspective,scorer.api_key={SECRET}]"),  # inside a list
])
def test_no_config_error_echoes_a_secret(recipe, override):
    with pytest.raises(ValueError) as err:
        compose_config(recipe, [override])
    assert SECRET not in str(err.value) and "***" in str(err.value)


def test_a_secret_list_set_without_a_plus_is_refused_by_type_unechoed():
    # api_key is a ScorerConfig field, so it composes without '+'; its dataclass refuses the list.
    with pytest.raises(ValueError, match=r"scorer\.api_key=\*\*\*: expected") as err:
        evaluate.parse_args([f"scorer.api_key=[a {SECRET}]"])
    assert SECRET not in str(err.value)


def test_a_secret_of_the_wrong_type_is_not_echoed():
    with pytest.raises(ValueError, match=r"scorer\.api_key=\*\*\*: expected") as err:
        parse_dataclass({"api_key": {"nested": SECRET}}, ScorerConfig, name="scorer")
    assert SECRET not in str(err.value)

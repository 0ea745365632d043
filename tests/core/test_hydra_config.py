"""unidetox.hydra_config: composing a recipe's config, handing its sections to dataclasses, saving it."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import pytest
from omegaconf import OmegaConf

import unidetox.hydra_config as hydra_config
from unidetox import UniversalDetoxConfig
from unidetox.hydra_config import (
    CONF_DIR,
    compose_config,
    parse_dataclass,
    save_resolved_config,
    to_container,
)
from unidetox.run_dir import CONFIG_FILE

AUTHORS_CSV = "generated_texts_alpha=0.1_beta=inf_checkpoint-15126.csv"  # the authors' file name holds '='


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass
class Example:
    count: int = 1
    rate: float = 0.5
    flag: bool = False
    name: str = "x"
    limit: Optional[int] = None  # noqa: UP045 (a typing.Union, where ``X | None`` is a types.UnionType)
    beta: float | None = None
    seeds: list[int] = field(default_factory=list)
    labels: list[str] | None = None
    mode: Literal["fast", "slow"] = "fast"
    colour: Colour = Colour.RED
    filters: dict[str, list[Any]] | None = None
    anything: Any = None
    either: int | str = 0
    loose: Union[str, Any] = ""  # noqa: UP007 (``str | Any`` needs Python 3.11)


def trainer_section(*overrides: str):
    return compose_config("detox", ["trainer=embedded_lora", *overrides]).trainer


# Wrong types from the command line: named, with the value and the expected type.

@pytest.mark.parametrize("override, key", [
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("trainer.seed=abc", "trainer.seed"),
    ("trainer.max_steps=2.5", "trainer.max_steps"),
    ("trainer.max_steps=true", "trainer.max_steps"),
    ("trainer.learning_rate=abc", "trainer.learning_rate"),
    ("trainer.learning_rate=nan", "trainer.learning_rate"),
    ("trainer.packing=maybe", "trainer.packing"),
])
def test_a_wrong_type_from_the_command_line_names_the_key(override, key):
    value = override.partition("=")[2]
    with pytest.raises(ValueError, match=rf"(?i){key}\b.*{value}") as err:
        parse_dataclass(trainer_section(override), UniversalDetoxConfig, name="trainer")
    assert "NaN" in str(err.value) if value == "nan" else "expected" in str(err.value)


def test_without_a_name_the_message_names_the_bare_field():
    with pytest.raises(ValueError, match=r"^max_steps='abc'"):
        parse_dataclass(trainer_section("trainer.max_steps=abc"), UniversalDetoxConfig)


def test_a_whole_float_is_an_int_and_infinity_stays_a_number():
    args = parse_dataclass(trainer_section("trainer.max_steps=4.0", "trainer.save_steps=2"), UniversalDetoxConfig)
    assert args.max_steps == 4 and type(args.max_steps) is int
    parsed = parse_dataclass({"rate": "inf", "beta": float("inf")}, Example)
    assert parsed.rate == parsed.beta == math.inf


def test_lossless_values_are_converted_to_the_annotated_type():
    parsed = parse_dataclass({
        "count": "5", "rate": 5, "flag": "true", "name": 7, "limit": 3.0, "beta": "0.25", "seeds": ["1", 2.0],
        "labels": "hate", "mode": "slow", "colour": "blue", "filters": {"label": "hate"}, "either": "7",
    }, Example)
    assert (parsed.count, parsed.rate, parsed.flag, parsed.name, parsed.limit, parsed.beta) == (5, 5.0, True, "7", 3, 0.25)
    # an int is a valid float and stays one (TrainingArguments' float step fields count steps as ints)
    assert type(parsed.rate) is int and type(parsed.limit) is int
    assert type(parse_dataclass({"rate": "0.5"}, Example).rate) is float
    assert parsed.seeds == [1, 2] and all(type(s) is int for s in parsed.seeds)
    assert parsed.labels == ["hate"] and parsed.mode == "slow" and parsed.colour is Colour.BLUE
    assert parsed.filters == {"label": ["hate"]} and parsed.either == "7"


def test_null_and_values_of_types_it_cannot_check_are_left_as_they_are():
    marker = object()
    parsed = parse_dataclass({"limit": None, "labels": None, "anything": marker, "loose": marker}, Example)
    assert parsed.limit is None and parsed.labels is None and parsed.anything is parsed.loose is marker


@pytest.mark.parametrize("values, message", [
    ({"seeds": [1, "x"]}, r"demo\.seeds\[1\]='x'.*expected int"),
    ({"mode": "medium"}, r"demo\.mode='medium'.*'fast', 'slow'"),
    ({"colour": "green"}, r"demo\.colour='green'.*'red', 'blue'"),
    ({"filters": "label"}, r"demo\.filters='label'.*expected dict"),
    ({"flag": 2}, r"demo\.flag=2.*expected bool"),
    ({"name": True}, r"demo\.name=True.*expected str"),
    ({"limit": 1.5}, r"demo\.limit=1\.5.*expected int \| None"),
    ({"anything": [1.0, float("nan")]}, r"demo\.anything\[1\]=nan.*NaN"),
])
def test_values_that_do_not_fit_are_rejected_naming_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        parse_dataclass(values, Example, name="demo")


def test_training_arguments_unions_and_dicts_are_accepted():
    section = {**to_container(trainer_section()), **{
        "save_strategy": "steps", "lr_scheduler_type": "cosine", "report_to": "none", "lr_scheduler_kwargs": {},
        "include_num_input_tokens_seen": True, "pad_to_multiple_of": 8, "gradient_checkpointing_kwargs": None,
    }}
    args = parse_dataclass(section, UniversalDetoxConfig, name="trainer")
    assert args.save_strategy == "steps" and args.report_to == [] and args.pad_to_multiple_of == 8


# Unknown top-level keys.

@pytest.mark.parametrize("override", ["+foo=1", "++foo=1", "+foo.bar=1"])
def test_an_unknown_top_level_key_is_rejected(override):
    with pytest.raises(ValueError, match=r"'foo'.*trainer") as err:
        compose_config("detox", [override])
    assert override in str(err.value) and "output_dir" in str(err.value)


@pytest.mark.parametrize("recipe, overrides", [
    ("detox", ["experiment=embedded_smollm2", "data.path=runs/replicate-embedded/distill-a0.1/distilled",
               "trainer.max_steps=100", "++trainer.stop_at_step=50", "+trainer.disable_tqdm=true", "peft.r=4"]),
    ("detox", ["experiment=paper_llama2_7b", "++output_dir=runs/x", "++data_dir=data"]),
    ("distill", ["output_dir=runs/distill-n512", "anti_expert.pretrained_path=runs/a", "sampler.alpha=0.2"]),
    ("evaluate", ["models=[smollm2-135m,gemma3-270m]", "seeds=[0,1]", "parts_dir=runs/parts", "scorer=perspective"]),
    ("replicate", ["experiment=paper", "launcher.engine=submitit", "launcher.cluster=slurm", "launcher.partition=gpu",
                   "launcher.gpus_per_node=1", "launcher.timeout_min=600", "launcher.max_concurrent_jobs=8"]),
    ("replicate", ["experiment=tiny", "output_dir=runs/rep"]),
])
def test_documented_overrides_still_compose(recipe, overrides):
    cfg = compose_config(recipe, overrides, free_form_groups=("model",) if recipe in ("detox", "distill") else ())
    assert "foo" not in cfg and cfg.data_dir


def test_every_primary_config_composes():
    for path in sorted(CONF_DIR.glob("*.yaml")):
        assert compose_config(path.stem).output_dir


# Override values holding '='.

def test_a_value_holding_an_equals_sign_says_how_to_quote_it():
    path = f"runs/reference/{AUTHORS_CSV}"
    with pytest.raises(ValueError) as err:
        compose_config("detox", [f"data.path={path}"])
    message = str(err.value)
    suggested = f"""'data.path="{path}"'"""
    assert f"data.path={path}" in message and suggested in message
    assert compose_config("detox", [suggested.strip("'")]).data.path == path


def test_a_data_dir_holding_an_equals_sign_composes(monkeypatch, tmp_path):
    data_dir = tmp_path / "alpha=0.1"
    monkeypatch.setenv("UNIDETOX_DATA_DIR", str(data_dir))
    assert compose_config("detox").data_dir == str(data_dir)


# Saving the resolved config.

def test_a_saved_config_holds_no_secret(tmp_path):
    cfg = compose_config("evaluate", ["scorer=perspective", "scorer.api_key=SENTINEL"])
    path = save_resolved_config(cfg, tmp_path)
    assert path == tmp_path / "config.yaml" and (tmp_path / CONFIG_FILE).is_file()
    for saved in tmp_path.iterdir():
        assert "SENTINEL" not in saved.read_text()
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["scorer"]["api_key"] == "***"
    assert OmegaConf.load(path).scorer.name == "perspective"


def test_only_the_main_process_saves(tmp_path, monkeypatch):
    monkeypatch.setattr(hydra_config, "is_main_process", lambda: False)
    assert save_resolved_config(compose_config("evaluate"), tmp_path / "out") is None
    assert not (tmp_path / "out").exists()

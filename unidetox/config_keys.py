"""The keys each command's config sections accept: every field of the section's dataclass with its type, default
and help text, for ``unidetox COMMAND --help`` and for setting any field with a plain ``section.field=value``.

The dataclasses live in modules that import torch, transformers and trl (``UniversalDetoxConfig`` is a
``trl.SFTConfig`` with some 150 fields), which takes seconds; so the table is generated from the dataclasses
themselves and shipped as ``config_keys.json``, read in milliseconds. Parsing the sources with ``ast`` instead would
have to follow the inheritance chain into transformers' and trl's sources and evaluate their defaults; the generated
table is exact, and a test regenerates it and fails when it is out of date. Regenerate it with::

    python -m unidetox.config_keys

>>> section_fields("detox")["trainer"]["learning_rate"]["type"]
'float'
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import re
import types
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

KEYS_FILE = Path(__file__).resolve().parent / "config_keys.json"

# command -> config section (dotted, "" for the top level) -> "module:Dataclass" that parses it
SECTION_DATACLASSES: dict[str, dict[str, str]] = {
    "distill": {
        "model": "unidetox.models:ModelArguments",
        "data": "unidetox.distill.corpus:ToxicCorpusConfig",
        "anti_expert": "unidetox.distill.anti_expert:AntiExpertConfig",
        "sampler": "unidetox.decoding.config:SamplingConfig",
        "distill": "unidetox.distill.config:DistillConfig",
    },
    "detox": {
        "model": "unidetox.models:ModelArguments",
        "data": "unidetox.detox.pipeline:DataArguments",
        "trainer": "unidetox.detox.config:UniversalDetoxConfig",
        "peft": "unidetox.lora:LoraArguments",
        "select": "unidetox.detox.pipeline:SelectArguments",
        "eval.prompts": "unidetox.evaluation.prompts:PromptsConfig",
        "eval.callback": "unidetox.detox.callbacks:DetoxEvalConfig",
        "eval.scorer": "unidetox.evaluation.scoring:ScorerConfig",
    },
    "evaluate": {
        "prompts": "unidetox.evaluation.prompts:PromptsConfig",
        "eval": "unidetox.decoding.protocol:ToxicityEvalConfig",
        "scorer": "unidetox.evaluation.scoring:ScorerConfig",
        "perplexity": "unidetox.evaluation.config:PerplexityConfig",
        "mmlu": "unidetox.evaluation.mmlu:MMLUConfig",
        "capabilities": "unidetox.evaluation.capabilities:CapabilitiesConfig",
        "decoding": "unidetox.evaluation.config:DecodingConfig",
        "model_card": "unidetox.evaluation.model_card:ModelCardConfig",
    },
    "replicate": {
        "validation": "unidetox.replication.config:ValidationSplitArguments",
        "validation.protocol": "unidetox.detox.callbacks:DetoxEvalConfig",
        "grid": "unidetox.replication.config:GridArguments",
        "select": "unidetox.detox.selection:SelectionRule",
        "baselines": "unidetox.replication.config:BaselineArguments",
        "baselines.nothate_data": "unidetox.distill.corpus:ToxicCorpusConfig",
        "test": "unidetox.replication.config:TestArguments",
        "bar": "unidetox.replication.config:SuccessBar",
        "launcher": "unidetox.replication.launcher:LauncherArguments",
    },
    "rescore": {
        "": "unidetox.evaluation.rescore:RescoreArguments",
        "scorer": "unidetox.evaluation.scoring:ScorerConfig",
    },
}


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return type(value).__name__ + "()"
    return json.dumps(value, default=str)


def type_name(annotation) -> str:
    """How ``--help`` and the config errors name an annotation (``int | None``, ``one of 'a', 'b'``)."""
    if annotation is type(None):
        return "None"
    if get_origin(annotation) in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(annotation))
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return f"{annotation.__name__} (one of {', '.join(repr(m.value) for m in annotation)})"
    if isinstance(annotation, type) and not get_args(annotation):
        return annotation.__name__
    return repr(annotation).replace("typing.", "")


def describe_dataclass(dataclass_type) -> dict[str, dict[str, str]]:
    """Each init field of ``dataclass_type``: ``{name: {"type", "default", "help"}}`` (help whitespace-collapsed)."""
    try:
        hints = get_type_hints(dataclass_type)
    except (NameError, TypeError):  # an annotation naming something its module does not import at run time
        hints = {}
    described = {}
    for field in dataclasses.fields(dataclass_type):
        if not field.init or field.name.startswith("_"):
            continue
        annotation = hints.get(field.name, field.type)
        described[field.name] = {
            "type": annotation if isinstance(annotation, str) else type_name(annotation),
            "default": _default_text(field),
            "help": re.sub(r"\s+", " ", str(field.metadata.get("help", ""))).strip(),
        }
    return described


def generate_table() -> dict[str, dict[str, dict[str, dict[str, str]]]]:
    """The table from the dataclasses themselves (imports torch, transformers, trl and peft)."""
    table: dict[str, dict[str, Any]] = {}
    for command, sections in SECTION_DATACLASSES.items():
        table[command] = {}
        for section, target in sections.items():
            module, _, name = target.partition(":")
            table[command][section] = describe_dataclass(getattr(importlib.import_module(module), name))
    return table


@cache
def load_table() -> dict[str, dict[str, dict[str, dict[str, str]]]]:
    """The shipped table (:data:`KEYS_FILE`)."""
    return json.loads(KEYS_FILE.read_text(encoding="utf-8"))


def section_fields(command: str) -> dict[str, dict[str, dict[str, str]]]:
    """``{section: {field: {"type", "default", "help"}}}`` of ``command`` (empty for an unknown command)."""
    return load_table().get(command, {})


def write_table(path: Path = KEYS_FILE) -> Path:
    path.write_text(json.dumps(generate_table(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(f"wrote {write_table()}")

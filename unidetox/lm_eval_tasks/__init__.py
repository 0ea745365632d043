"""lm-evaluation-harness tasks shipped with unidetox; pass this folder to lm-eval as ``--include_path``.

``unidetox_toxigen``, ``unidetox_prompts_file``
    The paper's toxicity protocol (25 samples x 20 new tokens, top-p 0.9) with TP and EMT scored by a scorer of
    :data:`unidetox.evaluation.scoring.SCORERS` (default ``profanity_check``, offline).
``unidetox_mmlu`` (group of ``unidetox_mmlu_<subject>``), ``unidetox_wikitext``
    lm-eval's ``mmlu`` and ``wikitext`` over the local copies under ``$UNIDETOX_DATA_DIR``, since the stock tasks
    load from the hub.

Example:
    >>> from unidetox.lm_eval_tasks import include_path
    >>> from lm_eval.tasks import TaskManager
    >>> "unidetox_toxigen" in TaskManager(include_path=include_path(), include_defaults=False).all_tasks
    True
"""

from __future__ import annotations

from pathlib import Path


def include_path() -> str:
    """The folder of the unidetox task YAMLs (``lm_eval --include_path``)."""
    return str(Path(__file__).resolve().parent)

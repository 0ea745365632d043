"""What the unidetox lm-eval task YAMLs name with ``!function``: local datasets and the toxicity metrics.

Every loader is an lm-eval ``custom_dataset``: lm-eval calls it with the task's ``metadata`` (what
``--metadata '{...}'`` / ``TaskManager(metadata=...)`` adds, plus lm-eval's own keys such as ``version``) and its
``dataset_kwargs``. The keys read here:

``data_dir``
    The shared data folder (default: ``$UNIDETOX_DATA_DIR``, as the rest of unidetox).
``prompts``
    Fields of :class:`unidetox.evaluation.prompts.PromptsConfig`, e.g. ``{"split": "test", "num_prompts": 100}``;
    for ``unidetox_prompts_file`` also ``{"path": "prompts.jsonl", "field": "prompt.text"}`` (the path may
    instead come from ``$UNIDETOX_PROMPTS_FILE``).
``scorer``
    A scorer name from :data:`unidetox.evaluation.scoring.SCORERS` or a dict of
    :class:`~unidetox.evaluation.scoring.ScorerConfig` fields (default ``profanity_check``, offline).
``wikitext_path``
    ``unidetox_wikitext``: the ``wiki.test.raw`` to read (default ``data_dir/wikitext2/wiki.test.raw``).

Missing data raises ``FileNotFoundError`` naming the path and both fixes before any model call, so a task never
falls back to the hub.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

from unidetox.evaluation.prompts import LOCAL_CSV, Prompt, PromptsConfig, load_prompts
from unidetox.evaluation.scoring import ScorerConfig, ToxicityScorer, build_scorer
from unidetox.paths import default_data_dir, require_file

PROMPTS_FILE_ENV_VAR = "UNIDETOX_PROMPTS_FILE"
WIKITEXT_FILE = Path("wikitext2") / "wiki.test.raw"
MMLU_DIR = Path("mmlu")
# How a data folder reaches lm-eval's tasks.
DATA_DIR_METADATA = "--metadata '{\"data_dir\": \"/path/to/shared/data\"}'"


def _data_dir(metadata: dict) -> Path:
    if metadata.get("data_dir"):
        return Path(metadata["data_dir"]).expanduser()
    return default_data_dir(elsewhere=f"pass the data folder to lm-eval: {DATA_DIR_METADATA}")


def _require(path: Path, what: str) -> Path:
    """``path``, or a ``FileNotFoundError`` saying how to point lm-eval at the data."""
    return require_file(path, what, elsewhere=f"Pass the data folder to lm-eval: {DATA_DIR_METADATA}")


def _scorer_fields(metadata: dict) -> dict:
    """The public :class:`ScorerConfig` fields the docs carry to :func:`process_toxicity_results`.

    ``process_results`` sees only a doc and its generations, so the scorer travels in the doc. lm-eval writes
    docs and metadata into its sample logs and results, so a secret is refused here instead of being written.
    """
    spec = metadata.get("scorer") or "profanity_check"
    fields = {"name": spec} if isinstance(spec, str) else dict(spec)
    if fields.get("api_key"):
        raise ValueError(
            "Do not pass the scorer's api_key through lm-eval metadata: lm-eval writes metadata into its result "
            "files. Set $PERSPECTIVE_API_KEY instead."
        )
    config = ScorerConfig(**fields)  # checks the name and the values now, before any generation
    return config.to_public_dict()


def _prompts_config(metadata: dict, **fixed) -> PromptsConfig:
    given = dict(metadata.get("prompts") or {})
    known = {f.name for f in dataclasses.fields(PromptsConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"Unknown prompts settings {unknown} in the lm-eval metadata; known: {sorted(known)}.")
    return PromptsConfig(**{**given, **fixed})


def _toxicity_dataset(prompts: list[Prompt], metadata: dict):
    import datasets

    scorer = json.dumps(_scorer_fields(metadata), sort_keys=True)
    rows = [{"prompt": p.text, "id": p.id, "category": p.category or "", "group": p.group or "", "scorer": scorer}
            for p in prompts]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_toxigen(**metadata):
    """``unidetox_toxigen``: the evaluate stage's default prompts (local annotated ToxiGen, ``toxigen_local``)."""
    data_dir = _data_dir(metadata)
    config = _prompts_config(metadata, source="toxigen_local", data_dir=str(data_dir))
    _require(Path(config.path).expanduser() if config.path else data_dir / LOCAL_CSV, "The ToxiGen annotated CSV")
    return _toxicity_dataset(load_prompts(config), metadata)


def load_prompts_file(**metadata):
    """``unidetox_prompts_file``: any .jsonl/.json/.txt/.csv of prompts (``prompts.path`` or the env var)."""
    given = dict(metadata.get("prompts") or {})
    path = given.get("path") or os.environ.get(PROMPTS_FILE_ENV_VAR)
    if not path:
        raise ValueError(
            "unidetox_prompts_file needs a prompt file: set $UNIDETOX_PROMPTS_FILE=prompts.jsonl or pass "
            "--metadata '{\"prompts\": {\"path\": \"prompts.jsonl\", \"field\": \"prompt.text\"}}'."
        )
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Prompt file not found at {path}. Point $UNIDETOX_PROMPTS_FILE or the metadata's prompts.path at an "
            "existing .jsonl/.json/.txt/.csv file."
        )
    config = _prompts_config({**metadata, "prompts": {**given, "path": str(path)}}, source="file")
    return _toxicity_dataset(load_prompts(config), metadata)


@functools.lru_cache(maxsize=8)
def _scorer(fields_json: str) -> ToxicityScorer:
    return build_scorer(json.loads(fields_json))


def process_toxicity_results(doc: dict, results: list) -> dict:
    """Score all of a doc's samples in one scorer call; both metrics receive that list of scores."""
    (continuations,) = results  # the task's filter keeps every repeat: one list of K continuations
    scores = _scorer(doc["scorer"])(list(continuations))
    return {"toxicity_probability": scores, "expected_max_toxicity": scores}


def load_mmlu_subject(subject: str, **metadata):
    """``unidetox_mmlu_<subject>``: the local MMLU CSVs (``data_dir/mmlu/{test,dev}/<subject>_<split>.csv``) in
    the columns lm-eval's ``mmlu`` tasks read (``question``, ``choices``, ``answer``)."""
    import datasets

    folder = _data_dir(metadata) / MMLU_DIR
    files = {split: str(_require(folder / split / f"{subject}_{split}.csv", f"The MMLU {split} file of {subject}"))
             for split in ("test", "dev")}
    loaded = datasets.load_dataset("csv", data_files=files)
    choice_columns = [f"choice{i}" for i in range(4)]
    return loaded.map(lambda row: {"choices": [str(row[c]) for c in choice_columns]}, remove_columns=choice_columns)


def split_wikitext_pages(text: str) -> list[str]:
    """Raw WikiText -> one string per article, split at top-level headings (`` = Title = ``) as
    ``EleutherAI/wikitext_document_level`` (the dataset of lm-eval's ``wikitext`` task) splits it."""
    pages, lines = [], []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return [page for page in pages if page.strip()]


def load_wikitext(**metadata):
    """``unidetox_wikitext``: the local WikiText-2 test file as lm-eval's document-level ``page`` rows."""
    import datasets

    if metadata.get("wikitext_path"):
        path = Path(metadata["wikitext_path"]).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"WikiText file not found at {path}; fix the metadata's wikitext_path.")
    else:
        path = _require(_data_dir(metadata) / WIKITEXT_FILE, "The WikiText-2 test file")
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")  # the shared copy has CRLF line endings
    pages = split_wikitext_pages(text)
    if not pages:
        raise ValueError(f"{path} holds no text.")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"page": page} for page in pages])})


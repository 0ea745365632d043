"""Prompt sets for the toxicity evaluation: ToxiGen (hub or local copies) and any jsonl/txt/csv file.

The paper prompts models with the human-annotated ToxiGen **test** split (hub ``skg/toxigen-data``, config
``annotated``, 940 statements), grouped by ``target_group`` into four categories; the headline "combined" number
averages the first three (disability is reported apart).

Offline stand-ins, both read by path from ``$UNIDETOX_DATA_DIR/toxigen`` (see its SOURCE.md):

``toxigen_local`` (the default)
    The annotated **train** split (8,960 statements, 13 target groups; the ``text`` column is a Python bytes
    literal and is decoded). It is the same human-annotated distribution as the paper's test split (hateful and
    neutral statements about the same groups), so it is the closest substitute. Exact-duplicate texts are dropped.
``toxigen_fewshot``
    The generation prompts ``prompts/{hate,neutral}_<group>_1k.txt``: each line is ~6 example statements that
    begin with ``- `` and are joined by a literal backslash-n. The literal ``\\n`` becomes a real newline and the
    trailing ``-`` is kept, so the model continues the list with a new statement (how ToxiGen prompted GPT-3).
    The first ``per_group`` lines of each file are used. These prompts are far more hateful than the annotated
    statements; use them as a stress test, not as a stand-in for the paper's numbers.

Prompts have a stable ``id`` (hash of the text). Two deterministic operations build evaluation sets:
:func:`split_prompts` (``validation`` / ``test``, disjoint by prompt, by a seeded hash) and
:func:`select_prompts` (a fixed, category-balanced subset of ``n`` prompts, nested: the first ``n`` are a subset
of the first ``n + 1``).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import itertools
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unidetox.files import read_json_file
from unidetox.paths import default_data_dir, require_file

CATEGORIES = ("gender_lgbtq", "race_nationalities", "religion", "disability")
COMBINED_CATEGORIES = ("gender_lgbtq", "race_nationalities", "religion")  # the paper's "combined" average

# target_group -> category, covering the local CSV, the prompt files and the hub's test split (as the authors map).
GROUP_TO_CATEGORY: dict[str, str] = {
    **dict.fromkeys(["women", "lgbtq", "lgbtq+ folks", "bisexual", "trans"], "gender_lgbtq"),
    **dict.fromkeys(
        [
            "black", "black folks / african-americans", "black/african-american folks", "asian", "asian folks",
            "latino", "latino/hispanic folks", "chinese", "chinese folks", "mexican", "mexican folks",
            "middle_east", "middle eastern folks", "native_american", "native american/indigenous folks",
            "native american folks", "immigrant",
        ],
        "race_nationalities",
    ),
    **dict.fromkeys(["jewish", "jewish folks", "muslim", "muslim folks"], "religion"),
    **dict.fromkeys(
        [
            "mental_dis", "folks with mental disabilities", "physical_dis", "folks with physical disabilities",
            "mental_disability", "physical_disability",
        ],
        "disability",
    ),
}

SOURCES = ("auto", "toxigen_local", "toxigen_fewshot", "toxigen_hub", "file")
HUB_DATASET = "skg/toxigen-data"
LOCAL_CSV = Path("toxigen") / "annotated_train" / "toxigen_annotated_train.csv"
LOCAL_PROMPT_DIR = Path("toxigen") / "prompts"


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt. ``category`` is one of :data:`CATEGORIES` for ToxiGen, else from the file or None."""

    text: str
    category: str | None = None
    group: str | None = None
    label: str | None = None
    id: str = ""

    def __post_init__(self):
        if not self.id:
            object.__setattr__(self, "id", prompt_id(self.text))


def prompt_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _unit_hash(seed: int, key: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}/{int(seed)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


@dataclass
class PromptsConfig:
    """Which prompts to evaluate on.

    Example:
        >>> from unidetox.evaluation.prompts import PromptsConfig, load_prompts
        >>> config = PromptsConfig(source="toxigen_local", split="validation", num_prompts=100)
        >>> prompts = load_prompts(config)  # doctest: +SKIP
    """

    source: str = dataclasses.field(
        default="auto",
        metadata={"help": f"One of {SOURCES}. 'auto': no path -> toxigen_local; a folder -> toxigen_fewshot; a CSV "
                  "with a target_group column -> toxigen_local; any other file -> file."},
    )
    path: str | None = dataclasses.field(
        default=None,
        metadata={"help": "File to read: the annotated CSV (toxigen_local), the prompts/ folder (toxigen_fewshot), "
                  "or any .jsonl/.json/.txt/.csv of prompts (file). Default: under `data_dir`/toxigen."},
    )
    field: str = dataclasses.field(
        default="prompt",
        metadata={"help": "jsonl/csv: the prompt's key; dots reach into nested objects (RealToxicityPrompts: "
                  "prompt.text). Ignored for .txt (one prompt per line)."},
    )
    category_field: str | None = dataclasses.field(
        default=None, metadata={"help": "jsonl/csv: optional key of each prompt's category (dots allowed)."}
    )
    data_dir: str | None = dataclasses.field(default=None, metadata={"help": "Shared data folder (default: $UNIDETOX_DATA_DIR)."})
    split: str = dataclasses.field(
        default="all",
        metadata={"help": "'all', or 'validation' / 'test': a disjoint, seeded split by prompt (see split_seed)."},
    )
    validation_fraction: float = dataclasses.field(default=0.2, metadata={"help": "Share of prompts in the validation split."})
    split_seed: int = dataclasses.field(default=0, metadata={"help": "Seed of the validation/test split."})
    num_prompts: int | None = dataclasses.field(
        default=None, metadata={"help": "Keep a fixed category-balanced subset of this many prompts (None = all)."}
    )
    subset_seed: int = dataclasses.field(default=0, metadata={"help": "Seed of the num_prompts subset."})
    labels: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "ToxiGen: keep only these labels (e.g. [hate]); None keeps all."}
    )
    kinds: list[str] = dataclasses.field(
        default_factory=lambda: ["hate"],
        metadata={"help": "toxigen_fewshot: which prompt files, 'hate' and/or 'neutral'."},
    )
    per_group: int = dataclasses.field(default=100, metadata={"help": "toxigen_fewshot: first N lines of each group's file."})
    hub_split: str = dataclasses.field(default="test", metadata={"help": "toxigen_hub: hub split (paper: test)."})
    categories: list[str] | None = dataclasses.field(
        default=None, metadata={"help": f"Keep only these categories (of {CATEGORIES}); None keeps all."}
    )

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"`source` has to be one of {SOURCES}, but is {self.source!r}.")
        if self.source == "auto":
            self.source = detect_source(self.path)
        if self.source == "file" and not self.path:
            raise ValueError("`source='file'` needs `path` (recipes: prompts.path=FILE).")
        if self.split not in ("all", "validation", "test"):
            raise ValueError(f"`split` has to be 'all', 'validation' or 'test', but is {self.split!r}.")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"`validation_fraction` has to be in (0, 1), but is {self.validation_fraction}.")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"`num_prompts` has to be None or >= 1, but is {self.num_prompts}.")
        bad = [k for k in self.kinds if k not in ("hate", "neutral")]
        if bad or not self.kinds:
            raise ValueError(f"`kinds` has to be a non-empty list of 'hate'/'neutral', but is {self.kinds!r}.")
        if self.per_group < 1:
            raise ValueError(f"`per_group` has to be >= 1, but is {self.per_group}.")
        if self.categories is not None:
            unknown = [c for c in self.categories if c not in CATEGORIES]
            if unknown:
                raise ValueError(f"Unknown categories {unknown}; choose from {CATEGORIES}.")

    @property
    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir).expanduser() if self.data_dir else default_data_dir()


def detect_source(path: str | os.PathLike | None) -> str:
    """The source ``auto`` stands for: see :attr:`PromptsConfig.source`."""
    if not path:
        return "toxigen_local"
    path = Path(path).expanduser()
    if path.is_dir():
        return "toxigen_fewshot"
    if path.suffix.lower() == ".csv" and path.is_file():
        with path.open(encoding="utf-8", errors="replace") as fh:
            header = fh.readline().strip().split(",")
        if "target_group" in header and "text" in header:
            return "toxigen_local"
    return "file"


# ---------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------
def decode_bytes_literal(value: str) -> str:
    """``"b'asians are ...'"`` -> ``"asians are ..."``; other strings are returned unchanged."""
    value = value.strip()
    if len(value) >= 3 and value[0] == "b" and value[1] in "'\"" and value[-1] == value[1]:
        try:
            raw = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value[2:-1]
        if isinstance(raw, bytes):
            return raw.decode("utf-8", errors="replace")
    return value


def _not_utf8(path: Path, err: UnicodeDecodeError) -> ValueError:
    """The error for a prompt file that is not UTF-8: it names the file, the first line that is not, and the fix."""
    with path.open("rb") as fh:
        line = next((number for number, raw in enumerate(fh, start=1) if not _is_utf8(raw)), None)
    where = f"line {line}" if line is not None else f"byte {err.start}"
    return ValueError(
        f"{path} is not UTF-8 text ({where}: {err.reason}); prompt files are read as UTF-8. Convert it, e.g. "
        f"`iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`."
    )


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_csv(path: Path, what: str):
    """``pandas.read_csv``, with an empty file (no header at all) reported as empty."""
    import pandas as pd

    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"The {what} {path} is empty: it holds no header and no prompts.") from err
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def _dedupe(prompts: Sequence[Prompt]) -> list[Prompt]:
    seen, out = set(), []
    for prompt in prompts:
        if prompt.text in seen:
            continue
        seen.add(prompt.text)
        out.append(prompt)
    return out


def read_toxigen_annotated_csv(path: str | os.PathLike) -> list[Prompt]:
    """The local annotated ToxiGen CSV: decode the bytes-literal ``text``, map ``target_group`` to a category."""
    path = require_file(path, "ToxiGen annotated CSV")
    frame = _read_csv(path, "ToxiGen annotated CSV")
    missing = {"text", "target_group"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}; is it the ToxiGen annotated CSV?")
    labels = frame["label"] if "label" in frame.columns else [None] * len(frame)
    prompts = []
    for raw, group, label in zip(frame["text"], frame["target_group"], labels, strict=True):
        text = decode_bytes_literal(str(raw)).strip()
        if text:
            prompts.append(Prompt(text, GROUP_TO_CATEGORY.get(str(group)), str(group), None if label is None else str(label)))
    return _dedupe(prompts)


def fewshot_prompt_text(line: str) -> str:
    """One line of a ToxiGen ``prompts/*.txt`` file -> the prompt: literal ``\\n`` -> newline, trailing ``-`` kept.

    A few lines lack the separator before the final dash (``...am I right?-``); it is restored so every prompt
    ends in ``"\\n-"`` and the model starts a new list item.
    """
    text = line.rstrip("\r\n").replace("\\n", "\n").strip()
    if text.endswith("-") and not text.endswith("\n-"):
        text = text[:-1].rstrip() + "\n-"
    return text


def read_toxigen_fewshot(directory: str | os.PathLike, kinds: Sequence[str] = ("hate",), per_group: int = 100) -> list[Prompt]:
    """The first ``per_group`` lines of each ``<kind>_<group>_1k.txt`` in ToxiGen's ``prompts/`` folder."""
    directory = require_file(directory, "ToxiGen prompts/ folder")
    prompts = []
    for kind in kinds:
        files = sorted(directory.glob(f"{kind}_*_1k.txt"))
        if not files:
            raise FileNotFoundError(f"No {kind}_<group>_1k.txt files in {directory}; is it ToxiGen's prompts/ folder?")
        for file in files:
            group = file.name[len(kind) + 1 : -len("_1k.txt")]
            try:
                with file.open(encoding="utf-8") as fh:
                    lines = list(itertools.islice(fh, per_group))
            except UnicodeDecodeError as err:
                raise _not_utf8(file, err) from err
            for line in lines:
                text = fewshot_prompt_text(line)
                if text:
                    prompts.append(Prompt(text, GROUP_TO_CATEGORY.get(group), group, kind))
    return _dedupe(prompts)


def read_toxigen_hub(split: str = "test") -> list[Prompt]:
    """``skg/toxigen-data`` (``annotated``) from the hub, as the paper uses it. Needs hub access (and a login)."""
    try:
        from datasets import load_dataset

        rows = load_dataset(HUB_DATASET, name="annotated", split=split)
    except Exception as err:  # offline, gated, or missing credentials: say what to do instead
        raise RuntimeError(
            f"Could not load {HUB_DATASET} (annotated, split={split}) from the hub: {type(err).__name__}: {err}. "
            "It needs network access and accepting the dataset's terms (`huggingface-cli login`). Offline, use "
            "the local stand-in: prompts=toxigen_local (recipes) / PromptsConfig(source='toxigen_local')."
        ) from err
    prompts = []
    for row in rows:
        group = str(row.get("target_group"))
        label = row.get("label")
        prompts.append(Prompt(str(row["text"]).strip(), GROUP_TO_CATEGORY.get(group), group,
                              None if label is None else str(label)))
    return _dedupe([p for p in prompts if p.text])


def _get_dotted(record, dotted: str):
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def read_prompt_file(path: str | os.PathLike, field: str = "prompt", category_field: str | None = None) -> list[Prompt]:
    """Prompts from a ``.txt`` (one per line), ``.jsonl`` / ``.json`` (``field`` may be dotted) or ``.csv`` file.

    A file that is not UTF-8, or a line that is not JSON, raises a ``ValueError`` naming the file and the line.
    """
    path = require_file(path, "Prompt file")
    try:
        return _read_prompt_file(path, field, category_field)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from err


def _json_line(path: Path, number: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}, line {number} is not valid JSON (column {err.colno}: {err.msg}); a .jsonl prompt file holds "
            "one JSON record per line: fix or remove that line."
        ) from err


def _read_prompt_file(path: Path, field: str, category_field: str | None) -> list[Prompt]:
    suffix = path.suffix.lower()
    prompts = []
    if suffix == ".txt":
        with path.open(encoding="utf-8") as fh:
            prompts = [Prompt(line.rstrip("\r\n")) for line in fh if line.strip()]
        return _dedupe(prompts)
    if suffix in (".jsonl", ".json"):
        if suffix == ".json":
            records = read_json_file(path, fix="A .json prompt file holds one JSON list of records; use .jsonl for "
                                               "one record per line.")
            if not isinstance(records, list):
                raise ValueError(f"{path} has to hold a JSON list of records; use .jsonl for one record per line.")
        else:
            with path.open(encoding="utf-8") as fh:
                records = [_json_line(path, number, line) for number, line in enumerate(fh, start=1) if line.strip()]
        for i, record in enumerate(records):
            text = _get_dotted(record, field) if isinstance(record, dict) else record
            if not isinstance(text, str):
                keys = list(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"Record {i} of {path} has no string at `{field}` (keys: {keys}); set prompts.field=... "
                    "(dots reach nested keys, e.g. prompt.text)."
                )
            category = _get_dotted(record, category_field) if category_field and isinstance(record, dict) else None
            prompts.append(Prompt(text, None if category is None else str(category)))
        return _dedupe([p for p in prompts if p.text.strip()])
    if suffix == ".csv":
        frame = _read_csv(path, "prompt file")
        if field not in frame.columns:
            raise ValueError(f"{path} has no column {field!r} (columns: {list(frame.columns)}); set prompts.field=...")
        cats = frame[category_field] if category_field else [None] * len(frame)
        for text, cat in zip(frame[field], cats, strict=True):
            if isinstance(text, str) and text.strip():
                prompts.append(Prompt(text, None if cat is None else str(cat)))
        return _dedupe(prompts)
    raise ValueError(f"Unsupported prompt file type {suffix!r} ({path}); use .txt, .jsonl, .json or .csv.")


# ---------------------------------------------------------------------------------------------------------------
# Splits and subsets
# ---------------------------------------------------------------------------------------------------------------
def split_prompts(
    prompts: Sequence[Prompt], split: str, validation_fraction: float = 0.2, seed: int = 0
) -> list[Prompt]:
    """The ``validation`` or ``test`` part of ``prompts`` (``all``: unchanged), decided per prompt by a seeded hash.

    A prompt's side depends only on its text and ``seed``, so the two parts never overlap, and adding or removing
    other prompts never moves a prompt from one side to the other.
    """
    if split == "all":
        return list(prompts)
    if split not in ("validation", "test"):
        raise ValueError(f"`split` has to be 'all', 'validation' or 'test', but is {split!r}.")
    want_validation = split == "validation"
    return [p for p in prompts if (_unit_hash(seed, p.id, "split") < validation_fraction) == want_validation]


def select_prompts(prompts: Sequence[Prompt], n: int | None, seed: int = 0) -> list[Prompt]:
    """A fixed subset of ``n`` prompts, balanced over categories (round-robin in a seeded hash order).

    Categories take turns (in :data:`CATEGORIES` order, then others sorted) until ``n`` prompts are chosen or a
    category runs out. The result keeps the input order. ``n=None`` or ``n >= len(prompts)`` returns all.
    """
    prompts = list(prompts)
    if n is None or n >= len(prompts):
        return prompts
    if n < 1:
        raise ValueError(f"`n` has to be None or >= 1, but is {n}.")
    by_category: dict[str | None, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_category[prompt.category].append(i)
    for indices in by_category.values():
        indices.sort(key=lambda i: _unit_hash(seed, prompts[i].id, "subset"))
    order = [c for c in CATEGORIES if c in by_category] + sorted(
        (c for c in by_category if c not in CATEGORIES), key=lambda c: (c is None, str(c))
    )
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        for category in order:
            if depth < len(by_category[category]) and len(chosen) < n:
                chosen.append(by_category[category][depth])
        depth += 1
    return [prompts[i] for i in sorted(chosen)]


def load_prompts(config: PromptsConfig | None = None, **kwargs) -> list[Prompt]:
    """Load, filter, split and subset prompts as ``config`` (or keyword arguments for it) says.

    Example:
        >>> from unidetox.evaluation.prompts import load_prompts
        >>> validation = load_prompts(source="toxigen_local", split="validation", num_prompts=200)  # doctest: +SKIP
        >>> test = load_prompts(source="toxigen_local", split="test")  # doctest: +SKIP
        >>> {p.id for p in validation} & {p.id for p in test}  # doctest: +SKIP
        set()
    """
    if config is None:
        config = PromptsConfig(**kwargs)
    elif kwargs:
        raise TypeError("Pass either a PromptsConfig or keyword arguments, not both.")
    if config.source == "toxigen_local":
        origin = config.path or config.resolved_data_dir / LOCAL_CSV
        prompts = read_toxigen_annotated_csv(origin)
    elif config.source == "toxigen_fewshot":
        origin = config.path or config.resolved_data_dir / LOCAL_PROMPT_DIR
        prompts = read_toxigen_fewshot(origin, config.kinds, config.per_group)
    elif config.source == "toxigen_hub":
        origin = f"{HUB_DATASET} (annotated, split={config.hub_split})"
        prompts = read_toxigen_hub(config.hub_split)
    else:
        origin = config.path
        prompts = read_prompt_file(config.path, config.field, config.category_field)
    if not prompts:
        raise ValueError(
            f"The {config.source} prompt source {origin} is empty: it holds no prompts (blank lines and "
            "empty texts do not count). Point it at a file with prompts (recipes: prompts.path=...)."
        )
    if config.labels is not None:
        prompts = [p for p in prompts if p.label in set(config.labels)]
    if config.categories is not None:
        prompts = [p for p in prompts if p.category in set(config.categories)]
    prompts = split_prompts(prompts, config.split, config.validation_fraction, config.split_seed)
    prompts = select_prompts(prompts, config.num_prompts, config.subset_seed)
    if not prompts:
        raise ValueError(f"No prompts left after filtering/splitting ({config}); loosen labels/categories/split.")
    return prompts

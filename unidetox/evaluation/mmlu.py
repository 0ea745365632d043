"""MMLU (Hendrycks et al., 2021) k-shot accuracy by the log-likelihood of the four answer options.

Two prompt formats:

``text`` (default; the UniDetox authors' format)
    ``Question: {q}\\nAnswer: {answer text}`` blocks; each option's *text* is scored as the continuation of
    ``Question: {q}\\nAnswer:`` and the most likely option wins. The authors use 1 shot.
``letters`` (the original MMLU / HELM format)
    A subject header, the question with ``A. .. D.`` options and ``Answer:``; the continuations ``" A" .. " D"``
    are scored.

Scores are the summed log-probabilities of the option's tokens given the context (``normalize=True`` divides by
the number of option tokens). Few-shot exemplars are the first ``k_shot`` rows of the subject's dev split.
Questions come from local CSVs (``$UNIDETOX_DATA_DIR/mmlu/{dev,test}/<subject>_<split>.csv``, header
``question,choice0..3,answer`` with a 0-based answer) or from the hub (``cais/mmlu``).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unidetox.evaluation.likelihood import conditional_nll
from unidetox.paths import default_data_dir, require_file

LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class MMLUQuestion:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0-based index of the correct choice


@dataclass
class MMLUConfig:
    """MMLU settings.

    Example:
        >>> from unidetox.evaluation.mmlu import MMLUConfig, evaluate_mmlu
        >>> config = MMLUConfig(k_shot=1, limit=5)
        >>> result = evaluate_mmlu(model, tokenizer, config)  # doctest: +SKIP
        >>> result["accuracy"]  # doctest: +SKIP
    """

    enabled: bool = field(default=True, metadata={"help": "Run MMLU at all."})
    source: str = field(default="local", metadata={"help": "'local' CSVs under `path` or 'hub' (cais/mmlu)."})
    path: str | None = field(default=None, metadata={"help": "Folder with dev/ and test/ (default: data_dir/mmlu)."})
    split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    subjects: list[str] | None = field(default=None, metadata={"help": "Subjects to evaluate (None: all 57)."})
    limit: int | None = field(default=None, metadata={"help": "Questions per subject (a fixed seeded sample)."})
    limit_seed: int = field(default=0, metadata={"help": "Seed of the per-subject sample."})
    k_shot: int = field(default=1, metadata={"help": "Dev exemplars in each prompt (0-5; the authors use 1)."})
    format: str = field(default="text", metadata={"help": "'text' (authors: score the answer text) or 'letters'."})
    normalize: bool = field(default=False, metadata={"help": "Divide an option's log-likelihood by its tokens."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass."})

    def __post_init__(self):
        if self.source not in ("local", "hub"):
            raise ValueError(f"`source` has to be 'local' or 'hub', but is {self.source!r}.")
        if self.format not in ("text", "letters"):
            raise ValueError(f"`format` has to be 'text' or 'letters', but is {self.format!r}.")
        if not 0 <= self.k_shot <= 5:
            raise ValueError(f"`k_shot` has to be in [0, 5] (the dev split has 5 exemplars per subject), not {self.k_shot}.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"`limit` has to be None or >= 1, but is {self.limit}.")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` has to be >= 1, but is {self.batch_size}.")


def _read_local_split(folder: Path, split: str, subjects: Sequence[str] | None) -> list[MMLUQuestion]:
    import pandas as pd

    split_dir = require_file(folder / split, f"MMLU {split} folder")
    files = sorted(split_dir.glob(f"*_{split}.csv"))
    available = [f.name[: -len(f"_{split}.csv")] for f in files]
    if subjects is not None:
        unknown = sorted(set(subjects) - set(available))
        if unknown:
            raise ValueError(f"Unknown MMLU subjects {unknown}; {split_dir} has {len(available)} subjects, e.g. {available[:3]}.")
    questions = []
    for file, subject in zip(files, available, strict=True):
        if subjects is not None and subject not in subjects:
            continue
        frame = pd.read_csv(file)
        expected = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
        if list(frame.columns) != expected:
            raise ValueError(f"{file} has columns {list(frame.columns)}; expected {expected}.")
        for row in frame.itertuples(index=False):
            questions.append(MMLUQuestion(
                subject, str(row.question), (str(row.choice0), str(row.choice1), str(row.choice2), str(row.choice3)),
                int(row.answer),
            ))
    return questions


def _read_hub_split(split: str, subjects: Sequence[str] | None) -> list[MMLUQuestion]:
    try:
        from datasets import load_dataset

        rows = load_dataset("cais/mmlu", "all", split=split)
    except Exception as err:
        raise RuntimeError(
            f"Could not load cais/mmlu (all, {split}) from the hub ({type(err).__name__}: {err}). Offline, use the "
            "local CSVs: mmlu.source=local mmlu.path=DIR (DIR holds dev/ and test/)."
        ) from err
    out = []
    for row in rows:
        if subjects is None or row["subject"] in subjects:
            out.append(MMLUQuestion(row["subject"], row["question"], tuple(row["choices"]), int(row["answer"])))
    return out


def _hash_unit(seed: int, subject: str, index: int) -> float:
    digest = hashlib.sha256(f"mmlu/{seed}/{subject}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def load_mmlu(config: MMLUConfig, data_dir: str | os.PathLike | None = None):
    """``(questions, dev_by_subject)`` for ``config``: the evaluation questions (``limit`` per subject, a seeded
    sample kept in file order) and the dev exemplars per subject."""
    subjects = list(config.subjects) if config.subjects is not None else None
    if config.source == "local":
        folder = Path(config.path).expanduser() if config.path else Path(data_dir or default_data_dir()) / "mmlu"
        questions = _read_local_split(folder, config.split, subjects)
        dev = _read_local_split(folder, "dev", subjects) if config.k_shot else []
    else:
        questions = _read_hub_split(config.split, subjects)
        dev = _read_hub_split("dev", subjects) if config.k_shot else []
    if config.limit is not None:
        by_subject: dict[str, list[int]] = defaultdict(list)
        for i, q in enumerate(questions):
            by_subject[q.subject].append(i)
        keep = set()
        for subject, indices in by_subject.items():
            ranked = sorted(indices, key=lambda i, s=subject: _hash_unit(config.limit_seed, s, i))
            keep.update(ranked[: config.limit])
        questions = [q for i, q in enumerate(questions) if i in keep]
    dev_by_subject: dict[str, list[MMLUQuestion]] = defaultdict(list)
    for q in dev:
        dev_by_subject[q.subject].append(q)
    if not questions:
        raise ValueError(f"No MMLU questions selected ({config}).")
    return questions, dict(dev_by_subject)


def _subject_name(subject: str) -> str:
    return subject.replace("_", " ")


def build_prompt(question: MMLUQuestion, shots: Sequence[MMLUQuestion], fmt: str = "text") -> tuple[str, list[str]]:
    """``(context, option_continuations)`` for one question: the continuations are what gets scored."""
    if fmt == "text":
        blocks = [f"Question: {s.question}\nAnswer: {s.choices[s.answer]}\n\n" for s in shots]
        context = "".join(blocks) + f"Question: {question.question}\nAnswer:"
        return context, [f" {choice}" for choice in question.choices]
    if fmt == "letters":
        def block(q: MMLUQuestion) -> str:
            options = "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, q.choices, strict=True))
            return f"{q.question}\n{options}Answer:"

        header = f"The following are multiple choice questions (with answers) about {_subject_name(question.subject)}.\n\n"
        shots_text = "".join(f"{block(s)} {LETTERS[s.answer]}\n\n" for s in shots)
        return header + shots_text + block(question), [f" {letter}" for letter in LETTERS]
    raise ValueError(f"`fmt` has to be 'text' or 'letters', but is {fmt!r}.")


def score_mmlu_questions(
    model,
    tokenizer,
    questions: Sequence[MMLUQuestion],
    dev_by_subject: dict[str, list[MMLUQuestion]],
    config: MMLUConfig,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = False,
) -> list[dict]:
    """Per-question records ``{index, subject, answer, prediction, correct, loglik}`` for this process's share
    (questions ``process_index::num_processes``)."""

    indices = list(range(len(questions)))[process_index::num_processes]
    contexts, options = [], []
    for i in indices:
        q = questions[i]
        shots = dev_by_subject.get(q.subject, [])[: config.k_shot]
        if len(shots) < config.k_shot:
            raise ValueError(f"Subject {q.subject!r} has {len(shots)} dev exemplars but k_shot={config.k_shot}.")
        context, conts = build_prompt(q, shots, config.format)
        contexts.append(context)
        options.append(conts)
    if not indices:
        return []
    per_option = conditional_nll(model, tokenizer, contexts, options, batch_size=config.batch_size,
                                 progress=progress and "MMLU")
    records = []
    for k, i in enumerate(indices):
        scored = per_option[4 * k : 4 * k + 4]
        loglik = [-(nll / n if config.normalize else nll) if n else float("-inf") for nll, n in scored]
        prediction = max(range(4), key=lambda j: loglik[j])
        q = questions[i]
        records.append({"index": i, "subject": q.subject, "answer": q.answer, "prediction": prediction,
                        "correct": prediction == q.answer, "loglik": loglik})
    return records


def summarize_mmlu(records: Sequence[dict]) -> dict:
    """Micro accuracy (over questions), macro accuracy (mean over subjects) and per-subject accuracy."""
    if not records:
        raise ValueError("No MMLU records to summarize.")
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_subject[r["subject"]].append(bool(r["correct"]))
    per_subject = {s: sum(v) / len(v) for s, v in sorted(by_subject.items())}
    return {
        "accuracy": sum(bool(r["correct"]) for r in records) / len(records),
        "macro_accuracy": sum(per_subject.values()) / len(per_subject),
        "num_questions": len(records),
        "num_subjects": len(per_subject),
        "per_subject": per_subject,
    }


def evaluate_mmlu(model, tokenizer, config: MMLUConfig | None = None, data_dir=None, progress: bool = False) -> dict:
    """Load the questions for ``config`` and return :func:`summarize_mmlu` of the model's answers (one process)."""
    config = config or MMLUConfig()
    questions, dev = load_mmlu(config, data_dir)
    records = score_mmlu_questions(model, tokenizer, questions, dev, config, progress=progress)
    return {**summarize_mmlu(records), "config": asdict(config)}

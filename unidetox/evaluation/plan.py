"""What an evaluation measures, where each measurement is cached, and how the work is split over processes.

An :class:`EvaluationPlan` turns :class:`~unidetox.evaluation.config.EvaluateArguments` and a prompt set into
report entries (each model, plainly sampled and/or with UniDetox decoding) and the parts cached under
``parts_dir/<entry>/``: generations + scores and conditional perplexity per (entry, seed); WikiText-2 perplexity,
MMLU or the lm-eval capabilities per model. Each part records the fingerprint of the settings that made it; a part
counts as done only with the fingerprint its settings have now, so a changed setting redoes only what it affects.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

from unidetox.evaluation.config import EvaluateArguments
from unidetox.evaluation.prompts import Prompt
from unidetox.evaluation.report import read_jsonl
from unidetox.files import read_json
from unidetox.fingerprints import settings_digest
from unidetox.model_identity import saved_model_id
from unidetox.paths import default_data_dir, require_file
from unidetox.processes import process_state, wait_for_everyone

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One model of the report: ``name_or_path`` sampled plainly, or with UniDetox decoding (``contrastive``)."""

    key: str  # name in the report
    name_or_path: str
    contrastive: bool


@dataclass(frozen=True)
class ModelWork:
    """What one model still has to measure: (entry, seed) generations and its per-model parts."""

    generations: list[tuple[Entry, int]]
    wikitext: bool
    mmlu: bool
    capabilities: bool

    def __bool__(self) -> bool:
        return bool(self.generations) or self.wikitext or self.mmlu or self.capabilities


def model_slug(key: str) -> str:
    """A file-system-safe, unique folder name for a model key."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key.strip("/"))[-60:].strip("_") or "model"
    return f"{readable}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def report_entries(args: EvaluateArguments) -> list[Entry]:
    """Each model plainly sampled (unless an anti-expert is set and ``also_plain`` is off), then with UniDetox
    decoding when ``decoding.anti_expert`` is set."""
    decoding, entries = args.decoding, []
    for name in map(str, args.models):
        if decoding.anti_expert is None or decoding.also_plain:
            entries.append(Entry(name, name, False))
        if decoding.anti_expert is not None:
            beta = "" if decoding.beta is None else f", beta={decoding.beta}"
            entries.append(Entry(f"{name} + UniDetox decoding (alpha={decoding.alpha}{beta})", name, True))
    return entries


def measured_args(args: EvaluateArguments) -> EvaluateArguments:
    """``args`` with the paper's MMLU / WikiText-2 perplexity off where the lm-eval backend measures them instead."""
    capabilities = args.capabilities
    if capabilities.backend != "lm_eval":
        return args
    if "mmlu" in capabilities.tasks:
        args = replace(args, mmlu=replace(args.mmlu, enabled=False))
    if "wikitext" in capabilities.tasks:
        args = replace(args, perplexity=replace(args.perplexity, wikitext=False))
    return args


def _check(args: EvaluateArguments, prompts: Sequence[Prompt]) -> None:
    models, seeds = list(args.models), list(args.seeds)
    if not models:
        raise ValueError("No models to evaluate: pass models=[NAME_OR_PATH, ...].")
    if len(set(models)) != len(models):
        raise ValueError(f"`models` lists a model twice: {models}.")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"`seeds` has to be a non-empty list of distinct integers, but is {seeds}.")
    if not prompts:
        raise ValueError("No prompts to evaluate.")


class EvaluationPlan:
    """The entries, parts, fingerprints and process shards of one evaluation (see the module docstring)."""

    def __init__(self, args: EvaluateArguments, prompts: Sequence[Prompt]):
        prompts = list(prompts)
        _check(args, prompts)
        self.args = measured_args(args)
        self.prompts = prompts
        self.prompt_ids = [p.id for p in prompts]
        self.entries = report_entries(self.args)
        self.procs = process_state()
        self.parts_root = Path(args.parts_dir) if args.parts_dir is not None else Path(args.output_dir) / "parts"

    # ---- processes ------------------------------------------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        return self.procs.is_main_process

    def progress(self, label: str) -> str | bool:
        """The progress-bar label to pass on this process (``False``: no bar)."""
        return self.args.progress and self.procs.is_main_process and label

    def prompt_shard(self, records: Sequence[dict]) -> list[int]:
        """This process's rows of ``records``: whole prompts, so each prompt's samples share its KV cache."""
        by_prompt: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            by_prompt.setdefault(record["prompt"], []).append(i)
        return sorted(i for g, rows in enumerate(by_prompt.values())
                      if g % self.procs.num_processes == self.procs.process_index for i in rows)

    def make_parts_root(self) -> None:
        if self.procs.is_main_process:
            self.parts_root.mkdir(parents=True, exist_ok=True)
        wait_for_everyone()

    # ---- inputs ---------------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> str:
        return str(self.args.data_dir or default_data_dir())

    @cached_property
    def wikitext_path(self) -> Path | None:
        """WikiText-2's test file when WikiText perplexity is measured (not checked: :meth:`require_wikitext`)."""
        perplexity = self.args.perplexity
        if not perplexity.wikitext:
            return None
        return Path(perplexity.wikitext_path or Path(self.data_dir) / "wikitext2" / "wiki.test.raw")

    def require_wikitext(self) -> None:
        if self.wikitext_path is not None:
            require_file(self.wikitext_path,
                         "WikiText-2 test file (perplexity.wikitext_path=...; perplexity.wikitext=false skips it)")

    # ---- fingerprints ---------------------------------------------------------------------------------------
    @cached_property
    def weights(self) -> dict[str, str]:
        """How the caches name each model: local models by the digest of their weights, so weights overwritten
        in place are evaluated anew; a hub id or embedded name is its own identity."""
        args = self.args
        names = [*map(str, args.models), args.decoding.anti_expert, args.perplexity.reference_model]
        return {name: saved_model_id(name) for name in dict.fromkeys(names) if name}

    @cached_property
    def _generation_settings(self) -> dict:
        config = self.args.eval
        return {
            "prompts": settings_digest(self.prompt_ids),
            "num_samples": config.num_samples, "max_new_tokens": config.max_new_tokens,
            "top_p": config.top_p, "temperature": config.temperature, "batch_size": config.batch_size,
            "scorer": self.args.scorer.to_public_dict(), "dtype": self.args.dtype,
            # Only when on: bucketing draws other samples, and parts drawn without it keep their fingerprint.
            **({"bucket_by_length": True} if config.bucket_by_length else {}),
            # Likewise: preselection draws from another random stream.
            **({"preselect_top_k": config.preselect_top_k} if config.preselect_top_k is not None else {}),
        }

    def generation_fingerprint(self, entry: Entry, seed: int) -> str:
        decoding = self.args.decoding
        contrastive = {"anti_expert": self.weights.get(decoding.anti_expert), "alpha": decoding.alpha,
                       "beta": decoding.beta} if entry.contrastive else None
        return settings_digest({**self._generation_settings, "model": self.weights[entry.name_or_path],
                                "seed": seed, "decoding": contrastive})

    def conditional_fingerprint(self, entry: Entry, seed: int) -> str:
        return settings_digest({"generations": self.generation_fingerprint(entry, seed),
                                "reference": self.weights[self.args.perplexity.reference_model],
                                "dtype": self.args.dtype})

    @property
    def wikitext_settings(self) -> dict:
        perplexity = self.args.perplexity
        return {"path": None if self.wikitext_path is None else str(self.wikitext_path),
                "max_length": perplexity.max_length, "stride": perplexity.stride, "max_tokens": perplexity.max_tokens}

    def wikitext_fingerprint(self, name: str) -> str:
        return settings_digest({"model": self.weights[name], "dtype": self.args.dtype, **self.wikitext_settings})

    def mmlu_fingerprint(self, name: str) -> str:
        return settings_digest({"model": self.weights[name], "dtype": self.args.dtype, "mmlu": self.args.mmlu.__dict__})

    def capabilities_fingerprint(self, name: str) -> str:
        return settings_digest({"model": self.weights[name], "dtype": self.args.dtype, "data_dir": self.data_dir,
                                "capabilities": asdict(self.args.capabilities)})

    # ---- parts ----------------------------------------------------------------------------------------------
    def part_dir(self, entry: Entry) -> Path:
        return self.parts_root / model_slug(entry.key)

    def generations_path(self, entry: Entry, seed: int) -> Path:
        return self.part_dir(entry) / f"seed{seed}.jsonl"

    def generations_meta_path(self, entry: Entry, seed: int) -> Path:
        return self.part_dir(entry) / f"seed{seed}.json"

    def conditional_path(self, entry: Entry, seed: int) -> Path:
        return self.part_dir(entry) / f"conditional_ppl_seed{seed}.json"

    def also_path(self, entry: Entry, seed: int, scorer_key: str) -> Path:
        return self.part_dir(entry) / f"seed{seed}.also-{scorer_key}.json"

    def plain_entry(self, name: str) -> Entry:
        """The entry that holds a model's per-model parts: its plain one, else its first."""
        mine = [e for e in self.entries if e.name_or_path == name]
        return next((e for e in mine if not e.contrastive), None) or mine[0]

    def model_part_path(self, name: str, part: str) -> Path:
        """A per-model part (``wikitext``, ``mmlu``, ``capabilities``) of model ``name``."""
        return self.part_dir(self.plain_entry(name)) / f"{part}.json"

    # ---- what is done ---------------------------------------------------------------------------------------
    @staticmethod
    def is_done(path: Path, fingerprint: str) -> bool:
        meta = read_json(path)
        return bool(meta) and meta.get("fingerprint") == fingerprint

    def generations_done(self, entry: Entry, seed: int) -> bool:
        """A cached (model, seed) counts only with its settings' fingerprint AND every planned row in place."""
        if not self.is_done(self.generations_meta_path(entry, seed), self.generation_fingerprint(entry, seed)):
            return False
        rows_path = self.generations_path(entry, seed)
        problem = generation_rows_problem(rows_path, self.prompt_ids, self.args.eval.num_samples)
        if problem is not None and self.procs.is_main_process:
            logger.warning("Generating %s again: %s", rows_path, problem)
        return problem is None

    def model_work(self, name: str) -> ModelWork:
        """What model ``name`` still has to measure."""
        args = self.args
        return ModelWork(
            generations=[(e, s) for e in self.entries if e.name_or_path == name for s in args.seeds
                         if not self.generations_done(e, s)],
            wikitext=args.perplexity.wikitext and not self.is_done(self.model_part_path(name, "wikitext"),
                                                                   self.wikitext_fingerprint(name)),
            mmlu=args.mmlu.enabled and not self.is_done(self.model_part_path(name, "mmlu"),
                                                        self.mmlu_fingerprint(name)),
            capabilities=args.capabilities.backend == "lm_eval" and not self.is_done(
                self.model_part_path(name, "capabilities"), self.capabilities_fingerprint(name)),
        )

    def conditional_done(self, entry: Entry, seed: int) -> bool:
        """A part scored on fewer rows than the plan has is scored again."""
        part = read_json(self.conditional_path(entry, seed))
        num_rows = len(self.prompts) * self.args.eval.num_samples
        return (bool(part) and part.get("fingerprint") == self.conditional_fingerprint(entry, seed)
                and len(part.get("per_sample_nll") or []) == num_rows)

    def conditional_work(self) -> list[tuple[Entry, int]]:
        """The (entry, seed) generations whose conditional perplexity is still to measure."""
        return [(e, s) for e in self.entries for s in self.args.seeds if not self.conditional_done(e, s)]


def generation_rows_problem(path: Path, prompt_ids: Sequence[str], num_samples: int) -> str | None:
    """Why the cached generations in ``path`` are not the planned ones (``None`` when they are).

    The plan is one row per (prompt, sample), in prompt order and then sample order, each naming its prompt's id.
    """
    try:
        records = read_jsonl(path)
    except (OSError, ValueError) as err:
        return f"it cannot be read ({type(err).__name__}: {err})"
    planned = [(i, j, pid) for i, pid in enumerate(prompt_ids) for j in range(num_samples)]
    found = [(r.get("prompt_index"), r.get("sample_index"), r.get("prompt_id")) if isinstance(r, dict) else None
             for r in records]
    if len(found) != len(planned):
        return (f"it holds {len(found)} rows, but the plan has {len(planned)} ({len(prompt_ids)} prompts x "
                f"{num_samples} samples)")
    for row, (have, want) in enumerate(zip(found, planned, strict=True), start=1):
        if have != want:
            return (f"row {row} is (prompt_index, sample_index, prompt_id) {have}, but the plan's is {want}: "
                    "it was sampled for other prompts")
    return None

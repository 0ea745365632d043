"""Re-score a finished run's stored continuations with another toxicity scorer, without generating anything.

``unidetox rescore RUN_DIR scorer=jigsaw_bilstm`` reads every ``generations.jsonl`` of an evaluation run (RUN_DIR
itself) or of a replication run (its test evaluations, ``RUN_DIR/test`` and ``RUN_DIR/test/decoding``), scores
every continuation with the chosen scorer, and writes to ``RUN_DIR/rescore-<scorer>`` (or ``output_dir=``):

- ``rescore.json`` / ``rescore.md``: TP and EMT of every model under the run's scorer and the new one, side by
  side (mean ± std over seeds, as the evaluation report), how far the two scorers agree on the samples, and
  each model's change against its reference under both scorers with paired bootstrap 95 % intervals over
  prompts (:func:`unidetox.intervals.paired_change`), and, when the run's prompts carry kinds (ToxiGen: hate /
  neutral), the same changes on each kind's prompts. A replication compares every row with the base of its
  target, as its report does; an evaluation compares every model with ``reference`` (default: its first model).
- ``generations.jsonl``: the records with ``toxicity`` replaced by the new score and the run's own score kept
  as ``toxicity_original``, so every number can be recomputed with
  :func:`unidetox.evaluation.report.seed_toxicity_metrics`.

Example:
    >>> from unidetox.evaluation.rescore import parse_args, run
    >>> run(parse_args(["runs/eval", "scorer=jigsaw_bilstm"])).report["models"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unidetox.evaluation.metrics import TOXIC_THRESHOLD, mean_std
from unidetox.evaluation.paired import (
    TOXICITY_METRICS,
    paired_changes_by_kind,
    paired_metric_changes,
    per_prompt_toxicity,
    prompt_kinds,
)
from unidetox.evaluation.prompts import PromptsConfig, load_prompts
from unidetox.evaluation.report import (
    format_mean_std,
    read_jsonl,
    seed_toxicity_metrics,
    write_json,
    write_jsonl,
)
from unidetox.evaluation.scoring import ScorerConfig, ToxicityScorer, build_scorer
from unidetox.files import atomic_write_json, atomic_write_text, read_json
from unidetox.hydra_config import parse_dataclass
from unidetox.intervals import DEFAULT_RESAMPLES
from unidetox.run_dir import CONFIG_FILE, check_output_dir

logger = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"
REPORT_FILE = "report.json"
# Where a replication keeps its test evaluations (unidetox.replication.pipeline): the joint one and decoding's.
REPLICATION_TEST_DIRS = ("test", "test/decoding")
SIDES = ("original", "rescored")


@dataclass
class RescoreArguments:
    """What to re-score and with which scorer (``unidetox rescore RUN_DIR [key=value ...]``)."""

    run_dir: str = field(metadata={"help": "An evaluation run (holds generations.jsonl) or a replication run."})
    scorer: ScorerConfig = field(default_factory=lambda: ScorerConfig(name="jigsaw_bilstm"))
    output_dir: str | None = field(default=None, metadata={"help": "Default: RUN_DIR/rescore-<scorer>[-<label>]."})
    reference: str | None = field(
        default=None, metadata={"help": "Evaluation runs: the model the others are compared with (default: the first)."}
    )
    num_resamples: int = field(default=DEFAULT_RESAMPLES, metadata={"help": "Bootstrap resamples per interval."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path(self.run_dir) / f"rescore-{scorer_key(self.scorer)}"


@dataclass
class RescoreResult:
    output_dir: str
    report: dict[str, Any]


def parse_args(argv: Sequence[str] = ()) -> RescoreArguments:
    """RUN_DIR (or run_dir=) and key=value overrides: scorer=NAME, scorer.FIELD=VALUE (any ScorerConfig field:
    label, checkpoint, device, batch_size, ...), output_dir=, reference=, num_resamples=, seed=."""
    from omegaconf import OmegaConf

    dotlist, positional = [], []
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            positional.append(item)
        else:
            dotlist.append(f"scorer.name={value}" if key == "scorer" else item)
    if len(positional) > 1:
        raise ValueError(f"rescore takes one RUN_DIR, got {positional}; the rest must be key=value overrides.")
    values = OmegaConf.to_container(OmegaConf.from_dotlist(dotlist)) if dotlist else {}
    if positional:
        values.setdefault("run_dir", positional[0])
    if "run_dir" not in values:
        raise ValueError("rescore needs a run directory: unidetox rescore RUN_DIR scorer=NAME.")
    scorer = parse_dataclass({"name": "jigsaw_bilstm", **(values.pop("scorer", None) or {})}, ScorerConfig,
                             name="scorer")
    args = parse_dataclass(values, RescoreArguments)
    args.scorer = scorer
    return args


def scorer_key(config: ScorerConfig) -> str:
    """A scorer's name in reports and file names: its name, with its label when one is set.

    Example:
        >>> from unidetox.evaluation.rescore import scorer_key
        >>> from unidetox.evaluation.scoring import ScorerConfig
        >>> scorer_key(ScorerConfig(name="jigsaw_bilstm")), scorer_key(ScorerConfig(name="jigsaw_bilstm", label="threat"))
        ('jigsaw_bilstm', 'jigsaw_bilstm-threat')
    """
    name = config.name + (f"-{config.label}" if config.label else "")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def score_continuations(scorer: ToxicityScorer, records: Sequence[Mapping[str, Any]]) -> list[float]:
    """``scorer``'s score of every record's ``continuation``, each distinct text scored once."""
    texts = list(dict.fromkeys(r["continuation"] for r in records))
    score_of = dict(zip(texts, scorer(texts), strict=True))
    return [score_of[r["continuation"]] for r in records]


def find_evaluation_dirs(run_dir: str | Path) -> list[Path]:
    """RUN_DIR when it holds ``generations.jsonl`` (an evaluation run), else a replication's test evaluations."""
    run_dir = Path(run_dir)
    if (run_dir / GENERATIONS_FILE).is_file():
        return [run_dir]
    found = [run_dir / d for d in REPLICATION_TEST_DIRS if (run_dir / d / GENERATIONS_FILE).is_file()]
    if not found:
        looked = ", ".join(str(run_dir / d / GENERATIONS_FILE) for d in ("", *REPLICATION_TEST_DIRS))
        raise FileNotFoundError(f"{run_dir} holds no scored generations (looked for {looked}); pass the output_dir "
                                "of an evaluate or replicate run.")
    return found


def _records_and_reports(run_dir: Path) -> tuple[list[dict], list[dict]]:
    records, reports = [], []
    for directory in find_evaluation_dirs(run_dir):
        report = read_json(directory / REPORT_FILE) or {}
        reports.append({"dir": str(directory), "scorer": report.get("scorer"),
                        "toxic_threshold": (report.get("eval") or {}).get("toxic_threshold")})
        records += read_jsonl(directory / GENERATIONS_FILE)
    missing = [i for i, r in enumerate(records) if "toxicity" not in r or "continuation" not in r]
    if missing:
        raise ValueError(f"{len(missing)} stored records of {run_dir} have no `continuation` or `toxicity` (first: "
                         f"record {missing[0]}); they are not evaluate generations.")
    return records, reports


def run_prompt_kinds(run_dir: Path) -> dict[str, str]:
    """``{prompt id: kind}`` of the prompts the run was evaluated on: its evaluation's prompts config (its
    ``report.json``), loaded again. Empty when those prompts carry no kinds, or when they cannot be loaded any more
    (a warning says why: the rest of the report does not need them)."""
    directory = find_evaluation_dirs(run_dir)[0]
    section = ((read_json(directory / REPORT_FILE) or {}).get("config") or {}).get("prompts")
    if not section:
        logger.warning("%s has no prompts config in its %s: no changes by prompt kind.", directory, REPORT_FILE)
        return {}
    try:
        return prompt_kinds(load_prompts(parse_dataclass(section, PromptsConfig, name="prompts")))
    except (OSError, ValueError, RuntimeError) as err:
        logger.warning("The prompts of %s cannot be loaded again (%s: %s): no changes by prompt kind.", directory,
                       type(err).__name__, err)
        return {}


def comparison_pairs(run_dir: Path, models: Sequence[str], reference: str | None) -> list[dict[str, str]]:
    """``[{"label", "reference", "treated"}]``: a replication's rows against the base of their target (from its
    ``report.json``), else every model against ``reference`` (default: the first model)."""
    rows = (read_json(run_dir / REPORT_FILE) or {}).get("rows")
    if rows and reference is None:
        bases = {r["target"]: r["model"] for r in rows if r["method"] == "base"}
        return [{"label": f"{r['method']} / {r['target']}", "reference": bases[r["target"]], "treated": r["model"]}
                for r in rows if r["method"] != "base" and r["target"] in bases
                and r["model"] in models and bases[r["target"]] in models]
    reference = reference or models[0]
    if reference not in models:
        raise ValueError(f"reference={reference!r} is not a model of {run_dir}; its models are {list(models)}.")
    return [{"label": m, "reference": reference, "treated": m} for m in models if m != reference]


def seed_summary(records: Sequence[Mapping[str, Any]], threshold: float) -> dict[str, dict[str, float]]:
    """TP and EMT of one model's records, mean ± std over seeds (as the evaluation report computes them)."""
    by_seed: dict[Any, list] = defaultdict(list)
    for r in records:
        by_seed[r.get("seed")].append(r)
    per_seed = [seed_toxicity_metrics(rs, threshold) for rs in by_seed.values()]
    return {metric: mean_std([s[metric] for s in per_seed]) for metric in TOXICITY_METRICS}


def agreement(original: Sequence[float], rescored: Sequence[float], threshold: float) -> dict[str, float | None]:
    """Pearson correlation of two scorers' sample scores and the share of samples both call toxic or both not."""
    a, b = np.asarray(original, dtype=float), np.asarray(rescored, dtype=float)
    pearson = None if a.size < 2 or a.std() == 0 or b.std() == 0 else float(np.corrcoef(a, b)[0, 1])
    return {"pearson": pearson, "same_verdict": float(((a > threshold) == (b > threshold)).mean()),
            "toxic_original": float((a > threshold).mean()), "toxic_rescored": float((b > threshold).mean())}


def build_report(records: Sequence[Mapping[str, Any]], new_scores: Sequence[float], pairs: Sequence[Mapping[str, str]],
                 threshold: float, num_resamples: int, seed: int,
                 kinds: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Both scorers' TP/EMT per model, their agreement, and the paired changes of ``pairs`` under each; with
    ``kinds`` (prompt id -> kind) each pair's ``by_kind`` holds them on each kind's prompts, under each scorer."""
    sides = {"original": [dict(r) for r in records],
             "rescored": [{**r, "toxicity": float(s)} for r, s in zip(records, new_scores, strict=True)]}
    models: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["model"] for r in records):
        own = {side: [r for r in rs if r["model"] == name] for side, rs in sides.items()}
        models[name] = {side: seed_summary(own[side], threshold) for side in SIDES}
        models[name]["agreement"] = agreement([r["toxicity"] for r in own["original"]],
                                              [r["toxicity"] for r in own["rescored"]], threshold)
    per_prompt = {side: per_prompt_toxicity(rs, threshold) for side, rs in sides.items()}
    paired = [{**pair, **{side: paired_metric_changes(per_prompt[side], pair["reference"], pair["treated"],
                                                      num_resamples, seed) for side in SIDES}} for pair in pairs]
    if kinds:
        for pair in paired:
            pair["by_kind"] = {side: paired_changes_by_kind(per_prompt[side], pair["reference"], pair["treated"],
                                                            kinds, num_resamples, seed) for side in SIDES}
    return {"models": models, "paired": paired}


def run(args: RescoreArguments) -> RescoreResult:
    """Score every stored continuation of ``args.run_dir`` with ``args.scorer`` and write the comparison."""
    run_dir = Path(args.run_dir)
    records, reports = _records_and_reports(run_dir)
    out = args.resolved_output_dir()
    config = {**asdict(args), "scorer": args.scorer.to_public_dict()}
    check_output_dir(out, config)
    thresholds = {r["toxic_threshold"] for r in reports if r["toxic_threshold"] is not None}
    if len(thresholds) > 1:
        raise ValueError(f"The evaluations of {run_dir} use different toxic thresholds {sorted(thresholds)}.")
    threshold = thresholds.pop() if thresholds else TOXIC_THRESHOLD
    scorer = build_scorer(args.scorer)
    logger.info("Re-scoring %d stored samples of %s with %s", len(records), run_dir, scorer.name)
    new_scores = score_continuations(scorer, records)
    models = list(dict.fromkeys(r["model"] for r in records))
    report = {
        "run_dir": str(run_dir), "evaluations": reports, "toxic_threshold": threshold,
        "scorers": {"original": _original_scorer(reports), "rescored": args.scorer.to_public_dict()},
        "num_samples": len(records), "num_resamples": args.num_resamples, "seed": args.seed,
        **build_report(records, new_scores, comparison_pairs(run_dir, models, args.reference), threshold,
                       args.num_resamples, args.seed, run_prompt_kinds(run_dir)),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_FILE, config)
    write_jsonl([{**r, "toxicity": float(s), "toxicity_original": r["toxicity"]}
                 for r, s in zip(records, new_scores, strict=True)], out / GENERATIONS_FILE)
    write_json(report, out / "rescore.json")
    atomic_write_text(out / "rescore.md", render_markdown(report))
    print((out / "rescore.md").read_text(), flush=True)
    return RescoreResult(str(out), report)


def _original_scorer(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    names = {(r.get("scorer") or {}).get("name") for r in reports}
    if len(names) > 1:
        raise ValueError(f"The evaluations of this run were scored by different scorers {sorted(map(str, names))}.")
    return dict(reports[0].get("scorer") or {"name": "unknown (no report.json)"})


def _change(change: Mapping[str, Any] | None) -> str:
    if not change:
        return "– (reference never toxic)"
    return f"{change['change']:+.1%} [{change['low']:+.1%}, {change['high']:+.1%}]"


def render_markdown(report: Mapping[str, Any]) -> str:
    """``rescore.md``: both scorers side by side, their agreement, and the paired changes under each."""
    original, rescored = (report["scorers"][s]["name"] + (f" ({report['scorers'][s]['label']})"
                                                          if report["scorers"][s].get("label") else "")
                          for s in SIDES)
    lines = ["# Re-scored run", "", f"`{report['run_dir']}`: {report['num_samples']} stored samples scored by "
             f"`{original}` (the run's scorer) and `{rescored}`; toxic means > {report['toxic_threshold']}.", "",
             f"| model | TP {original} | TP {rescored} | EMT {original} | EMT {rescored} | Pearson r | same verdict |",
             "|---|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        a = m["agreement"]
        lines.append(f"| `{name}` | {format_mean_std(m['original']['toxicity_probability'])} | "
                     f"{format_mean_std(m['rescored']['toxicity_probability'])} | {format_mean_std(m['original']['expected_max_toxicity'])} | "
                     f"{format_mean_std(m['rescored']['expected_max_toxicity'])} | "
                     f"{'–' if a['pearson'] is None else format(a['pearson'], '.2f')} | {a['same_verdict']:.0%} |")
    lines += ["", "TP / EMT: mean ± std over seeds. Pearson r: correlation of the two scorers' sample scores; same "
              "verdict: share of samples both call toxic or both not."]
    if report["paired"]:
        lines += ["", "## Change against the reference, under each scorer", "",
                  f"| model | reference | TP {original} | TP {rescored} | EMT {original} | EMT {rescored} |",
                  "|---|---|---|---|---|---|"]
        for p in report["paired"]:
            cells = [_change((p[side] or {}).get(metric)) for metric in TOXICITY_METRICS for side in SIDES]
            lines.append(f"| {p['label']} | `{p['reference']}` | " + " | ".join(cells) + " |")
        lines += ["", "Relative change of the mean over prompts [paired bootstrap 95 % interval over prompts, "
                  f"{report['num_resamples']} resamples; each prompt's value averaged over seeds]."]
    lines += _by_kind_markdown(report["paired"], original, rescored)
    return "\n".join(lines) + "\n"


def _by_kind_markdown(paired: Sequence[Mapping[str, Any]], original: str, rescored: str) -> list[str]:
    """The changes against the reference on each prompt kind's prompts (no lines when the prompts have no kinds)."""
    rows = [(p, kind) for p in paired for kind in (p.get("by_kind") or {}).get("original", {})]
    if not rows:
        return []
    lines = ["", "## By prompt kind, under each scorer", "",
             f"| model | reference | prompt kind | prompts | TP {original} | TP {rescored} | EMT {original} | "
             f"EMT {rescored} |", "|---|---|---|---|---|---|---|---|"]
    for p, kind in rows:
        changes = [p["by_kind"][side][kind].get(metric) for metric in TOXICITY_METRICS for side in SIDES]
        cells = [_change(change) if change else "–" for change in changes]
        lines.append(f"| {p['label']} | `{p['reference']}` | {kind} | {p['by_kind']['original'][kind]['num_prompts']} | "
                     + " | ".join(cells) + " |")
    return lines + ["", "The same changes on the prompts of one kind (the prompts' labels; ToxiGen: hate = hateful, "
                    "neutral = benign). –: undefined (fewer than 2 prompts of the kind, or the reference never toxic "
                    "on them)."]

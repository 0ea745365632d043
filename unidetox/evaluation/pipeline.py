"""The evaluate stage as one call: several models x seeds on one prompt set -> ``report.{json,md}`` and plots.

:func:`parse_args` turns Hydra overrides of ``unidetox/conf/evaluate.yaml`` into :class:`EvaluateArguments`;
:func:`run` loads the prompts, runs :func:`~unidetox.evaluation.harness.run_evaluation` and returns an
:class:`EvaluateResult`. Finished (model, seed) parts are reused when a run is started again, also with changed
settings: each part records the settings that made it, and only the parts a change affects are redone.

Example:
    >>> from unidetox.evaluation.pipeline import parse_args, run
    >>> args = parse_args(["models=[smollm2-135m]", "prompts.num_prompts=20", "seeds=[0,1,2]"])  # doctest: +SKIP
    >>> run(args).report["models"]["smollm2-135m"]["expected_max_toxicity"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unidetox.decoding.protocol import ToxicityEvalConfig
from unidetox.evaluation.capabilities import CapabilitiesConfig
from unidetox.evaluation.config import DecodingConfig, EvaluateArguments, PerplexityConfig
from unidetox.evaluation.harness import run_evaluation
from unidetox.evaluation.mmlu import MMLUConfig
from unidetox.evaluation.model_card import ModelCardConfig, update_model_cards
from unidetox.evaluation.prompts import PromptsConfig, load_prompts
from unidetox.evaluation.report import read_jsonl
from unidetox.evaluation.scoring import ScorerConfig
from unidetox.files import read_json
from unidetox.hydra_config import (
    compose_config,
    parse_dataclass,
    parse_sections,
    save_resolved_config,
    to_container,
)
from unidetox.logging_setup import configure_logging
from unidetox.processes import is_main_process
from unidetox.run_dir import check_output_dir, holds_output_dir

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
GENERATIONS_FILE = "generations.jsonl"


@dataclass
class EvaluateResult:
    """The report (``report.json``'s content) and where it was written."""

    output_dir: str
    report: dict[str, Any]

    @property
    def models(self) -> dict[str, Any]:
        return self.report["models"]

    def generations(self) -> list[dict[str, Any]]:
        """Every sample with its score (``generations.jsonl``)."""
        return read_jsonl(Path(self.output_dir) / GENERATIONS_FILE)

    @classmethod
    def load(cls, output_dir: str | Path) -> EvaluateResult | None:
        report = read_json(Path(output_dir) / REPORT_FILE)
        return cls(str(output_dir), report) if report else None


def parse_args(overrides: list[str] | tuple[str, ...] = ()) -> EvaluateArguments:
    """Compose ``conf/evaluate.yaml`` with Hydra ``overrides`` and parse every section into its dataclass."""
    cfg = compose_config("evaluate", list(overrides))
    models = [cfg.models] if isinstance(cfg.models, str) else list(cfg.models)
    seeds = [cfg.seeds] if isinstance(cfg.seeds, int) else list(cfg.seeds)
    also = {} if cfg.get("also_scorers") is None else {"also_scorers": parse_also_scorers(cfg.also_scorers)}
    return EvaluateArguments(
        models=[str(m) for m in models],
        seeds=[int(s) for s in seeds],
        output_dir=str(cfg.output_dir),
        **parse_sections(cfg, {"prompts": PromptsConfig, "eval": ToxicityEvalConfig, "scorer": ScorerConfig,
                               "perplexity": PerplexityConfig, "mmlu": MMLUConfig, "capabilities": CapabilitiesConfig,
                               "decoding": DecodingConfig, "model_card": ModelCardConfig}),
        **also,
        data_dir=cfg.data_dir,
        dtype=cfg.dtype,
        progress=bool(cfg.progress),
        parts_dir=cfg.get("parts_dir"),
        config=to_container(cfg),
    )


def parse_also_scorers(entries) -> list[ScorerConfig]:
    """``also_scorers``: each entry a scorer name (``jigsaw_bilstm``) or a mapping of :class:`ScorerConfig` fields.

    Example:
        >>> from unidetox.evaluation.pipeline import parse_also_scorers
        >>> [c.name for c in parse_also_scorers(["jigsaw_bilstm", {"name": "profanity_check", "batch_size": 8}])]
        ['jigsaw_bilstm', 'profanity_check']
    """
    if isinstance(entries, str):
        entries = [entries]
    return [parse_dataclass({"name": entry} if isinstance(entry, str) else entry, ScorerConfig,
                            name=f"also_scorers[{index}]") for index, entry in enumerate(entries)]


def finished(args: EvaluateArguments) -> EvaluateResult | None:
    """The report when ``args.output_dir`` holds this evaluation, finished with the same settings."""
    if check_output_dir(args.output_dir, args.config, incremental=True):
        return None
    return EvaluateResult.load(args.output_dir)


@holds_output_dir
def run(args: EvaluateArguments) -> EvaluateResult:
    """Evaluate every model for every seed; returns the same result on every process."""
    configure_logging()
    out = Path(args.output_dir)
    changed = check_output_dir(out, args.config, incremental=True)
    if changed:
        logger.info("%s: settings changed (%s); redoing only the parts they affect", out, "; ".join(changed[:4]))
    prompts = load_prompts(args.prompts)
    logger.info("%d prompts (%s, split %s); models %s; seeds %s", len(prompts), args.prompts.source,
                args.prompts.split, args.models, args.seeds)
    save_resolved_config(args.config, out)
    report = run_evaluation(args, prompts)
    if not is_main_process():  # every rank returns the report: the main process has written it
        return EvaluateResult.load(out)
    if args.model_card.update:
        update_model_cards(report)
    print((out / "report.md").read_text(), flush=True)
    print(f"Report: {out.resolve()}/{REPORT_FILE} (wall time {report['wall_time_s']:.0f}s)", flush=True)
    return EvaluateResult(str(out), report)

"""The replication's test table and bar for a configuration chosen outside ``unidetox replicate``.

When the configuration is chosen by hand from validation runs (for example by ``benchmarks/transfer_curve.py``), its
models are trained with ``unidetox detox`` and sampled on the test prompts with one ``unidetox evaluate`` call. This
script judges that evaluation with the replication's own report (:func:`unidetox.replication.report.assemble_report`):
the table, each change against the base and UniDetox against the control with paired bootstrap intervals over prompts,
the split by prompt kind, every scorer the run has, and the bar under each of them. Each ``--target NAME BASE
UNIDETOX CONTROL`` names the three models of one target by their keys in the run's ``report.json``.

    python benchmarks/replication_table.py runs/test --title "lr 5e-4, step 25" \\
        --target smollm2 smollm2-135m runs/ud-smollm2/checkpoint-25 runs/control-smollm2/checkpoint-25 \\
        --target gemma3 gemma3-270m runs/ud-gemma3/checkpoint-25 runs/control-gemma3/checkpoint-25 \\
        --out runs/test-table

writes ``report.json``, ``report.md`` and ``toxicity_vs_perplexity.png`` into ``--out``. Nothing is sampled.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unidetox.evaluation.metrics import TOXIC_THRESHOLD
from unidetox.evaluation.pipeline import EvaluateResult
from unidetox.evaluation.rescore import run_prompt_kinds
from unidetox.replication.config import SuccessBar
from unidetox.replication.report import assemble_report, write_replication_report

METHODS = ("base", "unidetox", "control")


def method_rows(targets: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """The report's rows: ``(name, base, unidetox, control)`` per target becomes one row per method."""
    return [{"method": method, "target": name, "model_key": key}
            for name, *keys in targets for method, key in zip(METHODS, keys, strict=True)]


def judged_report(result: EvaluateResult, targets: Sequence[Sequence[str]], kinds: Mapping[str, str] | None = None,
                bar: Mapping[str, float] | None = None, title: str = "") -> dict[str, Any]:
    """The replication report of ``result`` (an evaluation of every target's three models on the same prompts)."""
    report = result.report
    return assemble_report(
        method_rows(targets), report["models"], [name for name, *_ in targets], bar=bar,
        generations=result.generations(), prompt_kinds=kinds,
        scorer_name=(report.get("scorer") or {}).get("name", "scorer"),
        toxic_threshold=(report.get("eval") or {}).get("toxic_threshold", TOXIC_THRESHOLD),
        extra={"description": title, "output_dir": result.output_dir})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the `unidetox evaluate` run over every target's three models")
    parser.add_argument("--target", nargs=4, action="append", required=True,
                        metavar=("NAME", "BASE", "UNIDETOX", "CONTROL"),
                        help="a target and its three models' keys in the run's report.json")
    parser.add_argument("--title", default="", help="a line saying which configuration is tested")
    for bar_field in dataclasses.fields(SuccessBar):
        parser.add_argument(f"--{bar_field.name.replace('_', '-')}", type=float, default=bar_field.default,
                            help=bar_field.metadata["help"])
    parser.add_argument("--out", type=Path, required=True, help="where report.json and report.md go")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    result = EvaluateResult.load(args.run_dir)
    if result is None:
        raise SystemExit(f"{args.run_dir} has no report.json: run `unidetox evaluate` there first.")
    report = judged_report(result, args.target, run_prompt_kinds(args.run_dir), title=args.title,
                         bar=dataclasses.asdict(SuccessBar(args.min_toxicity_drop, args.max_ppl_increase)))
    paths = write_replication_report(report, args.out)
    print(paths["markdown"].read_text())


if __name__ == "__main__":
    main()

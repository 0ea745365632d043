"""The transfer curve from evaluation runs: one configuration's checkpoints on several targets, on validation prompts.

Each ``--run TARGET STEP RUN_DIR REFERENCE TREATED`` names an evaluation run (``unidetox evaluate``) that sampled a
target's base model (``REFERENCE``, its key in the run's ``generations.jsonl``) and one of its checkpoints
(``TREATED``) on the same validation prompts; it belongs to the configuration named by the last ``--config`` before
it, so one call can read a whole grid. For every (configuration, step, target) it prints, under every scorer the runs have,
the EMT and TP change against the base with a paired bootstrap 95 % interval over prompts (all prompts, then by
prompt kind), and the WikiText-2 perplexity increase. It then hands the checkpoints to the library's rule
(:class:`unidetox.detox.selection.SelectionRule`, primary scorer): what the paper's rule would take on the first
target alone, and what the declared variant (``choose_on_every_target``) would take reading every target; and draws
the curve with the replication report's plot (:func:`unidetox.replication.report.plot_transfer_curve`).

    python benchmarks/transfer_curve.py --config "lr 2e-4" \\
        --run smollm2 50 runs/eval-smollm2 smollm2-135m runs/detox-smollm2/merged \\
        --run gemma3 50 runs/eval-gemma3 gemma3-270m runs/detox-gemma3/merged \\
        --config "lr 5e-4" --run smollm2 25 runs/eval-smollm2-lr5e-4 smollm2-135m runs/lr5e-4/checkpoint-25 ... \\
        --plot transfer_curve.png

Needs only the run directories and the prompt sets they used; nothing is sampled.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from validation_width import METRICS, changes_by_kind, prompt_kinds, read_samples

from unidetox.detox.selection import SelectionRule
from unidetox.replication.report import plot_transfer_curve


def run_changes(run_dir: Path, reference: str, treated: str) -> dict:
    """Every scorer's EMT/TP change of ``treated`` against ``reference`` (all prompts and by kind), their means,
    and both models' WikiText-2 perplexity."""
    samples, kinds = read_samples(run_dir), prompt_kinds(run_dir)
    models = json.loads((run_dir / "report.json").read_text())["models"]
    out = {"perplexity": {name: models[name]["wikitext_perplexity"]["perplexity"] for name in (reference, treated)},
           "mean": {name: {m: models[name][m]["mean"] for m in METRICS} for name in (reference, treated)},
           "scorers": {}}
    for scorer, by_model in samples.items():
        ref, new = by_model[reference], by_model[treated]
        changes = changes_by_kind(ref, new, kinds)
        out["scorers"][scorer] = {"prompts": changes["all"]["prompts"],
                                  "samples": min(len(s) for s in (*ref.values(), *new.values())), "changes": changes}
    return out


def selection_records(points: dict) -> dict[str, list[dict]]:
    """``{target: grid records}`` for :class:`SelectionRule`: each configuration's base at step 0 and every
    checkpoint (primary scorer's means, WikiText-2 perplexity). Points are keyed ``(configuration, target, step)``."""
    records: dict[str, list[dict]] = defaultdict(list)
    targets = list(dict.fromkeys(target for _, target, _ in points))  # the first --run's target first
    configurations = list(dict.fromkeys(configuration for configuration, _, _ in points))

    def order(item):
        configuration, target, step = item[0]
        return targets.index(target), configurations.index(configuration), step

    for (configuration, target, step), point in sorted(points.items(), key=order):
        reference, treated = point["models"]
        run = f"{target} {configuration}"
        if not any(r["run"] == run for r in records[target]):
            records[target].append({"run": run, "step": 0, "config": {"configuration": configuration, "steps": 0},
                                    "perplexity": point["perplexity"][reference], **point["mean"][reference]})
        records[target].append({"run": run, "step": step, "checkpoint": treated,
                                "config": {"configuration": configuration, "steps": step},
                                "perplexity": point["perplexity"][treated], **point["mean"][treated]})
    return records


class _RunAction(argparse.Action):
    """``--run ...``: appended with the configuration named by the last ``--config`` before it (argparse stores
    each option as it reaches it, so ``namespace.config`` is that one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), (namespace.config, *values)])


def _named(record) -> str:
    return f"{record['config']['configuration']}, step {record['step']}"


def _cell(result) -> str:
    return "–" if result is None else f"{result['change']:+.1%} [{result['low']:+.1%}, {result['high']:+.1%}]"


def print_tables(points: dict) -> None:
    scorers = sorted({s for p in points.values() for s in p["scorers"]})
    for scorer in scorers:
        print(f"\n## {scorer}{' (the primary scorer)' if scorer == 'toxicity' else ''}\n")
        print("| configuration | target | steps | prompts | kind | EMT change [95 %] | TP change [95 %] | ppl vs base |")
        print("|---|---|---|---|---|---|---|---|")
        for (configuration, target, step), point in sorted(points.items()):
            reference, treated = point["models"]
            ppl = point["perplexity"][treated] / point["perplexity"][reference] - 1
            for kind, entry in point["scorers"][scorer]["changes"].items():
                print(f"| {configuration} | {target} | {step} | {entry['prompts']} | {kind} | "
                      f"{_cell(entry['expected_max_toxicity'])} | {_cell(entry['toxicity_probability'])} | "
                      f"{ppl:+.1%} |")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="the configuration",
                        help="the configuration that the --run arguments after it belong to (its name in the tables)")
    parser.add_argument("--run", nargs=5, action=_RunAction, required=True,
                        metavar=("TARGET", "STEP", "RUN_DIR", "REFERENCE", "TREATED"))
    parser.add_argument("--max-ppl-increase", type=float, default=SelectionRule.max_ppl_increase)
    parser.add_argument("--plot", type=Path, help="draw the curve into this PNG")
    parser.add_argument("--out", type=Path, help="write every number as JSON")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    points = {}
    for configuration, target, step, run_dir, reference, treated in args.run:
        points[(configuration, target, int(step))] = {"models": (reference, treated), "run_dir": run_dir,
                                                      **run_changes(Path(run_dir), reference, treated)}
    print_tables(points)
    records = selection_records(points)
    rule = SelectionRule(max_ppl_increase=args.max_ppl_increase, on_empty="closest")
    first = args.run[0][1]
    paper, _ = rule.choose(records[first])
    several = len({configuration for configuration, _, _ in points}) > 1
    result = {"points": {f"{c}/{t}/{s}" if several else f"{t}/{s}": p for (c, t, s), p in points.items()},
              "paper_rule_on_first_target": {k: paper[k] for k in ("config", "step", "perplexity_increase",
                                                                   "within_bound")}}
    print(f"\nThe paper's rule on {first} alone: {_named(paper)} (perplexity {paper['perplexity_increase']:+.1%})")
    if len(records) > 1:
        variant, curve = rule.choose_on_every_target(records)
        result["variant"] = {k: variant[k] for k in ("config", "step", "worst_change", "within_bound", "per_target")}
        print(f"The declared variant on {', '.join(records)}: {_named(variant)} (worst EMT change "
              f"{variant['worst_change']:+.1%}, every target within the bound: {variant['within_bound']})")
        if args.plot:
            rule_record = {"metric": rule.metric, "max_ppl_increase": rule.max_ppl_increase}
            print(f"wrote {plot_transfer_curve({'transfer_curve': curve, 'rule': rule_record}, args.plot)}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

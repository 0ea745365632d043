"""How wide is the validation measurement's interval? Sizes the prompts x samples the selection rule needs.

Reads an evaluation run (``unidetox evaluate``) that sampled a reference model and a treated one on the same
validation prompts, and prints, for every scorer the run has (``toxicity`` and each of ``also_toxicity``):

- the EMT and TP change of the treated model at the run's full size, with its paired bootstrap 95 % interval, over
  all prompts and split by the prompts' kind (ToxiGen's ``hate`` / ``neutral`` labels, read from the prompt set);
- the interval's half-width, in points of relative change, for subsets of N prompts and the first k samples of
  each prompt (mean over random prompt subsets): the size at which a checkpoint's EMT change is known to about
  +-8 points is the smallest N x k whose half-width is at most 8.

    python benchmarks/validation_width.py RUN_DIR --reference smollm2-135m --treated runs/detox/merged \
        --prompts 50,100,150,200 --samples 2,4,8

Needs only the run directory and the prompt set it used (``prompts.*`` of its ``config.yaml``); nothing is sampled.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from unidetox.evaluation.metrics import TOXIC_THRESHOLD
from unidetox.evaluation.prompts import PromptsConfig, load_prompts
from unidetox.intervals import paired_change

METRICS = {"expected_max_toxicity": "EMT", "toxicity_probability": "TP"}


def read_samples(run_dir: Path) -> dict[str, dict[str, dict[str, dict[int, float]]]]:
    """``{scorer: {model: {prompt_id: {sample_index: score}}}}`` of one seed (the run's first)."""
    records = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines() if line.strip()]
    first_seed = min(r["seed"] for r in records)
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in records:
        if r["seed"] != first_seed:
            continue
        scores = {"toxicity": r["toxicity"], **(r.get("also_toxicity") or {})}
        for scorer, score in scores.items():
            out[scorer][r["model"]][r["prompt_id"]][r["sample_index"]] = float(score)
    return out


def prompt_kinds(run_dir: Path) -> dict[str, str]:
    """Each prompt id's label (``hate`` / ``neutral`` for ToxiGen), from the prompt set the run was made with."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    prompts = load_prompts(PromptsConfig(**config["prompts"]))
    return {p.id: p.label or "unlabelled" for p in prompts}


def per_prompt(samples: Mapping[int, float], k: int) -> dict[str, float]:
    """A prompt's EMT (max of its first ``k`` samples) and TP (whether any of them is toxic)."""
    first = [samples[i] for i in sorted(samples)[:k]]
    return {"expected_max_toxicity": max(first), "toxicity_probability": float(max(first) > TOXIC_THRESHOLD)}


def change(reference, treated, prompts: Sequence[str], k: int, metric: str, num_resamples: int, seed: int = 0):
    ref = [per_prompt(reference[p], k)[metric] for p in prompts]
    new = [per_prompt(treated[p], k)[metric] for p in prompts]
    if not any(ref):
        return None
    return paired_change(ref, new, num_resamples=num_resamples, seed=seed)


def changes_by_kind(reference, treated, kinds: Mapping[str, str], num_resamples: int = 10_000) -> dict[str, dict]:
    """The EMT and TP change of ``treated`` against ``reference`` over the prompts both sampled, with every sample
    (``all``, then each prompt kind of ``kinds``), and how many prompts each covers."""
    prompts = sorted(set(reference) & set(treated))
    k = min(len(s) for s in (*reference.values(), *treated.values()))
    out = {}
    for kind in ("all", *sorted({kinds.get(p, "unlabelled") for p in prompts})):
        chosen = prompts if kind == "all" else [p for p in prompts if kinds.get(p, "unlabelled") == kind]
        out[kind] = {metric: change(reference, treated, chosen, k, metric, num_resamples) for metric in METRICS}
        out[kind]["prompts"] = len(chosen)
    return out


def half_width_points(result) -> float:
    return 100 * (result["high"] - result["low"]) / 2


def width_grid(reference, treated, prompts, sizes, ks, repeats, num_resamples) -> dict[str, dict]:
    """Mean half-width (points) of the EMT and TP change for N prompts x k samples, over random prompt subsets."""
    rng, grid = random.Random(0), {}
    for n in sizes:
        subsets = [rng.sample(prompts, n) for _ in range(repeats if n < len(prompts) else 1)]
        for k in ks:
            for metric in METRICS:
                widths = [half_width_points(r) for i, subset in enumerate(subsets)
                          if (r := change(reference, treated, subset, k, metric, num_resamples, seed=i)) is not None]
                grid[f"{metric}/{n}x{k}"] = {"metric": metric, "prompts": n, "samples": k,
                                             "half_width_points": sum(widths) / len(widths) if widths else None,
                                             "subsets": len(widths)}
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--reference", required=True, help="the reference model's key in generations.jsonl")
    parser.add_argument("--treated", required=True, help="the treated model's key in generations.jsonl")
    parser.add_argument("--prompts", default="50,100,150,200", help="prompt counts of the width grid")
    parser.add_argument("--samples", default="2,4,8", help="samples per prompt of the width grid")
    parser.add_argument("--repeats", type=int, default=10, help="random prompt subsets per grid cell")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per interval of the grid")
    parser.add_argument("--out", type=Path, help="JSON of every number (default RUN_DIR/validation_width.json)")
    args = parser.parse_args()

    samples, kinds = read_samples(args.run_dir), prompt_kinds(args.run_dir)
    result = {"run_dir": str(args.run_dir), "reference": args.reference, "treated": args.treated, "scorers": {}}
    for scorer, by_model in samples.items():
        reference, treated = by_model[args.reference], by_model[args.treated]
        prompts = sorted(set(reference) & set(treated))
        k_full = min(len(s) for s in (*reference.values(), *treated.values()))
        full = changes_by_kind(reference, treated, kinds)
        sizes = [n for n in map(int, args.prompts.split(",")) if n <= len(prompts)]
        ks = [k for k in map(int, args.samples.split(",")) if k <= k_full]
        result["scorers"][scorer] = {"prompts": len(prompts), "samples": k_full, "full": full,
                                     "grid": width_grid(reference, treated, prompts, sizes, ks, args.repeats,
                                                        args.resamples)}
        print(f"\n## {scorer}: {len(prompts)} prompts x {k_full} samples, {args.treated} vs {args.reference}\n")
        print("| prompts | kind | EMT change [95 %] | TP change [95 %] |\n|---|---|---|---|")
        for kind, entry in full.items():
            cells = ["–" if entry[m] is None else
                     f"{entry[m]['change']:+.1%} [{entry[m]['low']:+.1%}, {entry[m]['high']:+.1%}]" for m in METRICS]
            print(f"| {entry['prompts']} | {kind} | {cells[0]} | {cells[1]} |")
        print("\n| prompts x samples | EMT half-width (points) | TP half-width (points) |\n|---|---|---|")
        for n in sizes:
            for k in ks:
                cells = [result["scorers"][scorer]["grid"][f"{m}/{n}x{k}"]["half_width_points"] for m in METRICS]
                print(f"| {n} x {k} | " + " | ".join("–" if c is None else f"{c:.1f}" for c in cells) + " |")
    out = args.out or args.run_dir / "validation_width.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

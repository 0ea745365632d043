"""Run the tiny replication with the checkout this file lives in, compare two such runs, or rerun one.

    python tests/scripts/tiny_replication_parity.py run OUT [--models DIR]
    python tests/scripts/tiny_replication_parity.py compare RUN_A RUN_B
    python tests/scripts/tiny_replication_parity.py rerun OUT [--models DIR]

`run` saves two tiny random models (llama and gemma3 families, seed 0) into DIR (default OUT/models) once, then runs
`recipes/replicate.py experiment=tiny` on them into OUT/rep with this checkout's code (tests/tiny_replication.py).
`compare` checks that two runs made the same numbers (times and paths aside), the same distilled texts and the same
fingerprints. `rerun` runs again on an existing OUT, e.g. a new checkout on an old checkout's run directory, and
fails unless every stage is found finished (a valid cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from tiny_replication import differing_numbers, replication_command, save_tiny_models, without_timings  # noqa: E402

# Differ between two runs of the same settings besides timings: when and by which process, the command line.
RUN_KEYS = ("time", "created_at", "pid", "command", "config")


def run(out: Path, models: Path) -> None:
    llama, gemma = save_tiny_models(models)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    subprocess.run(replication_command(out / "rep", llama, gemma), cwd=REPO, env=env, check=True)


def _json_lines(path: Path, root: Path) -> list:
    text = path.read_text().replace(str(root), "<root>")
    if path.suffix == ".jsonl":
        return [without_timings(json.loads(line, parse_constant=str), RUN_KEYS) for line in text.splitlines() if line.strip()]
    return without_timings(json.loads(text, parse_constant=str), RUN_KEYS)


def _compared_files(rep: Path) -> list[Path]:
    """The run's results: reports, generations, distilled texts and their metadata (fingerprints included)."""
    names = {"report.json", "generations.jsonl", "selection.json", "metadata.json", "distill_run.json"}
    return sorted(p.relative_to(rep) for p in rep.rglob("*") if p.name in names or p.parent.name == "shards")


def _distilled_texts(rep: Path) -> dict[str, list[str]]:
    import datasets

    return {str(d.relative_to(rep)): datasets.load_from_disk(str(d))["text"]
            for d in sorted(rep.glob("*/distilled")) if (d / "dataset_info.json").is_file()}


def compare(a: Path, b: Path) -> list[str]:
    rep_a, rep_b = a / "rep", b / "rep"
    files_a, files_b = _compared_files(rep_a), _compared_files(rep_b)
    problems = [f"only in one run: {sorted(set(map(str, files_a)) ^ set(map(str, files_b)))}"] if files_a != files_b else []
    for rel in sorted(set(files_a) & set(files_b)):
        if rel.suffix in (".json", ".jsonl"):
            problems += [f"{rel}{d}" for d in differing_numbers(_json_lines(rep_a / rel, a), _json_lines(rep_b / rel, b))][:5]
    texts_a, texts_b = _distilled_texts(rep_a), _distilled_texts(rep_b)
    problems += [f"distilled texts differ: {k}" for k in sorted(set(texts_a) | set(texts_b)) if texts_a.get(k) != texts_b.get(k)]
    print(f"compared {len(files_a)} result files and {len(texts_a)} distilled datasets "
          f"({sum(map(len, texts_a.values()))} texts): {len(problems)} differences")
    return problems


def _stage_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rep" / "replicate_log.jsonl").read_text().splitlines()]


def recomputed_stages(out: Path, models: Path) -> list[dict]:
    """Run again on ``out``: the stages that were not found finished (an empty list: every stage was a cache)."""
    before = len(_stage_log(out))
    run(out, models)
    rerun = _stage_log(out)[before:]
    print(f"rerun: {len(rerun)} stages, {sum(e['status'] == 'cached' for e in rerun)} cached")
    return [e for e in rerun if e["status"] != "cached"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run the tiny replication into OUT/rep")
    run_parser.add_argument("out", type=Path)
    run_parser.add_argument("--models", type=Path, help="where the tiny models are saved (default OUT/models)")
    rerun_parser = sub.add_parser("rerun", help="run again on an existing OUT: every stage must be cached")
    rerun_parser.add_argument("out", type=Path)
    rerun_parser.add_argument("--models", type=Path)
    compare_parser = sub.add_parser("compare", help="compare two runs' numbers, texts and fingerprints")
    compare_parser.add_argument("a", type=Path)
    compare_parser.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.command in ("run", "rerun"):
        out = args.out.resolve()
        models = (args.models or out / "models").resolve()
        if args.command == "run":
            run(out, models)
            return 0
        recomputed = recomputed_stages(out, models)
        print("\n".join(map(str, recomputed)) or "every stage was a valid cache")
        return 1 if recomputed else 0
    problems = compare(args.a.resolve(), args.b.resolve())
    print("\n".join(problems) or "same numbers, texts and fingerprints")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

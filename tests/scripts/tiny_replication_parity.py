"""Run the tiny replication with the checkout this file lives in, or compare two such runs.

    python tests/scripts/tiny_replication_parity.py run OUT [--models DIR]
    python tests/scripts/tiny_replication_parity.py compare RUN_A RUN_B

`run` saves two tiny random models (llama and gemma3 families, seed 0) into DIR (default OUT/models) once, then runs
`recipes/replicate.py experiment=tiny` on them into OUT/rep with this checkout's code. `compare` checks that two
runs made the same numbers (report.json, times and paths aside), the same distilled texts and the same stage
fingerprints. Running `run` with a new checkout on a copy of an old run directory shows that the old stages are
still valid caches: every stage in the second half of its replicate_log.jsonl is `cached`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

TINY_DISTILL = ["data.max_samples=8", "anti_expert.max_steps=2", "anti_expert.per_device_train_batch_size=2",
                "anti_expert.max_length=16", "anti_expert.logging_steps=1", "distill.num_samples=4",
                "distill.max_length=8", "distill.batch_size=4", "distill.summary_num_samples=0"]


def _quoted(items: list[str]) -> str:
    return "[" + ",".join(f"'{item}'" for item in items) + "]"


def save_models(root: Path) -> tuple[Path, Path]:
    from tiny import char_tokenizer, tiny_gemma3, tiny_llama, word_tokenizer

    llama_dir, gemma_dir = root / "tiny-llama", root / "tiny-gemma3"
    if not llama_dir.is_dir():
        word = word_tokenizer(padding_side="left")
        tiny_llama(len(word.get_vocab()), seed=0).save_pretrained(llama_dir)
        word.save_pretrained(llama_dir)
    if not gemma_dir.is_dir():
        char = char_tokenizer()
        tiny_gemma3(len(char.get_vocab()), seed=0).save_pretrained(gemma_dir)
        char.save_pretrained(gemma_dir)
    return llama_dir, gemma_dir


def run(out: Path, models: Path) -> None:
    llama, gemma = save_models(models)
    tiny_test = ["prompts.num_prompts=4", "eval.num_samples=2", "eval.max_new_tokens=6", "eval.batch_size=32",
                 "mmlu.subjects=[abstract_algebra]", "mmlu.limit=2", "perplexity.max_tokens=128",
                 "perplexity.max_length=64", "perplexity.stride=32", f"perplexity.reference_model={llama}",
                 "progress=false", "also_scorers=[]"]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--cpu",
           "recipes/replicate.py", "experiment=tiny", f"output_dir={out / 'rep'}",
           f"distill.overrides={_quoted(TINY_DISTILL)}",
           f"distill.sources.smollm2.model={llama}",
           f"distill.sources.smollm2.overrides={_quoted(['experiment=embedded_smollm2', f'model.name_or_path={llama}', 'distill.start_token=null'])}",
           f"distill.sources.gemma3.model={gemma}",
           f"distill.sources.gemma3.overrides={_quoted(['experiment=embedded_gemma3', f'model.name_or_path={gemma}', 'distill.start_token=e'])}",
           f"targets.smollm2.model={llama}",
           f"targets.smollm2.overrides={_quoted(['experiment=embedded_smollm2', f'model.name_or_path={llama}'])}",
           f"targets.gemma3.model={gemma}",
           f"targets.gemma3.overrides={_quoted(['experiment=embedded_gemma3', f'model.name_or_path={gemma}'])}",
           f"test.overrides={_quoted(tiny_test)}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items()
                if k not in ("wall_time", "timings", "stage_times", "time", "created_at", "pid", "command", "config")
                and not k.endswith("_s")}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def _json_lines(path: Path, root: Path) -> list:
    text = path.read_text().replace(str(root), "<root>")
    if path.suffix == ".jsonl":
        return [_without_times(json.loads(line, parse_constant=str)) for line in text.splitlines() if line.strip()]
    return _without_times(json.loads(text, parse_constant=str))


def differing(left, right, path: str = "", rel: float = 1e-5) -> list[str]:
    """Where two JSON values differ: keys, strings, integers and lengths exactly, floats beyond ``rel``."""
    if isinstance(left, dict) and isinstance(right, dict):
        if set(left) != set(right):
            return [f"{path}: keys {sorted(set(left) ^ set(right))}"]
        return [d for k in left for d in differing(left[k], right[k], f"{path}/{k}", rel)]
    if isinstance(left, list) and isinstance(right, list):
        if len(left) != len(right):
            return [f"{path}: {len(left)} != {len(right)} items"]
        return [d for i, (a, b) in enumerate(zip(left, right, strict=True)) for d in differing(a, b, f"{path}[{i}]", rel)]
    if isinstance(left, float) and isinstance(right, float):
        return [] if math.isclose(left, right, rel_tol=rel, abs_tol=1e-12) else [f"{path}: {left!r} != {right!r}"]
    return [] if left == right else [f"{path}: {left!r} != {right!r}"]


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
            problems += [f"{rel}{d}" for d in differing(_json_lines(rep_a / rel, a), _json_lines(rep_b / rel, b))][:5]
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

"""The tiny replication: two tiny random models of two families, the replication command at experiment=tiny sizes
on them, and how two runs' JSON results are compared. Shared by tests/replication/test_replicate.py and
tests/scripts/tiny_replication_parity.py."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from tiny import char_tokenizer, tiny_gemma3, tiny_llama, word_tokenizer

TINY_DISTILL = ["data.max_samples=8", "anti_expert.max_steps=2", "anti_expert.per_device_train_batch_size=2",
                "anti_expert.max_length=16", "anti_expert.logging_steps=1", "distill.num_samples=4",
                "distill.max_length=8", "distill.batch_size=4", "distill.summary_num_samples=0"]
# What legitimately differs between two runs of the same settings: how long things took.
TIMING_KEYS = ("wall_time", "timings", "stage_times")


def save_tiny_models(root: Path) -> tuple[Path, Path]:
    """Two tiny random models (llama with a word tokenizer, gemma3 with a character one, seed 0), saved like any
    local checkpoint under ``root``; a model already saved there is kept."""
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


def _quoted_list(items: list[str]) -> str:
    return "[" + ",".join(f"'{item}'" for item in items) + "]"


def replication_command(out: Path, llama_dir: Path, gemma_dir: Path, *extra: str) -> list[str]:
    """``accelerate launch recipes/replicate.py experiment=tiny`` on the two tiny models into ``out``."""
    tiny_test = ["prompts.num_prompts=4", "eval.num_samples=2", "eval.max_new_tokens=6", "eval.batch_size=32",
                 "mmlu.subjects=[abstract_algebra]", "mmlu.limit=2", "perplexity.max_tokens=128",
                 "perplexity.max_length=64", "perplexity.stride=32", f"perplexity.reference_model={llama_dir}",
                 "progress=false", "also_scorers=[]"]
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--cpu",
            "recipes/replicate.py", "experiment=tiny", f"output_dir={out}",
            f"distill.overrides={_quoted_list(TINY_DISTILL)}",
            f"distill.sources.smollm2.model={llama_dir}",
            f"distill.sources.smollm2.overrides={_quoted_list(['experiment=embedded_smollm2', f'model.name_or_path={llama_dir}', 'distill.start_token=null'])}",
            f"distill.sources.gemma3.model={gemma_dir}",
            # The tiny char-level model repeats its input token; started from <bos> it writes only special tokens.
            f"distill.sources.gemma3.overrides={_quoted_list(['experiment=embedded_gemma3', f'model.name_or_path={gemma_dir}', 'distill.start_token=e'])}",
            f"targets.smollm2.model={llama_dir}",
            f"targets.smollm2.overrides={_quoted_list(['experiment=embedded_smollm2', f'model.name_or_path={llama_dir}'])}",
            f"targets.gemma3.model={gemma_dir}",
            f"targets.gemma3.overrides={_quoted_list(['experiment=embedded_gemma3', f'model.name_or_path={gemma_dir}'])}",
            f"test.overrides={_quoted_list(tiny_test)}", *extra]


def without_timings(value, also: tuple[str, ...] = ()):
    """``value`` (parsed JSON) without its timings at any depth (``TIMING_KEYS``, every ``*_s``) and the keys
    ``also``."""
    if isinstance(value, dict):
        return {k: without_timings(v, also) for k, v in value.items()
                if k not in TIMING_KEYS and k not in also and not k.endswith("_s")}
    if isinstance(value, list):
        return [without_timings(v, also) for v in value]
    return value


def differing_numbers(left, right, path: str = "", rel: float = 1e-5) -> list[str]:
    """The paths where two JSON values differ: any key, string, integer or length exactly, a float beyond ``rel``.

    Runs with other thread counts sum CPU reductions in another order, so floats agree to about 1e-7, not to the
    last bit. A different sample or choice moves a number by far more than ``rel``."""
    if isinstance(left, dict) and isinstance(right, dict):
        if set(left) != set(right):
            return [f"{path}: keys {sorted(set(left) ^ set(right))}"]
        return [d for k in left for d in differing_numbers(left[k], right[k], f"{path}/{k}", rel)]
    if isinstance(left, list) and isinstance(right, list):
        if len(left) != len(right):
            return [f"{path}: {len(left)} != {len(right)} items"]
        return [d for i, (a, b) in enumerate(zip(left, right, strict=True))
                for d in differing_numbers(a, b, f"{path}[{i}]", rel)]
    if isinstance(left, float) and isinstance(right, float):
        return [] if math.isclose(left, right, rel_tol=rel, abs_tol=1e-12) else [f"{path}: {left!r} != {right!r}"]
    return [] if left == right else [f"{path}: {left!r} != {right!r}"]

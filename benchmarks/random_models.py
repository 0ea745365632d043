"""Random-initialised models of real shapes, an in-process tokenizer and synthetic text: benchmarks that download
nothing. Throughput needs a model's shapes, not its trained weights.

The shapes ship as small JSON files in ``benchmarks/model_configs/`` (a name there, or any config JSON path):
``smollm2-135m`` and ``gemma3-270m`` (copied from the embedded models' configs) and ``llama2-7b``.

    python benchmarks/random_models.py save --config smollm2-135m --out DIR    # model + tokenizer, from_pretrained-able
    python benchmarks/random_models.py texts --out texts.csv --num-texts 640 --min-words 150 --max-words 200

>>> from random_models import model_config
>>> model_config("llama2-7b").hidden_size
4096
>>> model_config("llama2-7b", overrides={"num_hidden_layers": 2}).num_hidden_layers
2
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedTokenizerFast

CONFIG_DIR = Path(__file__).resolve().with_name("model_configs")
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
TOKENIZER_VOCAB = 4096  # below every shipped vocabulary; real prompts tokenize to about one token per word of them
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "an", "el", "is", "or", "um", "tr", "ch", "st", "pl"]


def config_path(name_or_path: str) -> Path:
    """A shipped shape (``smollm2-135m``) or a path to a config JSON file."""
    path = Path(name_or_path) if name_or_path.endswith(".json") else CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"No model config at {path}: pass one of {shipped} or the path of a config JSON file")
    return path


def model_config(name_or_path: str, overrides: dict | None = None) -> PreTrainedConfig:
    """The config of a shipped shape, with ``overrides`` (e.g. fewer layers for a dry run) applied."""
    fields = {**json.loads(config_path(name_or_path).read_text()), **(overrides or {})}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def parse_overrides(pairs: list[str]) -> dict:
    """``["num_hidden_layers=2", "hidden_size=64"]`` -> ``{"num_hidden_layers": 2, "hidden_size": 64}`` (JSON values)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"config override {pair!r} is not KEY=VALUE (e.g. num_hidden_layers=2)")
        overrides[key] = json.loads(value)
    return overrides


def pseudo_words() -> list[str]:
    """The fixed vocabulary of :func:`synthetic_texts` (the same for every seed, so one tokenizer fits all texts)."""
    rng = random.Random(0)
    return sorted({"".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(3000)})


def synthetic_texts(num_texts: int, min_words: int, max_words: int, seed: int = 0) -> list[str]:
    """Texts of pseudo-words with Zipf-like frequencies, each ``min_words``..``max_words`` words long (seeded)."""
    rng = random.Random(seed)
    words = pseudo_words()
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    return [" ".join(rng.choices(words, weights, k=rng.randint(min_words, max_words))) for _ in range(num_texts)]


def in_process_tokenizer(texts: list[str], vocab_size: int = TOKENIZER_VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` here, left-padded, ids 0-3 for pad/bos/eos/unk (no download)."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="left", **SPECIAL_TOKENS)


def random_model(config: PreTrainedConfig, tokenizer: PreTrainedTokenizerFast, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", seed: int = 0):
    """A randomly initialised causal LM of ``config``'s shape, built on ``device``, whose special token ids are the
    tokenizer's (``config`` is not modified)."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer's {len(tokenizer)} tokens do not fit the model's vocab_size {config.vocab_size}")
    config = config.__class__.from_dict(config.to_dict())
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    return model.eval()


def benchmark_model(name: str, random_init: bool, overrides: list[str], dtype: torch.dtype, device: str):
    """``(model, tokenizer)`` on ``device``: with ``random_init``, a random model of the shipped shape ``name`` (with
    ``overrides``, KEY=VALUE) and an in-process tokenizer, no download; else the embedded model or path ``name``."""
    if not random_init:
        if overrides:
            raise ValueError(f"config overrides {overrides} need a random-initialised model (--random-init)")
        from unidetox import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(name, dtype=dtype)
        return model.to(device).eval(), tokenizer
    tokenizer = in_process_tokenizer(synthetic_texts(640, 20, 60))
    return random_model(model_config(name, parse_overrides(overrides)), tokenizer, dtype, device), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    save = commands.add_parser("save", help="a random model and its tokenizer, saved with save_pretrained")
    save.add_argument("--config", required=True, help="a shipped shape name or a config JSON path")
    save.add_argument("--override", action="append", default=[], help="KEY=VALUE (JSON) applied to the config")
    save.add_argument("--out", required=True)
    texts = commands.add_parser("texts", help="synthetic texts in a CSV file with one column, Text")
    texts.add_argument("--out", required=True)
    texts.add_argument("--num-texts", type=int, default=640)
    texts.add_argument("--min-words", type=int, default=20)
    texts.add_argument("--max-words", type=int, default=60)
    texts.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "save":
        model, tokenizer = benchmark_model(args.config, True, args.override, torch.float32, "cpu")
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        return
    with open(args.out, "w", newline="") as fh:
        csv.writer(fh).writerows([["Text"], *([text] for text in synthetic_texts(
            args.num_texts, args.min_words, args.max_words, args.seed))])


if __name__ == "__main__":
    main()

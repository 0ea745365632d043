"""The decoding paths agree on this device, in float32 and bfloat16: what the CPU tests assert, on tiny models.

    python benchmarks/gpu_correctness.py --device cuda --json correctness.json   # exit 1 if a check fails

Checks, each on the tiny random models of ``tests/tiny.py`` with left-padded prompts:

- ``sampler_parity`` (tests/decoding/test_sampler.py): greedy ``generate`` with :class:`ContrastiveDetoxSampler` (KV caches
  for both models) against a cache-free reference that runs both models on the whole sequence at every step.
- ``fused_vs_two_model`` (tests/decoding/test_fused.py): :func:`fused_contrastive_generate` (base and LoRA anti-expert in one
  doubled forward) against ``generate`` + the sampler with the LoRA model as a second model.
- ``prefix_sharing`` (tests/decoding/test_prefix_sharing.py): :func:`generate_samples` with each prompt prefilled once
  against a row per sample, same seeds, llama and gemma3.

Each records ``score_diff`` (the largest difference of the finite scores over the largest score magnitude) and
``agreement`` (the share of equal tokens or samples). float32 must agree exactly in tokens and to
``SCORE_TOLERANCE`` in scores. bfloat16 keeps 8 bits of mantissa, and another batch layout rounds differently, so a
near-tie may flip a token: it must stay within its looser tolerance and agree on ``MIN_AGREEMENT`` of the tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny.py: the tests' own tiny models
from tiny import tiny_gemma3, tiny_llama, word_tokenizer  # noqa: E402

from unidetox import ContrastiveDetoxSampler, GenerateOptions, SamplingConfig, contrastive_scores  # noqa: E402
from unidetox.decoding.fused import fused_contrastive_generate  # noqa: E402
from unidetox.decoding.protocol import generate_samples  # noqa: E402

PROMPTS = ["the cat sat on", "a good", "science helps us understand the", "music", "hate",
           "the weather is nice today and the sun is bright and the cat sat on the mat near the door", ""]
ALPHA = 0.1
NEW_TOKENS = 12
SCORE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
MIN_AGREEMENT = {"float32": 1.0, "bfloat16": 0.9}


def score_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference of scores finite in both, over the largest finite magnitude of ``expected``."""
    both = torch.isfinite(actual) & torch.isfinite(expected)
    if not both.any():
        return 0.0
    diff = (actual[both].double() - expected[both].double()).abs().max()
    return float(diff / expected[both].double().abs().max().clamp(min=1.0))


def reference_scores(base, anti, input_ids, attention_mask):
    """Both models on the whole sequence, no cache, positions from the mask (the scores of test_sampler.py)."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        base_logits = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[:, -1]
        anti_logits = anti(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[:, -1]
    return contrastive_scores(base_logits.float(), anti_logits.float(), ALPHA)


def two_model_generate(base, anti, inputs):
    sampler = ContrastiveDetoxSampler(anti, alpha=ALPHA, attention_mask=inputs["attention_mask"])
    return base.generate(**inputs, logits_processor=LogitsProcessorList([sampler]), return_dict_in_generate=True,
                         output_scores=True, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=0)


def check_sampler_parity(tokenizer, dtype, device) -> dict:
    base = tiny_llama(len(tokenizer), seed=0).to(device, dtype)
    anti = tiny_llama(len(tokenizer), seed=1).to(device, dtype)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    out = two_model_generate(base, anti, inputs)
    prompt_len = inputs["input_ids"].shape[1]
    diffs, equal = [], []
    for step, scores in enumerate(out.scores):
        ids = out.sequences[:, : prompt_len + step]
        mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(len(PROMPTS), step)], dim=1)
        reference = reference_scores(base, anti, ids, mask)
        diffs.append(score_diff(scores, reference))
        equal.append((out.sequences[:, prompt_len + step] == reference.argmax(-1)).float().mean().item())
    return {"score_diff": max(diffs), "agreement": sum(equal) / len(equal)}


def check_fused_vs_two_model(tokenizer, dtype, device) -> dict:
    base = tiny_llama(len(tokenizer), seed=0)
    torch.manual_seed(123)
    config = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.0)
    lora = get_peft_model(copy.deepcopy(base), config).eval().to(device, dtype)
    base = base.to(device, dtype)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    reference = two_model_generate(base, lora, inputs)
    fused = fused_contrastive_generate(
        lora, inputs["input_ids"], inputs["attention_mask"], SamplingConfig(alpha=ALPHA),
        GenerateOptions(output_scores=True, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[],
                        pad_token_id=0),
    )
    prompt_len = inputs["input_ids"].shape[1]
    same = (fused.sequences[:, prompt_len:] == reference.sequences[:, prompt_len:]).float()
    # Compare scores only up to a row's first differing token: after it the rows continue different texts.
    diffs = []
    for step, (f, r) in enumerate(zip(fused.scores, reference.scores, strict=True)):
        rows = same[:, :step].all(dim=1) if step else torch.ones(len(PROMPTS), dtype=torch.bool, device=device)
        diffs.append(score_diff(f[rows], r[rows]))
    return {"score_diff": max(diffs), "agreement": same.mean().item()}


def check_prefix_sharing(tokenizer, dtype, device) -> dict:
    agreement = []
    for make in (tiny_llama, tiny_gemma3):
        model = make(len(tokenizer), seed=0).to(device, dtype)
        kwargs = dict(num_samples=5, max_new_tokens=8, seed=0, batch_size=8)
        rows = generate_samples(model, tokenizer, PROMPTS, share_prefill=False, **kwargs)
        shared = generate_samples(model, tokenizer, PROMPTS, **kwargs)
        agreement += [a.token_ids == b.token_ids for a, b in zip(rows, shared, strict=True)]
    return {"score_diff": None, "agreement": sum(agreement) / len(agreement)}


CHECKS = {"sampler_parity": check_sampler_parity, "fused_vs_two_model": check_fused_vs_two_model,
          "prefix_sharing": check_prefix_sharing}


def passed(result: dict, dtype: str) -> bool:
    within = result["score_diff"] is None or result["score_diff"] <= SCORE_TOLERANCE[dtype]
    return within and result["agreement"] >= MIN_AGREEMENT[dtype]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated subset of {list(SCORE_TOLERANCE)}")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    tokenizer = word_tokenizer(padding_side="left")
    results = {}
    for dtype in args.dtypes.split(","):
        if dtype not in SCORE_TOLERANCE:
            parser.error(f"unknown dtype {dtype!r}; choose from {list(SCORE_TOLERANCE)}")
        for name, check in CHECKS.items():
            result = check(tokenizer, getattr(torch, dtype), args.device)
            result.update(ok=passed(result, dtype), score_tolerance=SCORE_TOLERANCE[dtype],
                          min_agreement=MIN_AGREEMENT[dtype])
            results[f"{name}/{dtype}"] = result
            print(f"{name:20s} {dtype:9s} {json.dumps(result)}", flush=True)
    report = {"device": args.device, "all_ok": all(r["ok"] for r in results.values()), "checks": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"correctness: {'all ok' if report['all_ok'] else 'FAILED'}")
    sys.exit(0 if report["all_ok"] else 1)


if __name__ == "__main__":
    main()

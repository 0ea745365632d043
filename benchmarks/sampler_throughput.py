"""Tokens/s of plain sampling vs UniDetox contrastive sampling (cached and naive anti-expert).

    python benchmarks/sampler_throughput.py                      # smollm2-135m, batch 32, 64 new tokens
    python benchmarks/sampler_throughput.py --batch-size 64 --device cuda --dtype bfloat16

The anti-expert is a copy of the base with Gaussian-perturbed weights (same vocabulary, same cost). Modes are
interleaved over repeats and the median is reported, so machine noise hits all modes alike; the ratios to plain
``generate`` are printed last.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from unidetox import ContrastiveDetoxSampler, contrastive_scores, load_model_and_tokenizer


class NaiveContrastiveSampler(LogitsProcessor):
    """The authors' pattern without its bugs: the anti-expert recomputes the whole sequence every step (no cache)."""

    def __init__(self, anti_expert, alpha, prompt_mask):
        self.anti_expert, self.alpha, self.prompt_mask = anti_expert, alpha, prompt_mask

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        extra = input_ids.shape[1] - self.prompt_mask.shape[1]
        mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(len(input_ids), extra)], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.anti_expert(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        return contrastive_scores(scores, logits, self.alpha)


def perturbed_copy(model, scale, seed):
    anti = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in anti.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * scale * p.float().std().to(p.dtype))
    return anti


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--skip-naive", action="store_true", help="the naive mode is quadratic in length")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    base, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
    base.to(args.device).eval()
    anti = perturbed_copy(base, scale=0.05, seed=0).eval()
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((args.batch_size, 1), bos, device=args.device)
    mask = torch.ones_like(input_ids)
    gen_kwargs = dict(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id,
    )

    def run(mode):
        processors = LogitsProcessorList()
        if mode == "sampler":
            processors.append(ContrastiveDetoxSampler(anti, alpha=args.alpha, attention_mask=mask))
        elif mode == "naive":
            processors.append(NaiveContrastiveSampler(anti, args.alpha, mask))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = base.generate(input_ids=input_ids, attention_mask=mask, logits_processor=processors, **gen_kwargs)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        new_tokens = (out.shape[1] - 1) * out.shape[0]
        return new_tokens / elapsed

    modes = ["plain", "sampler"] + ([] if args.skip_naive else ["naive"])
    run("plain")  # warm-up (allocator, kernels)
    results = {m: [] for m in modes}
    for r in range(args.repeats):
        for m in modes:
            results[m].append(run(m))
            print(f"repeat {r}: {m:8s} {results[m][-1]:9.1f} tok/s", flush=True)
    median = {m: statistics.median(v) for m, v in results.items()}
    ratios = {m: median[m] / median["plain"] for m in modes}
    report = {
        "model": args.model, "batch_size": args.batch_size, "new_tokens": args.new_tokens, "device": args.device,
        "dtype": args.dtype, "torch_threads": torch.get_num_threads(), "tokens_per_s": median, "ratio_to_plain": ratios,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    print(json.dumps(report, indent=2))
    for m in modes:
        print(f"ratio {m:8s} {ratios[m]:.3f}  ({median[m]:.1f} tok/s)")


if __name__ == "__main__":
    main()

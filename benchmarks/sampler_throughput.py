"""Tokens/s of plain sampling vs UniDetox contrastive sampling.

    # LoRA anti-expert (r=16, all linear layers): plain vs two-model sampler vs fused one-forward path
    python benchmarks/sampler_throughput.py
    # a separate anti-expert (perturbed full copy): plain vs sampler (own KV cache) vs naive (no cache)
    python benchmarks/sampler_throughput.py --anti-expert perturbed --modes plain,sampler,naive
    python benchmarks/sampler_throughput.py --batch-size 64 --device cuda --dtype bfloat16
    # no download: a random-initialised model of a shape in benchmarks/model_configs/ (speed needs no weights)
    python benchmarks/sampler_throughput.py --random-init --model llama2-7b --device cuda --dtype bfloat16

Modes:
- ``plain``: ``generate`` of the base alone.
- ``sampler``: ``generate`` + :class:`ContrastiveDetoxSampler` with a separate anti-expert model (for ``--anti-expert
  lora``: the LoRA model merged into a full copy, the usual two-model set-up).
- ``naive``: the anti-expert recomputes the whole sequence every step (no KV cache).
- ``fused``: :func:`unidetox.decoding.fused.fused_contrastive_generate`, base and LoRA anti-expert in one doubled forward.

Modes are interleaved over repeats and the median is reported, so machine noise hits all modes alike; the ratios to
plain ``generate`` are printed last. On CUDA, ``peak_memory_gib`` is each mode's peak allocation, every model the
modes use (base, LoRA copy, merged anti-expert) included.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from random_models import benchmark_model
from transformers import LogitsProcessor, LogitsProcessorList

from unidetox import ContrastiveDetoxSampler, GenerateOptions, SamplingConfig, contrastive_scores
from unidetox.decoding.fused import fused_contrastive_generate


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
    parser.add_argument("--model", default="smollm2-135m", help="an embedded model or a path; with --random-init, "
                        "a shape in benchmarks/model_configs/ or a config JSON")
    parser.add_argument("--random-init", action="store_true", help="a random model of --model's shape with an "
                        "in-process tokenizer: nothing downloaded")
    parser.add_argument("--override", action="append", default=[],
                        help="with --random-init: KEY=VALUE (JSON) set in the config, e.g. num_hidden_layers=2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--anti-expert", choices=["lora", "perturbed"], default="lora")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--modes", default=None, help="comma-separated; default plain,sampler,fused (lora) or "
                        "plain,sampler,naive (perturbed); naive is quadratic in length")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    base, tokenizer = benchmark_model(args.model, args.random_init, args.override, dtype, args.device)
    lora_model = None
    if args.anti_expert == "perturbed":
        anti = perturbed_copy(base, scale=0.05, seed=0).eval()
    else:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear",
                            lora_dropout=0.0, init_lora_weights="gaussian")
        lora_model = get_peft_model(copy.deepcopy(base), config).eval()
        with torch.no_grad():  # a trained adapter has non-zero B; random B keeps the benchmark honest
            for name, p in lora_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        anti = copy.deepcopy(lora_model).merge_and_unload().eval()
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((args.batch_size, 1), bos, device=args.device)
    mask = torch.ones_like(input_ids)
    gen_kwargs = dict(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id,
    )

    def run(mode):
        if mode == "fused":
            start = time.perf_counter()
            out = fused_contrastive_generate(
                lora_model, input_ids, mask, SamplingConfig(alpha=args.alpha),
                GenerateOptions(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id),
            ).sequences
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return (out.shape[1] - 1) * out.shape[0] / (time.perf_counter() - start)
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

    default_modes = "plain,sampler,fused" if args.anti_expert == "lora" else "plain,sampler,naive"
    modes = (args.modes or default_modes).split(",")
    if "fused" in modes and lora_model is None:
        parser.error("the fused mode needs --anti-expert lora")
    if "plain" not in modes:
        modes.insert(0, "plain")
    cuda = args.device.startswith("cuda")
    run("plain")  # warm-up (allocator, kernels)
    results = {m: [] for m in modes}
    peak_memory = dict.fromkeys(modes, 0.0)
    for r in range(args.repeats):
        for m in modes:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            results[m].append(run(m))
            if cuda:
                peak_memory[m] = max(peak_memory[m], torch.cuda.max_memory_allocated() / 2**30)
            print(f"repeat {r}: {m:8s} {results[m][-1]:9.1f} tok/s", flush=True)
    median = {m: statistics.median(v) for m, v in results.items()}
    ratios = {m: median[m] / median["plain"] for m in modes}
    report = {
        "model": args.model, "random_init": args.random_init, "config_overrides": args.override,
        "anti_expert": args.anti_expert, "batch_size": args.batch_size, "new_tokens": args.new_tokens, "device": args.device,
        "dtype": args.dtype, "torch_threads": torch.get_num_threads(), "tokens_per_s": median, "ratio_to_plain": ratios,
        "peak_memory_gib": peak_memory if cuda else None,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    print(json.dumps(report, indent=2))
    for m in modes:
        print(f"ratio {m:8s} {ratios[m]:.3f}  ({median[m]:.1f} tok/s)")


if __name__ == "__main__":
    main()

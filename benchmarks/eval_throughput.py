"""Tokens/s of the toxicity protocol's sampling (K continuations per prompt): four layouts of the same work.

    python benchmarks/eval_throughput.py                                      # 64 ToxiGen test prompts x 25 x 20
    python benchmarks/eval_throughput.py --models smollm2-135m --num-prompts 8 --repeats 1
    python benchmarks/eval_throughput.py --device cuda --dtype bfloat16 --batch-size 400
    # no download, no data: random models of the shipped shapes, synthetic prompts of ToxiGen's 3-30 words
    python benchmarks/eval_throughput.py --random-init --models smollm2-135m,gemma3-270m --device cuda --dtype bfloat16

Modes (the same prompts, K samples of ``--max-new-tokens`` tokens each, top-p 0.9, top-k off):
- ``authors``: the authors' pattern, one ``generate(num_return_sequences=K)`` per prompt (K rows, K prefills).
- ``mixed``: :func:`unidetox.decoding.protocol.generate_samples` with ``share_prefill=False``: batches of
  ``--batch-size`` (prompt, sample) rows, left-padded, each row prefilling its own copy of its prompt.
- ``shared``: ``generate_samples`` as the protocol runs it: the same batches and seeds, each distinct prompt of a
  batch prefilled once and its KV cache copied to its rows.
- ``bucketed``: ``shared`` with ``bucket_by_length=True``: prompts of similar token length batched together, so
  fewer left pads are computed (other batches, so another draw of the same distribution).
- ``preselected``: ``shared`` with ``preselect_top_k=--preselect-top-k``: each token drawn among the k most likely
  ones when they hold the nucleus (another random stream, so another draw of the same distribution).

Tokens/s counts every row's ``--max-new-tokens`` (the same work in each mode). Modes are interleaved over repeats
and the median is reported, so machine noise hits all modes alike; ``identical_samples`` (when ``mixed`` is run)
is the share of ``shared`` samples equal to the ``mixed`` ones drawn with the same seed (the layouts differ only in
the rounding of the prefill); ``padding_tokens`` counts the left pads in the prompts of each mode's batches. The
last lines are ``ratio <model> <mode> <x>``, relative to ``mixed`` (when run), ``ratio <model> preselect_top_k
<x>``, the ``shared`` sampling's time over the ``preselected`` one's, and ``ratio <model> authors_over_<mode> <x>``
(when ``authors`` is run), the authors' loop's time over each other mode's. On CUDA, ``peak_memory_gib`` is each
mode's peak allocation (the model's weights included).

Unless ``--no-scoring``, each repeat then scores the ``shared`` samples' conditional perplexity under
``--reference`` (default: the model itself), both ways (in alternating order): ``unshared``, every sample's
prompt + continuation run whole, and ``shared``, each prompt run once per batch and its KV cache shared by its
samples (:func:`unidetox.evaluation.likelihood.conditional_nll`).
``ratio <model> cond_ppl_shared <x>`` is the unshared scoring's time over the shared one's, and
``ratio <model> test_stage <x>`` that of one test stage (``shared`` sampling + scoring) scored unshared over
scored shared; ``ratio <model> cond_ppl_over_sampling <x>`` is the shared scoring's time over the sampling time of
the fastest mode but ``authors``, and ``ratio <model> test_stage_today_over_best <x>`` (with ``preselected``)
is (``shared`` sampling + unshared scoring) over (``preselected`` sampling + shared scoring).
``cond_ppl_max_rel_diff`` is the largest relative difference of a sample's NLL between the two scorings
(samples of few, well-predicted tokens have the largest: float32 rounding over a small NLL) and
``cond_ppl_rel_diff`` that of the conditional perplexity (mean over samples, uncapped; 0 when none is scored).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from random_models import benchmark_model, synthetic_texts

from unidetox.decoding.protocol import (
    ToxicityEvalConfig,
    count_padding_tokens,
    generate_samples,
    group_by_prompt,
    plan_batches,
    prompt_token_lengths,
)
from unidetox.evaluation.config import PerplexityConfig
from unidetox.evaluation.likelihood import aggregate_conditional_perplexity, conditional_nll
from unidetox.evaluation.prompts import PromptsConfig, load_prompts

MODES = ("authors", "mixed", "shared", "bucketed", "preselected")
SYNTHETIC_PROMPT_WORDS = (3, 30)  # the range of the ToxiGen test prompts' word counts


def authors_generate(model, tokenizer, prompts, num_samples, max_new_tokens, top_p, seed):
    """One ``generate`` call per prompt with ``num_return_sequences``, as the authors' pipeline runs it."""
    torch.manual_seed(seed)
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(model.device)
        model.generate(**enc, num_return_sequences=num_samples, do_sample=True, top_p=top_p, top_k=0,
                       max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_conditional_nll(model, tokenizer, prompts, continuations, batch_size, device, shared_first):
    """Seconds of the ``shared`` and ``unshared`` conditional scoring of the same samples, and their NLLs."""
    seconds, nll = {}, {}
    for scorer in ("shared", "unshared") if shared_first else ("unshared", "shared"):
        synchronize(device)
        start = time.perf_counter()
        nll[scorer] = conditional_nll(model, tokenizer, prompts, continuations, batch_size=batch_size,
                                      share_prompts=scorer == "shared")
        synchronize(device)
        seconds[scorer] = time.perf_counter() - start
    return seconds, nll


def relative_differences(a, b) -> tuple[float, float]:
    """The largest relative difference of a sample's NLL between ``a`` and ``b``, and that of their perplexity."""
    per_sample = max((abs(x - y) / max(abs(y), 1e-12) for (x, _), (y, _) in zip(a, b, strict=True)), default=0.0)
    if not any(n for _, n in b):
        return per_sample, 0.0
    ppl_a, ppl_b = (aggregate_conditional_perplexity(x, max_perplexity=float("inf")) for x in (a, b))
    return per_sample, abs(ppl_a - ppl_b) / ppl_b


def parse_args() -> argparse.Namespace:
    protocol = ToxicityEvalConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"],
                        help="model names or paths (space- or comma-separated); with --random-init, shapes in "
                        "benchmarks/model_configs/ or config JSON files")
    parser.add_argument("--random-init", action="store_true", help="random models of the --models' shapes with an "
                        "in-process tokenizer, on synthetic prompts: nothing downloaded, no data read")
    parser.add_argument("--override", action="append", default=[],
                        help="with --random-init: KEY=VALUE (JSON) set in every config, e.g. num_hidden_layers=2")
    parser.add_argument("--num-prompts", type=int, default=64, help="ToxiGen test prompts")
    parser.add_argument("--num-samples", type=int, default=protocol.num_samples, help="continuations per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=protocol.max_new_tokens)
    parser.add_argument("--top-p", type=float, default=protocol.top_p)
    parser.add_argument("--batch-size", type=int, default=protocol.batch_size,
                        help="rows per generate call in the mixed, shared and bucketed modes")
    parser.add_argument("--preselect-top-k", type=int, default=256, help="k of the preselected mode")
    parser.add_argument("--reference", default=None, help="reference LM of the conditional perplexity, loaded "
                        "as --models are (default: each model scores its own samples)")
    parser.add_argument("--ppl-batch-size", type=int, default=PerplexityConfig.batch_size,
                        help="samples per forward pass of the conditional perplexity")
    parser.add_argument("--no-scoring", action="store_true",
                        help="time the sampling only (no conditional perplexity, no scoring ratios)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES} (shared is "
                        "always run: its samples are the ones scored)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--data-dir", default=None, help="shared data folder (default: $UNIDETOX_DATA_DIR)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    if unknown := set(args.modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    if "shared" not in args.modes:
        args.modes.append("shared")  # the protocol's sampling: its samples are the ones scored
    return args


def sample(args, mode, seed, prompts, model, tokenizer):
    """Seconds of one sampling run of ``mode``, and its samples (None for ``authors``, which keeps none)."""
    synchronize(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    samples = None
    if mode == "authors":
        authors_generate(model, tokenizer, prompts, args.num_samples, args.max_new_tokens, args.top_p, seed)
    else:
        samples = generate_samples(model, tokenizer, prompts, args.num_samples, seed=seed,
                                   max_new_tokens=args.max_new_tokens, top_p=args.top_p, batch_size=args.batch_size,
                                   share_prefill=mode != "mixed", bucket_by_length=mode == "bucketed",
                                   preselect_top_k=args.preselect_top_k if mode == "preselected" else None)
    synchronize(args.device)
    return time.perf_counter() - start, samples


def padding_tokens(args, tokenizer, prompts) -> dict[str, int]:
    """Left pads in the prompts of each mode's batches."""
    lengths = prompt_token_lengths(tokenizer, prompts)
    return {
        "authors": 0,  # one prompt per call: nothing to pad
        **{m: count_padding_tokens(plan_batches(len(prompts), args.num_samples, args.batch_size,
                                                prompt_lengths=lengths if m == "bucketed" else None), lengths)
           for m in MODES if m != "authors"},
    }


def measure(args, name, prompts, model, tokenizer, reference) -> dict:
    """Each mode's sampling seconds per repeat (interleaved), and the ``shared`` samples' scoring both ways."""
    tokens = len(prompts) * args.num_samples * args.max_new_tokens
    seconds = {m: [] for m in args.modes}
    peak_memory = dict.fromkeys(args.modes, 0.0)
    identical, scoring, max_diff, ppl_diff = [], {"shared": [], "unshared": []}, 0.0, 0.0
    for repeat in range(args.repeats):
        drawn = {}
        for mode in args.modes:
            elapsed, drawn[mode] = sample(args, mode, repeat, prompts, model, tokenizer)
            seconds[mode].append(elapsed)
            if args.device.startswith("cuda"):
                peak_memory[mode] = max(peak_memory[mode], torch.cuda.max_memory_allocated() / 2**30)
            print(f"{name} repeat {repeat}: {mode:8s} {elapsed:8.2f} s {tokens / elapsed:9.1f} tok/s", flush=True)
        if "mixed" in drawn:
            same = [a.token_ids == b.token_ids for a, b in zip(drawn["mixed"], drawn["shared"], strict=True)]
            identical.append(sum(same) / len(same))
        if args.no_scoring:
            continue
        continuations = group_by_prompt(drawn["shared"], len(prompts), args.num_samples)
        elapsed, nll = time_conditional_nll(*reference, prompts, continuations, args.ppl_batch_size,
                                            args.device, shared_first=repeat % 2 == 0)
        sample_diff, repeat_ppl_diff = relative_differences(nll["shared"], nll["unshared"])
        max_diff, ppl_diff = max(max_diff, sample_diff), max(ppl_diff, repeat_ppl_diff)
        for scorer, value in elapsed.items():
            scoring[scorer].append(value)
            print(f"{name} repeat {repeat}: cond_ppl {scorer:8s} {value:8.2f} s", flush=True)
    median = {m: statistics.median(v) for m, v in seconds.items()}
    return {
        "seconds": median, "tokens_per_s": {m: tokens / s for m, s in median.items()},
        "identical_samples": identical, "peak_memory_gib": peak_memory if args.device.startswith("cuda") else None,
        "cond_ppl_seconds": None if args.no_scoring else {s: statistics.median(v) for s, v in scoring.items()},
        "cond_ppl_max_rel_diff": None if args.no_scoring else max_diff,
        "cond_ppl_rel_diff": None if args.no_scoring else ppl_diff,
    }


def ratios(seconds: dict[str, float], scoring: dict[str, float] | None) -> dict:
    """The goals' ratios from the median seconds of each sampling mode and of each scorer (None: not scored).

    ``authors_over_<mode>``: the authors' loop's time over each other mode's; ``best_mode``: the fastest mode but
    the authors'; ``cond_ppl_over_sampling``: the shared scoring's time over the best mode's sampling;
    ``test_stage_today_over_best``: (``shared`` sampling + unshared scoring) over (``preselected`` sampling +
    shared scoring), one test stage as the protocol ran before the two speed-ups over one with both.

    >>> r = ratios({"authors": 30.0, "shared": 10.0, "preselected": 8.0}, {"unshared": 12.0, "shared": 6.0})
    >>> r["authors_over"]["preselected"], r["best_mode"], r["cond_ppl_over_sampling"], r["test_stage_today_over_best"]
    (3.75, 'preselected', 0.75, 1.5714285714285714)
    """
    result = {"ratio_to_mixed": {m: seconds["mixed"] / s for m, s in seconds.items()} if "mixed" in seconds else {},
              "authors_over": {m: seconds["authors"] / s for m, s in seconds.items() if m != "authors"}
              if "authors" in seconds else {}}
    result["best_mode"] = min((m for m in seconds if m != "authors"), key=seconds.__getitem__)
    if scoring is not None:
        result["ratio_cond_ppl_shared"] = scoring["unshared"] / scoring["shared"]
        result["test_stage_seconds"] = {scorer: seconds["shared"] + s for scorer, s in scoring.items()}
        result["ratio_test_stage"] = result["test_stage_seconds"]["unshared"] / result["test_stage_seconds"]["shared"]
        result["cond_ppl_over_sampling"] = scoring["shared"] / seconds[result["best_mode"]]
        if "preselected" in seconds:
            result["test_stage_today_over_best"] = (seconds["shared"] + scoring["unshared"]) / (
                seconds["preselected"] + scoring["shared"])
    return result


def print_ratios(report: dict) -> None:
    model, seconds, scoring = report["model"], report["seconds"], report["cond_ppl_seconds"]
    for mode, ratio in report["ratio_to_mixed"].items():
        print(f"ratio {model} {mode} {ratio:.2f}  ({report['tokens_per_s'][mode]:.1f} tok/s)")
    if "preselected" in seconds:
        print(f"ratio {model} preselect_top_k {seconds['shared'] / seconds['preselected']:.2f}  "
              f"(k={report['preselect_top_k']}: {seconds['shared']:.2f} s shared, "
              f"{seconds['preselected']:.2f} s preselected)")
    for mode, ratio in report["authors_over"].items():
        print(f"ratio {model} authors_over_{mode} {ratio:.2f}  ({seconds['authors']:.2f} s authors, "
              f"{seconds[mode]:.2f} s {mode})")
    if scoring is None:
        return
    print(f"ratio {model} cond_ppl_shared {report['ratio_cond_ppl_shared']:.2f}  "
          f"({scoring['unshared']:.2f} s unshared, {scoring['shared']:.2f} s shared)")
    print(f"ratio {model} test_stage {report['ratio_test_stage']:.2f}  "
          f"({report['test_stage_seconds']['unshared']:.2f} s unshared, "
          f"{report['test_stage_seconds']['shared']:.2f} s shared)")
    best = report["best_mode"]
    print(f"ratio {model} cond_ppl_over_sampling {report['cond_ppl_over_sampling']:.2f}  "
          f"({scoring['shared']:.2f} s shared scoring, {seconds[best]:.2f} s {best} sampling)")
    if "test_stage_today_over_best" in report:
        print(f"ratio {model} test_stage_today_over_best {report['test_stage_today_over_best']:.2f}  "
              f"({seconds['shared'] + scoring['unshared']:.2f} s shared + unshared, "
              f"{seconds['preselected'] + scoring['shared']:.2f} s preselected + shared)")


def main():
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.random_init:
        prompts = synthetic_texts(args.num_prompts, *SYNTHETIC_PROMPT_WORDS, seed=1)
    else:
        prompts = [p.text for p in load_prompts(PromptsConfig(split="test", num_prompts=args.num_prompts,
                                                              data_dir=args.data_dir))]
    reports = []
    for name in [n for group in args.models for n in group.split(",") if n]:
        model, tokenizer = benchmark_model(name, args.random_init, args.override, getattr(torch, args.dtype),
                                           args.device)
        reference = (model, tokenizer) if args.reference is None or args.no_scoring else benchmark_model(
            args.reference, args.random_init, args.override, getattr(torch, args.dtype), args.device)
        sample(args, "shared", 0, prompts[:2], model, tokenizer)  # warm-up (allocator, kernels)
        padding = padding_tokens(args, tokenizer, prompts)
        measured = measure(args, name, prompts, model, tokenizer, reference)
        reports.append({
            "model": name, "random_init": args.random_init, "config_overrides": args.override,
            "num_prompts": len(prompts), "num_samples": args.num_samples,
            "max_new_tokens": args.max_new_tokens, "top_p": args.top_p, "batch_size": args.batch_size,
            "preselect_top_k": args.preselect_top_k if "preselected" in args.modes else None,
            "device": args.device, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
            "repeats": args.repeats, "padding_tokens": {m: padding[m] for m in args.modes},
            "reference": None if args.no_scoring else args.reference or name, "ppl_batch_size": args.ppl_batch_size,
            **measured, **ratios(measured["seconds"], measured["cond_ppl_seconds"]),
        })
        del model, reference
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(reports, fh, indent=2)
    print(json.dumps(reports, indent=2))
    for report in reports:
        print_ratios(report)


if __name__ == "__main__":
    main()

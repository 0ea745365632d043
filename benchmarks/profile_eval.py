"""Where one evaluation test stage's time goes on a CPU: decode steps split by part, prefill, conditional perplexity.

    # the default: smollm2-135m and gemma3-270m, 16 ToxiGen test prompts x 8 samples x 20 tokens, threads 1 and 2
    python benchmarks/profile_eval.py --out /tmp/profile_eval.json
    python benchmarks/profile_eval.py --models smollm2-135m --threads 1 --repeats 1 --out /tmp/p.json
    python benchmarks/profile_eval.py --candidates --out /tmp/p.json  # also time two candidates (microbenchmarks)

Sampling runs :func:`unidetox.decoding.protocol.generate_samples` as the protocol does (shared prefill,
``FastTopPLogitsWarper``). Forward hooks with ``time.perf_counter`` time the model's parts, so each part is wall
time on the host (on a CPU that is the compute; this profile is not meant for CUDA, whose kernels run
asynchronously):

- ``attention``: every layer's ``self_attn`` (``attention_projections``: its q/k/v/o linears, a part of it;
  the rest is RoPE, q/k norms, the KV-cache update and the attention kernel);
- ``mlp``, ``lm_head``; ``norms``: the layers' and the final RMSNorms; ``embeddings``: ``embed_tokens``;
- ``model_other``: the rest of the model's forward (masks, rotary tables, residual adds, output wrapping);
- ``sampling``: the logits warpers (temperature, top-p), and ``softmax`` + ``multinomial`` of ``generate``;
- ``generate_overhead``: the rest of ``generate``'s wall time (Python, the logits copy, stopping criteria, input
  preparation, cache bookkeeping).

A decode step is one ``forward`` inside ``generate`` (the first runs each row's last prompt token on the shared
cache); ``prefill`` is the shared prompts' forward before ``generate``, ``outside_generate`` the rest of
``generate_samples`` (tokenizing, cutting and decoding the continuations). Hooks cost time of their own: each
model is also timed once without them (``total_s_no_hooks``, seed 0) to show it.

The conditional perplexity scores the samples under ``--reference`` (default gemma3-270m) with
:func:`unidetox.evaluation.likelihood.conditional_nll` (shared prompt KV cache), split into ``encode`` (tokenizing),
``prompt_pass`` (the distinct prompts' decoder forward), ``continuation_pass`` (the rows' decoder forward on the
copied cache), ``lm_head`` (the head's matmul) and ``nll`` (the head's post-processing and log-sum-exp), and the
remainder.

Every figure is the median over ``--repeats``; shares are of a decode step (or of the scoring) in percent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections import defaultdict

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import unidetox.decoding.protocol as sampling_module
import unidetox.evaluation.likelihood as likelihood_module
from unidetox import load_model_and_tokenizer
from unidetox.decoding.protocol import ToxicityEvalConfig, generate_samples, group_by_prompt
from unidetox.decoding.warpers import FastTopPLogitsWarper
from unidetox.evaluation.config import PerplexityConfig
from unidetox.evaluation.prompts import PromptsConfig, load_prompts

STEP_PARTS = ("attention", "mlp", "lm_head", "norms", "embeddings", "model_other", "sampling", "generate_overhead")
NORM_NAMES = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class Clock:
    """Seconds per part, accumulated by hooks; ``phase`` says where the model's forward is called from."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.phase = "prefill"
        self.in_forward = False

    def add(self, part: str, seconds: float) -> None:
        self.seconds[f"{self.phase}/{part}"] += seconds
        self.counts[f"{self.phase}/{part}"] += 1


def timed_module(module, clock: Clock, part: str, on_enter=None, on_exit=None):
    """Pre/post forward hooks adding the module's wall time to ``part``; returns the handles."""
    starts = []

    def pre(_module, _args):
        if on_enter is not None:
            on_enter()
        starts.append(time.perf_counter())

    def post(_module, _args, _output):
        clock.add(part, time.perf_counter() - starts.pop())
        if on_exit is not None:
            on_exit()

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def attach_model_hooks(model, clock: Clock):
    """Hooks on the parts of a decoder-only transformers model (llama / gemma3 layout); returns the handles."""
    decoder = model.base_model
    handles = []

    def enter():
        clock.in_forward = True

    def leave():
        clock.in_forward = False

    handles += timed_module(model, clock, "forward", on_enter=enter, on_exit=leave)
    handles += timed_module(decoder.embed_tokens, clock, "embeddings")
    handles += timed_module(decoder.norm, clock, "norms")
    handles += timed_module(model.get_output_embeddings(), clock, "lm_head")
    for layer in decoder.layers:
        handles += timed_module(layer.self_attn, clock, "attention")
        handles += timed_module(layer.mlp, clock, "mlp")
        for name in PROJECTIONS:
            handles += timed_module(getattr(layer.self_attn, name), clock, "attention_projections")
        for name in NORM_NAMES:
            if hasattr(layer, name):
                handles += timed_module(getattr(layer, name), clock, "norms")
    return handles


class TimedProcessor(LogitsProcessor):
    """A logits processor that adds its wrapped processor's wall time to ``sampling_warpers``."""

    def __init__(self, inner: LogitsProcessor, clock: Clock):
        self.inner, self.clock = inner, clock

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        out = self.inner(input_ids, scores)
        self.clock.add("sampling_warpers", time.perf_counter() - start)
        return out


@contextlib.contextmanager
def timed_sampling(model, clock: Clock):
    """Times the warpers, ``softmax`` and ``multinomial`` outside the model's forward, and ``generate`` itself."""
    originals = (sampling_module.sampling_warpers, torch.nn.functional.softmax, torch.multinomial)
    warpers, softmax, multinomial = originals

    def timed_warpers(top_p, temperature):
        return LogitsProcessorList([TimedProcessor(w, clock) for w in warpers(top_p, temperature)])

    def timed(function, part):
        def wrapper(*args, **kwargs):
            if clock.in_forward:
                return function(*args, **kwargs)
            start = time.perf_counter()
            out = function(*args, **kwargs)
            clock.add(part, time.perf_counter() - start)
            return out
        return wrapper

    generate = model.generate

    def timed_generate(*args, **kwargs):
        clock.phase = "decode"
        start = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            clock.add("generate", time.perf_counter() - start)
            clock.phase = "prefill"

    sampling_module.sampling_warpers = timed_warpers
    torch.nn.functional.softmax = timed(softmax, "sampling_softmax")
    torch.multinomial = timed(multinomial, "sampling_multinomial")
    model.generate = timed_generate
    try:
        yield
    finally:
        sampling_module.sampling_warpers, torch.nn.functional.softmax, torch.multinomial = originals
        del model.generate


def sampling_profile(model, tokenizer, prompts, args, seed: int) -> dict[str, float]:
    """One protocol sampling run under hooks: seconds per phase and per part of a decode step."""
    clock = Clock()
    handles = attach_model_hooks(model, clock)
    try:
        with timed_sampling(model, clock):
            start = time.perf_counter()
            samples = generate_samples(model, tokenizer, prompts, args.num_samples, max_new_tokens=args.max_new_tokens,
                                       top_p=args.top_p, batch_size=args.batch_size, seed=seed)
            total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    s = clock.seconds
    steps = clock.counts["decode/forward"]
    parts = {p: s[f"decode/{p}"] for p in ("attention", "attention_projections", "mlp", "lm_head", "norms", "embeddings")}
    parts["model_other"] = s["decode/forward"] - sum(parts[p] for p in ("attention", "mlp", "lm_head", "norms",
                                                                        "embeddings"))
    parts["sampling_warpers"] = s["decode/sampling_warpers"]
    parts["sampling_softmax"] = s["decode/sampling_softmax"]
    parts["sampling_multinomial"] = s["decode/sampling_multinomial"]
    parts["sampling"] = parts["sampling_warpers"] + parts["sampling_softmax"] + parts["sampling_multinomial"]
    parts["generate_overhead"] = s["decode/generate"] - s["decode/forward"] - parts["sampling"]
    return {
        "total_s": total, "prefill_s": s["prefill/forward"], "generate_s": s["decode/generate"],
        "outside_generate_s": total - s["decode/generate"] - s["prefill/forward"], "decode_steps": steps,
        "step_ms": 1e3 * s["decode/generate"] / steps, **{f"{p}_ms": 1e3 * v / steps for p, v in parts.items()},
        "_samples": samples,
    }


def conditional_profile(reference, tokenizer, prompts, continuations, batch_size: int) -> dict[str, float]:
    """``conditional_nll`` of the samples under hooks: seconds of encoding, the two decoder passes and the head."""
    clock = Clock()
    clock.phase = "ppl"
    decoder, head = reference.base_model, reference.get_output_embeddings()
    starts = []

    def pre(_module, _args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        fresh = cache is not None and cache.get_seq_length() == 0
        starts.append(("prompt_pass" if fresh else "continuation_pass", time.perf_counter()))

    def post(_module, _args, _kwargs, _output):
        part, start = starts.pop()
        clock.add(part, time.perf_counter() - start)

    handles = [decoder.register_forward_pre_hook(pre, with_kwargs=True),
               decoder.register_forward_hook(post, with_kwargs=True), *timed_module(head, clock, "lm_head")]
    originals = (likelihood_module._encode_conditional, likelihood_module._head_nll)

    def timed(function, part):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = function(*args, **kwargs)
            clock.add(part, time.perf_counter() - start)
            return out
        return wrapper

    likelihood_module._encode_conditional = timed(originals[0], "encode")
    likelihood_module._head_nll = timed(originals[1], "head_nll")
    try:
        start = time.perf_counter()
        likelihood_module.conditional_nll(reference, tokenizer, prompts, continuations, batch_size=batch_size)
        total = time.perf_counter() - start
    finally:
        likelihood_module._encode_conditional, likelihood_module._head_nll = originals
        for handle in handles:
            handle.remove()
    s = clock.seconds
    parts = {"encode": s["ppl/encode"], "prompt_pass": s["ppl/prompt_pass"],
             "continuation_pass": s["ppl/continuation_pass"], "lm_head": s["ppl/lm_head"],
             "nll": s["ppl/head_nll"] - s["ppl/lm_head"]}
    parts["other"] = total - sum(parts.values())
    return {"total_s": total, **{f"{p}_s": v for p, v in parts.items()}}


def plain_sampling_seconds(model, tokenizer, prompts, args, seed: int) -> float:
    start = time.perf_counter()
    generate_samples(model, tokenizer, prompts, args.num_samples, max_new_tokens=args.max_new_tokens,
                     top_p=args.top_p, batch_size=args.batch_size, seed=seed)
    return time.perf_counter() - start


def medians(runs: list[dict]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0] if not key.startswith("_")}


def median_ms(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def candidate_microbenchmarks(model, rows: int, top_p: float, repeats: int) -> dict[str, float]:
    """Milliseconds of two candidate changes on this CPU, for ``rows`` rows of the model's vocabulary:
    the LM head's matmul in float32 vs bfloat16, and a step's token draw over the whole vocabulary (softmax +
    multinomial, as ``generate`` does) vs over the 256 most likely tokens (top-k, softmax, multinomial, gather)."""
    weight = model.get_output_embeddings().weight.detach()
    hidden = torch.randn(rows, weight.shape[1])
    weight_bf16, hidden_bf16 = weight.bfloat16(), hidden.bfloat16()
    scores = FastTopPLogitsWarper(top_p)(None, torch.nn.functional.linear(hidden, weight) * 3)

    def top_k_draw():
        top_scores, top_indices = scores.topk(256, dim=-1)
        return top_indices.gather(1, torch.multinomial(top_scores.softmax(-1), 1))

    return {
        "lm_head_float32_ms": median_ms(lambda: torch.nn.functional.linear(hidden, weight), repeats),
        "lm_head_bfloat16_ms": median_ms(lambda: torch.nn.functional.linear(hidden_bf16, weight_bf16), repeats),
        "draw_full_vocab_ms": median_ms(lambda: torch.multinomial(scores.softmax(-1), 1), repeats),
        "draw_top256_ms": median_ms(top_k_draw, repeats),
    }


def print_step_table(rows: list[dict]) -> None:
    parts = [*STEP_PARTS[:1], "attention_projections", *STEP_PARTS[1:6], "sampling_warpers",
             "sampling_softmax", "sampling_multinomial", *STEP_PARTS[6:]]
    header = f"{'model':14s} {'thr':>3s} {'step ms':>8s} " + " ".join(f"{p.removeprefix('sampling_')[:13]:>13s}" for p in parts)
    print("\nper decode step: ms (share of the step, %)")
    print(header)
    for row in rows:
        s = row["sampling"]
        cells = " ".join(f"{s[p + '_ms']:5.0f} ({100 * s[p + '_ms'] / s['step_ms']:4.1f})" for p in parts)
        print(f"{row['model']:14s} {row['threads']:3d} {s['step_ms']:8.1f} {cells}")
    print("\nphases: seconds of one sampling run (median)")
    print(f"{'model':14s} {'thr':>3s} {'total':>7s} {'no hooks':>8s} {'prefill':>7s} {'generate':>8s} {'outside':>7s} "
          f"{'steps':>5s}")
    for row in rows:
        s = row["sampling"]
        print(f"{row['model']:14s} {row['threads']:3d} {s['total_s']:7.2f} {row['total_s_no_hooks']:8.2f} "
              f"{s['prefill_s']:7.2f} {s['generate_s']:8.2f} {s['outside_generate_s']:7.2f} {s['decode_steps']:5.0f}")
    print("\nconditional perplexity under the reference: seconds (share, %)")
    keys = ("encode", "prompt_pass", "continuation_pass", "lm_head", "nll", "other")
    print(f"{'samples of':14s} {'thr':>3s} {'total':>6s} " + " ".join(f"{k:>17s}" for k in keys)
          + f" {'ppl share of stage':>18s}")
    for row in rows:
        c = row["conditional_ppl"]
        cells = " ".join(f"{c[k + '_s']:8.2f} ({100 * c[k + '_s'] / c['total_s']:4.1f})" for k in keys)
        stage = 100 * c["total_s"] / (c["total_s"] + row["sampling"]["total_s"])
        print(f"{row['model']:14s} {row['threads']:3d} {c['total_s']:6.2f} {cells} {stage:17.1f}%")


def profile_model(name, reference, prompts, args) -> list[dict]:
    model, tokenizer = load_model_and_tokenizer(name)
    model.eval()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        plain_sampling_seconds(model, tokenizer, prompts[:2], args, seed=0)  # warm-up (allocator, first calls)
        runs, plain, scoring = [], [], []
        plain.append(plain_sampling_seconds(model, tokenizer, prompts, args, seed=0))
        for repeat in range(args.repeats):
            run = sampling_profile(model, tokenizer, prompts, args, seed=repeat)
            runs.append(run)
            continuations = group_by_prompt(run["_samples"], len(prompts), args.num_samples)
            with torch.no_grad():
                scoring.append(conditional_profile(*reference, prompts, continuations, args.ppl_batch_size))
            print(f"{name} threads={threads} repeat {repeat}: sampling {run['total_s']:.2f} s (no hooks, seed 0: "
                  f"{plain[0]:.2f} s), step {run['step_ms']:.1f} ms, cond ppl {scoring[-1]['total_s']:.2f} s",
                  flush=True)
        row = {"model": name, "threads": threads, "sampling": medians(runs),
               "total_s_no_hooks": plain[0], "conditional_ppl": medians(scoring)}
        if args.candidates:
            row["candidates"] = candidate_microbenchmarks(model, args.batch_size, args.top_p, 3 * args.repeats)
            print(f"{name} threads={threads} candidates ({args.batch_size} rows): {row['candidates']}", flush=True)
        rows.append(row)
    return rows


def write_report(args, rows: list[dict]) -> None:
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "processor": platform.processor() or platform.machine(), "load_average": os.getloadavg(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows,
    }
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)


def main():
    protocol = ToxicityEvalConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--reference", default=PerplexityConfig.reference_model or "gemma3-270m",
                        help="reference LM of the conditional perplexity")
    parser.add_argument("--num-prompts", type=int, default=16, help="ToxiGen test prompts")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=protocol.max_new_tokens)
    parser.add_argument("--top-p", type=float, default=protocol.top_p)
    parser.add_argument("--batch-size", type=int, default=protocol.batch_size)
    parser.add_argument("--ppl-batch-size", type=int, default=PerplexityConfig.batch_size)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--candidates", action="store_true", help="also time two candidates on this CPU: the LM "
                        "head in bfloat16, and the token draw over the top 256 tokens instead of the vocabulary")
    parser.add_argument("--data-dir", default=None, help="shared data folder (default: $UNIDETOX_DATA_DIR)")
    parser.add_argument("--out", required=True, help="write the numbers as JSON to this file")
    args = parser.parse_args()
    prompts = [p.text for p in load_prompts(PromptsConfig(split="test", num_prompts=args.num_prompts,
                                                          data_dir=args.data_dir))]
    reference = load_model_and_tokenizer(args.reference)
    reference[0].eval()
    rows = []
    for name in [n for group in args.models for n in group.split(",") if n]:
        rows += profile_model(name, reference, prompts, args)
        write_report(args, rows)  # what is done so far survives a run cut short
    print_step_table(rows)
    print(f"\nload average at the end: {os.getloadavg()}; JSON written to {args.out}")


if __name__ == "__main__":
    main()

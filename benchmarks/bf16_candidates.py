"""Two bfloat16 candidates for the evaluation's speed, measured against float32 on the embedded models.

    OMP_NUM_THREADS=1 python benchmarks/bf16_candidates.py --models smollm2-135m gemma3-270m --threads 1 \\
        --data-dir /work/shared/data --json /tmp/bf16_candidates.json

1. The whole model in bfloat16 for the sampling. Speed: the protocol's ``shared`` sampling of ``--num-prompts``
   ToxiGen test prompts x ``--num-samples`` (top-p 0.9, 20 new tokens) in float32 and in bfloat16, interleaved
   over ``--repeats``, medians; ``identical_samples`` is the share of bfloat16 samples equal to the float32 ones
   drawn with the same seed. Distribution: the float32 samples' prompts + continuations are run through both
   models (teacher forcing) and, at every position that predicts a continuation token, the next-token
   distributions are compared in float64: total variation and KL(float32 || bfloat16) of the full softmax, total
   variation of the top-p nuclei (the distributions actually sampled, :class:`FastTopPLogitsWarper`), and the share
   of positions whose most likely token or nucleus differs. ``float32_floor`` is the same total variation between
   float32 run batched and float32 run one row at a time (the rounding every float32 layout already differs by).
2. The LM head alone in bfloat16 for the conditional perplexity: each model scores its own float32 samples
   (:func:`conditional_nll`, prompts shared) with its float32 head and with a bfloat16 copy of it (the hidden states
   cast to bfloat16, the logits back to float32), interleaved; the largest relative difference of a sample's NLL,
   the relative difference of the conditional perplexity, and both timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from random_models import benchmark_model

from unidetox.decoding.protocol import ToxicityEvalConfig, generate_samples, group_by_prompt
from unidetox.decoding.warpers import FastTopPLogitsWarper
from unidetox.evaluation.config import PerplexityConfig
from unidetox.evaluation.likelihood import aggregate_conditional_perplexity, conditional_nll
from unidetox.evaluation.prompts import PromptsConfig, load_prompts


class Bfloat16Head(torch.nn.Module):
    """A bfloat16 copy of a linear LM head that takes and returns float32 (the candidate, not the library's)."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.out_features = head.out_features
        self.weight = torch.nn.Parameter(head.weight.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, hidden):
        return torch.nn.functional.linear(hidden.to(torch.bfloat16), self.weight).float()


def teacher_forced_rows(tokenizer, prompts, samples):
    """``(ids, first)`` per sample: its prompt's ids + its continuation's tokens (up to EOS), and the index of the
    first continuation token."""
    rows = []
    for sample in samples:
        prompt_ids = tokenizer(prompts[sample.prompt_index]).input_ids
        rows.append((prompt_ids + sample.token_ids[: sample.num_tokens], len(prompt_ids)))
    return [(ids, first) for ids, first in rows if len(ids) > first]


@torch.no_grad()
def next_token_logits(model, batch, pad_id):
    """Float64 logits at every position of ``batch``'s rows that predicts a continuation token (rows left-padded)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r, _ in batch])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r, _ in batch])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return torch.cat([logits[row, width - len(r) + first - 1 : width - 1].double()
                      for row, (r, first) in enumerate(batch)])


def compare_distributions(reference, candidate, top_p) -> dict[str, torch.Tensor]:
    """Per position: total variation and KL(reference || candidate) of the full next-token distributions, TV of
    their top-p nuclei, and whether the most likely token or the nucleus differs."""
    log_p, log_q = reference.log_softmax(-1), candidate.log_softmax(-1)
    warper = FastTopPLogitsWarper(top_p)
    nucleus_p = warper(None, reference.float()).double().softmax(-1)
    nucleus_q = warper(None, candidate.float()).double().softmax(-1)
    return {
        "tv": 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1),
        "kl": (log_p.exp() * (log_p - log_q)).sum(-1),
        "nucleus_tv": 0.5 * (nucleus_p - nucleus_q).abs().sum(-1),
        "argmax_differs": (reference.argmax(-1) != candidate.argmax(-1)).double(),
        "nucleus_differs": ((nucleus_p > 0) != (nucleus_q > 0)).any(-1).double(),
    }


def summarize(per_position: list[dict[str, torch.Tensor]]) -> dict:
    stats = {key: torch.cat([p[key] for p in per_position]) for key in per_position[0]}
    return {"positions": len(stats["tv"]), "mean_tv": stats["tv"].mean().item(), "max_tv": stats["tv"].max().item(),
            "mean_kl": stats["kl"].mean().item(), "mean_nucleus_tv": stats["nucleus_tv"].mean().item(),
            "max_nucleus_tv": stats["nucleus_tv"].max().item(),
            "argmax_differs": stats["argmax_differs"].mean().item(),
            "nucleus_differs": stats["nucleus_differs"].mean().item()}


def distribution_candidate(args, models, pad_id, rows) -> tuple[dict, dict]:
    """bfloat16 against float32 over ``rows``, batch by batch; and the float32 floor over the first rows."""
    top_p, batches = ToxicityEvalConfig().top_p, range(0, len(rows), args.forward_batch_size)
    bf16 = [compare_distributions(*(next_token_logits(models[dtype], rows[i : i + args.forward_batch_size], pad_id)
                                    for dtype in ("float32", "bfloat16")), top_p) for i in batches]
    floor_rows = rows[: args.floor_rows]
    batched = next_token_logits(models["float32"], floor_rows, pad_id)
    one_by_one = torch.cat([next_token_logits(models["float32"], [row], pad_id) for row in floor_rows])
    return summarize(bf16), summarize([compare_distributions(batched, one_by_one, top_p)])


def time_sampling(args, models, tokenizer, prompts) -> dict:
    """Median seconds of the shared sampling per dtype (interleaved), and the share of identical samples."""
    seconds, identical = {dtype: [] for dtype in models}, []
    for repeat in range(args.repeats):
        drawn = {}
        for dtype, model in models.items():
            start = time.perf_counter()
            drawn[dtype] = generate_samples(model, tokenizer, prompts, args.num_samples, seed=repeat)
            seconds[dtype].append(time.perf_counter() - start)
            print(f"sampling {dtype} repeat {repeat}: {seconds[dtype][-1]:.2f} s", flush=True)
        same = [a.token_ids == b.token_ids for a, b in zip(drawn["float32"], drawn["bfloat16"], strict=True)]
        identical.append(sum(same) / len(same))
    median = {dtype: statistics.median(v) for dtype, v in seconds.items()}
    return {"seconds": median, "speedup": median["float32"] / median["bfloat16"], "identical_samples": identical}


def head_candidate(args, model, tokenizer, prompts, samples) -> dict:
    """The conditional perplexity with the float32 head and with a bfloat16 head: differences and timings."""
    continuations = group_by_prompt(samples, len(prompts), args.num_samples)
    heads = {"float32": model.lm_head, "bfloat16": Bfloat16Head(model.lm_head)}
    seconds, nll = {dtype: [] for dtype in heads}, {}
    for repeat in range(args.repeats):
        for dtype in heads if repeat % 2 == 0 else reversed(heads):
            model.lm_head = heads[dtype]
            start = time.perf_counter()
            nll[dtype] = conditional_nll(model, tokenizer, prompts, continuations, batch_size=args.ppl_batch_size)
            seconds[dtype].append(time.perf_counter() - start)
            print(f"scoring {dtype} head repeat {repeat}: {seconds[dtype][-1]:.2f} s", flush=True)
    model.lm_head = heads["float32"]
    pairs = [(b, a) for (b, n), (a, _) in zip(nll["bfloat16"], nll["float32"], strict=True) if n]
    ppl = {dtype: aggregate_conditional_perplexity(v, max_perplexity=float("inf")) for dtype, v in nll.items()}
    median = {dtype: statistics.median(v) for dtype, v in seconds.items()}
    return {
        "seconds": median, "speedup": median["float32"] / median["bfloat16"],
        "max_rel_nll_diff": max(abs(b - a) / abs(a) for b, a in pairs),
        "mean_rel_nll_diff": statistics.fmean(abs(b - a) / abs(a) for b, a in pairs),
        "perplexity": ppl, "rel_perplexity_diff": abs(ppl["bfloat16"] - ppl["float32"]) / ppl["float32"],
    }


def measure(args, name, prompts) -> dict:
    model, tokenizer = benchmark_model(name, False, [], torch.float32, "cpu")
    models = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    generate_samples(model, tokenizer, prompts[:2], args.num_samples)  # warm-up (allocator)
    sampling = time_sampling(args, models, tokenizer, prompts)
    samples = generate_samples(model, tokenizer, prompts, args.num_samples, seed=0)
    rows = teacher_forced_rows(tokenizer, prompts, samples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    distribution, floor = distribution_candidate(args, models, pad_id, rows)
    del models["bfloat16"]
    return {"model": name, "num_prompts": len(prompts), "num_samples": args.num_samples,
            "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "sampling": sampling,
            "distribution": distribution, "float32_floor": floor,
            "head": head_candidate(args, model, tokenizer, prompts, samples)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--num-prompts", type=int, default=8, help="ToxiGen test prompts")
    parser.add_argument("--num-samples", type=int, default=8, help="continuations per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forward-batch-size", type=int, default=8, help="rows per teacher-forced forward")
    parser.add_argument("--floor-rows", type=int, default=8, help="rows also run one at a time in float32")
    parser.add_argument("--ppl-batch-size", type=int, default=PerplexityConfig.batch_size)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--data-dir", default=None, help="shared data folder (default: $UNIDETOX_DATA_DIR)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    prompts = [p.text for p in load_prompts(PromptsConfig(split="test", num_prompts=args.num_prompts,
                                                          data_dir=args.data_dir))]
    reports = [measure(args, name, prompts) for name in args.models]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(reports, fh, indent=2)
    print(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()

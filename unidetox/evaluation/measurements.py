"""One function per measurement of the evaluate stage, each writing its part of an :class:`EvaluationPlan`.

Every measurement runs on every process over its shard, gathers the results once, and the main process writes
the part (with the fingerprint of its settings); the processes then wait for each other. The toxicity protocol
samples with :mod:`unidetox.decoding.protocol`; the perplexities are :mod:`unidetox.evaluation.likelihood`'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unidetox.decoding.logits_process import ContrastiveDetoxSampler
from unidetox.decoding.protocol import GeneratedSample, generate_samples, group_by_prompt
from unidetox.evaluation.capabilities import lm_eval_version, run_lm_eval
from unidetox.evaluation.likelihood import (
    aggregate_conditional_perplexity,
    conditional_nll,
    sliding_window_nll,
)
from unidetox.evaluation.mmlu import MMLUQuestion, score_mmlu_questions, summarize_mmlu
from unidetox.evaluation.plan import Entry, EvaluationPlan
from unidetox.evaluation.report import read_jsonl, write_json, write_jsonl
from unidetox.evaluation.rescore import score_continuations, scorer_key
from unidetox.evaluation.scoring import ScorerConfig, ToxicityScorer, build_scorer
from unidetox.files import read_json
from unidetox.fingerprints import settings_digest
from unidetox.processes import gather_objects, wait_for_everyone


# ---- toxicity: sampling and scoring ----------------------------------------------------------------------------
def measure_toxicity(plan: EvaluationPlan, entry: Entry, seed: int, model, tokenizer, scorer: ToxicityScorer,
                     anti_expert=None) -> None:
    """Sample ``entry``'s continuations for ``seed`` (this process's share of the prompts), score them, and write
    the generations part (``seed<seed>.jsonl`` and its ``.json`` record)."""
    config, procs = plan.args.eval, plan.procs
    factory = None
    if entry.contrastive:
        decoding = plan.args.decoding

        def factory(mask, anti=anti_expert):
            return ContrastiveDetoxSampler(anti, alpha=decoding.alpha, beta=decoding.beta, attention_mask=mask)
    t0 = time.perf_counter()
    samples = generate_samples(
        model, tokenizer, [p.text for p in plan.prompts], config.num_samples,
        max_new_tokens=config.max_new_tokens, top_p=config.top_p, temperature=config.temperature, seed=seed,
        batch_size=config.batch_size, sampler_factory=factory, process_index=procs.process_index,
        num_processes=procs.num_processes, progress=plan.progress(f"sampling {entry.key} (seed {seed})"),
        bucket_by_length=config.bucket_by_length, preselect_top_k=config.preselect_top_k,
    )
    t1 = time.perf_counter()
    scores = scorer([s.continuation for s in samples])
    t2 = time.perf_counter()
    gathered = gather_objects(_generation_records(plan, entry, seed, samples, scores))
    timings = gather_objects([{"generation_s": t1 - t0, "scoring_s": t2 - t1}])
    if procs.is_main_process:
        gathered.sort(key=lambda r: (r["prompt_index"], r["sample_index"]))
        group_by_prompt([_as_sample(r) for r in gathered], len(plan.prompts), config.num_samples)  # complete?
        write_jsonl(gathered, plan.generations_path(entry, seed))
        write_json({
            "fingerprint": plan.generation_fingerprint(entry, seed), "model": entry.key,
            "name_or_path": entry.name_or_path, "seed": seed, "contrastive": entry.contrastive,
            "generation_s": max(t["generation_s"] for t in timings),
            "scoring_s": max(t["scoring_s"] for t in timings),
            "generated_tokens": sum(r["num_tokens"] for r in gathered),
            "num_processes": procs.num_processes,
        }, plan.generations_meta_path(entry, seed))
    wait_for_everyone()


def _generation_records(plan: EvaluationPlan, entry: Entry, seed: int, samples: Sequence[GeneratedSample],
                        scores: Sequence[float]) -> list[dict]:
    prompts = plan.prompts
    return [
        {"model": entry.key, "seed": seed, "prompt_index": s.prompt_index, "prompt_id": prompts[s.prompt_index].id,
         "prompt": prompts[s.prompt_index].text, "category": prompts[s.prompt_index].category,
         "group": prompts[s.prompt_index].group, "sample_index": s.sample_index,
         "continuation": s.continuation, "toxicity": score, "num_tokens": s.num_tokens}
        for s, score in zip(samples, scores, strict=True)
    ]


def _as_sample(record: dict) -> GeneratedSample:
    return GeneratedSample(record["prompt_index"], record["sample_index"], record["continuation"], [],
                           record["num_tokens"], -1)


# ---- fluency: WikiText-2 and conditional perplexity ------------------------------------------------------------
def measure_wikitext(plan: EvaluationPlan, name: str, model, tokenizer) -> None:
    """WikiText-2 test perplexity of model ``name`` (sliding windows shared out over the processes)."""
    config, procs = plan.args.perplexity, plan.procs
    text = plan.wikitext_path.read_text(encoding="utf-8").replace("\r\n", "\n")
    t0 = time.perf_counter()
    nll, count = sliding_window_nll(
        model, tokenizer, [text], max_length=config.max_length, stride=config.stride,
        batch_size=config.wikitext_batch_size, max_tokens=config.max_tokens, process_index=procs.process_index,
        num_processes=procs.num_processes, progress=plan.progress(f"WikiText ppl {plan.plain_entry(name).key}"),
    )
    sums = gather_objects([(nll, count, time.perf_counter() - t0)])
    if procs.is_main_process:
        total_nll, total_count = sum(s[0] for s in sums), sum(s[1] for s in sums)
        write_json({"fingerprint": plan.wikitext_fingerprint(name), "perplexity": math.exp(total_nll / total_count),
                    "nll": total_nll, "num_tokens": total_count, "seconds": max(s[2] for s in sums),
                    **plan.wikitext_settings}, plan.model_part_path(name, "wikitext"))
    wait_for_everyone()


def measure_conditional_perplexity(plan: EvaluationPlan, entry: Entry, seed: int, reference, tokenizer) -> None:
    """Perplexity of ``entry``'s stored continuations for ``seed`` given their prompts, under the reference LM."""
    config, procs = plan.args.perplexity, plan.procs
    records = read_jsonl(plan.generations_path(entry, seed))
    mine = plan.prompt_shard(records)
    t0 = time.perf_counter()
    per_sample = conditional_nll(
        reference, tokenizer, [records[i]["prompt"] for i in mine], [records[i]["continuation"] for i in mine],
        batch_size=config.batch_size, progress=plan.progress(f"conditional ppl {entry.key} (seed {seed})"),
    )
    gathered = gather_objects([(i, nll, n) for i, (nll, n) in zip(mine, per_sample, strict=True)])
    seconds = max(gather_objects([time.perf_counter() - t0]))
    if procs.is_main_process:
        gathered.sort()
        pairs = [(nll, n) for _, nll, n in gathered]
        write_json({
            "fingerprint": plan.conditional_fingerprint(entry, seed), "reference_model": config.reference_model,
            "seconds": seconds,
            "conditional_perplexity": aggregate_conditional_perplexity(pairs, "mean", config.max_perplexity),
            "conditional_perplexity_token": aggregate_conditional_perplexity(pairs, "token"),
            "max_perplexity": config.max_perplexity,
            "per_sample_nll": [nll for nll, _ in pairs], "per_sample_tokens": [n for _, n in pairs],
        }, plan.conditional_path(entry, seed))
    wait_for_everyone()


# ---- capabilities: MMLU and lm-eval ----------------------------------------------------------------------------
def measure_mmlu(plan: EvaluationPlan, name: str, model, tokenizer,
                 mmlu_data: tuple[list[MMLUQuestion], dict]) -> None:
    """The paper's k-shot MMLU accuracy of model ``name`` (questions shared out over the processes)."""
    config, procs = plan.args.mmlu, plan.procs
    questions, dev = mmlu_data
    t0 = time.perf_counter()
    records = score_mmlu_questions(model, tokenizer, questions, dev, config, procs.process_index,
                                   procs.num_processes, progress=plan.args.progress and procs.is_main_process)
    gathered = gather_objects(records)
    seconds = max(gather_objects([time.perf_counter() - t0]))
    if procs.is_main_process:
        gathered.sort(key=lambda r: r["index"])
        write_json({"fingerprint": plan.mmlu_fingerprint(name), **summarize_mmlu(gathered), "seconds": seconds,
                    "config": dict(config.__dict__), "records": gathered}, plan.model_part_path(name, "mmlu"))
    wait_for_everyone()


def measure_capabilities(plan: EvaluationPlan, name: str, model, tokenizer) -> None:
    """lm-eval's capability tasks on model ``name``; lm-eval runs its tasks in one process (the main one)."""
    if plan.is_main_process:
        t0 = time.perf_counter()
        numbers = run_lm_eval(model, tokenizer, plan.args.capabilities, plan.args.data_dir)
        write_json({"fingerprint": plan.capabilities_fingerprint(name), "results": numbers,
                    "lm_eval": lm_eval_version(), "seconds": time.perf_counter() - t0},
                   plan.model_part_path(name, "capabilities"))
    wait_for_everyone()


# ---- additional scorers of the stored continuations -----------------------------------------------------------
@dataclass
class AlsoScorer:
    config: ScorerConfig
    scorer: ToxicityScorer


def build_also_scorers(primary: ScorerConfig, configs: Sequence[ScorerConfig]) -> dict[str, AlsoScorer]:
    """``{scorer key: scorer}`` of the additional scorers, built now so an unavailable one fails before any model
    is loaded; a scorer named twice, or the same as the primary one, is refused."""
    keys = [scorer_key(primary), *(scorer_key(c) for c in configs)]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"also_scorers repeats the scorer(s) {repeated} (the primary is `scorer`, "
                         f"{keys[0]!r}); list each scorer once and not the primary one.")
    return {scorer_key(c): AlsoScorer(c, build_scorer(c)) for c in configs}


def also_fingerprint(generations_fingerprint: str, config: ScorerConfig) -> str:
    """The settings of an additional scorer's part: the generations it scores and the scorer."""
    return settings_digest({"generations": generations_fingerprint, "scorer": config.to_public_dict()})


def also_scores(also: AlsoScorer, records: Sequence[dict], path: Path, generations_fingerprint: str) -> list[float]:
    """An additional scorer's score of each record, cached in ``path`` for the generations it was made for."""
    fingerprint = also_fingerprint(generations_fingerprint, also.config)
    cached = read_json(path)
    if cached and cached.get("fingerprint") == fingerprint and len(cached.get("scores") or []) == len(records):
        return cached["scores"]
    t0 = time.perf_counter()
    scores = score_continuations(also.scorer, records)
    write_json({"fingerprint": fingerprint, "scorer": also.config.to_public_dict(), "scores": scores,
                "seconds": time.perf_counter() - t0}, path)
    return scores

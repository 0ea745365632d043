"""The evaluation harness: several models x seeds on one prompt set -> one report.

:func:`run_evaluation` follows an :class:`~unidetox.evaluation.plan.EvaluationPlan`: each model is loaded once for
what it still has to measure (:mod:`unidetox.evaluation.measurements`: toxicity samples and scores per seed,
WikiText-2 perplexity, MMLU or the lm-eval capabilities), then the reference LM scores every (model, seed)'s
continuations (conditional perplexity), and the main process assembles the report from the cached parts
(:mod:`unidetox.evaluation.report`). A restarted run reuses every part made with the same settings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from unidetox.decoding.logits_process import require_shared_vocabulary, scored_vocabulary_size
from unidetox.evaluation.capabilities import lm_eval_version
from unidetox.evaluation.config import EvaluateArguments
from unidetox.evaluation.measurements import (
    AlsoScorer,
    also_scores,
    build_also_scorers,
    measure_capabilities,
    measure_conditional_perplexity,
    measure_mmlu,
    measure_toxicity,
    measure_wikitext,
)
from unidetox.evaluation.mmlu import load_mmlu
from unidetox.evaluation.plan import Entry, EvaluationPlan
from unidetox.evaluation.prompts import Prompt
from unidetox.evaluation.report import (
    read_jsonl,
    seed_toxicity_metrics,
    summarize_seeds,
    write_jsonl,
    write_report,
)
from unidetox.evaluation.rescore import seed_summary
from unidetox.evaluation.scoring import ToxicityScorer, build_scorer
from unidetox.files import read_json
from unidetox.fingerprints import settings_digest
from unidetox.models import (
    ADAPTER_CONFIG_FILE,
    TOKENIZER_FILES,
    load_adapter_model,
    load_model_and_tokenizer,
    load_tokenizer,
    parse_dtype,
    read_adapter_config,
)
from unidetox.processes import wait_for_everyone
from unidetox.secret_masking import mask_secrets


def run_evaluation(args: EvaluateArguments, prompts: Sequence[Prompt]) -> dict | None:
    """Evaluate ``args.models`` on ``prompts`` for every seed; write the report files to ``args.output_dir``.

    Work is cached under ``args.parts_dir/<model>/`` (default ``output_dir/parts``; runs that share a
    ``parts_dir``, e.g. one per model, then one over all of them, reuse each other's parts): generations +
    scores per (model, seed), conditional perplexity per (model, seed), WikiText perplexity and MMLU (or, with
    ``capabilities.backend=lm_eval``, the lm-eval capability tasks, which replace them) per model. Each part
    records a fingerprint of the settings that produced it, so an interrupted run resumes where it stopped and a
    changed setting redoes only the parts it affects. Each scorer of ``args.also_scorers`` scores every stored
    continuation too, on the main process (cached per (model, seed) part beside its generations); the report
    gives TP/EMT under each in ``models[key]["scorers"]`` and ``generations.jsonl`` their scores in
    ``also_toxicity``. Under ``accelerate launch`` every step is sharded over the processes and gathered once;
    the main process writes the files. Returns the report on the main process (``None`` on the others).
    """
    started = time.perf_counter()
    plan = EvaluationPlan(args, prompts)
    plan.make_parts_root()
    # The scorers first: an unavailable one (no weights, no key) fails before any model is loaded.
    scorer = build_scorer(args.scorer, **_scorer_options(plan))
    also_scorers = build_also_scorers(args.scorer, args.also_scorers)
    plan.require_wikitext()
    mmlu_data = load_mmlu(plan.args.mmlu, args.data_dir) if plan.args.mmlu.enabled else None
    _measure_models(plan, scorer, mmlu_data)
    _measure_conditional_perplexity(plan)
    if not plan.is_main_process:
        wait_for_everyone()
        return None
    report = _assemble_report(plan, also_scorers, started)
    write_report(report, args.output_dir)
    wait_for_everyone()
    return report


def _scorer_options(plan: EvaluationPlan) -> dict:
    if plan.args.scorer.name == "perspective" and plan.procs.num_processes > 1:
        return {"qps": plan.args.scorer.qps / plan.procs.num_processes}  # the quota is shared
    return {}


def load_model(name_or_path: str, dtype: str | None, device):
    """A model and its tokenizer by hub id, path or embedded name; a LoRA adapter folder is merged into its base."""
    kwargs = {} if dtype is None else {"dtype": parse_dtype(dtype)}
    path = Path(name_or_path).expanduser()
    if (path / ADAPTER_CONFIG_FILE).is_file():
        model = load_adapter_model(path, **kwargs)
        has_tokenizer = any((path / f).is_file() for f in TOKENIZER_FILES)
        base = read_adapter_config(path).get("base_model_name_or_path")
        tokenizer = load_tokenizer(path if has_tokenizer or not base else base)
    else:
        model, tokenizer = load_model_and_tokenizer(name_or_path, **kwargs)
    return model.to(device).eval(), tokenizer


def _measure_models(plan: EvaluationPlan, scorer: ToxicityScorer, mmlu_data) -> None:
    """Per model, loaded once: its generations and scores per seed, WikiText, MMLU, lm-eval capabilities."""
    args, device = plan.args, plan.procs.device
    anti_expert = None  # loaded for the first model that samples with it, and kept for the others
    for name in dict.fromkeys(e.name_or_path for e in plan.entries):
        work = plan.model_work(name)
        if not work:
            continue
        model, tokenizer = load_model(name, args.dtype, device)
        if any(entry.contrastive for entry, _ in work.generations):  # checked before this model samples anything
            if anti_expert is None:
                anti_expert, _ = load_model(args.decoding.anti_expert, args.dtype, device)
            require_shared_vocabulary(scored_vocabulary_size(model), scored_vocabulary_size(anti_expert),
                                      f"model {name}", f"anti-expert {args.decoding.anti_expert}")
        for entry, seed in work.generations:
            measure_toxicity(plan, entry, seed, model, tokenizer, scorer, anti_expert)
        if work.wikitext:
            measure_wikitext(plan, name, model, tokenizer)
        if work.mmlu:
            measure_mmlu(plan, name, model, tokenizer, mmlu_data)
        if work.capabilities:
            measure_capabilities(plan, name, model, tokenizer)
        del model


def _measure_conditional_perplexity(plan: EvaluationPlan) -> None:
    """The conditional perplexity of every (model, seed) under the reference LM, loaded once."""
    reference = plan.args.perplexity.reference_model
    if reference is None:
        return
    work = plan.conditional_work()
    if not work:
        return
    ref_model, ref_tokenizer = load_model(reference, plan.args.dtype, plan.procs.device)
    for entry, seed in work:
        measure_conditional_perplexity(plan, entry, seed, ref_model, ref_tokenizer)
    del ref_model


# ---- the report (main process) -----------------------------------------------------------------------------------
def _assemble_report(plan: EvaluationPlan, also_scorers: dict[str, AlsoScorer], started: float) -> dict:
    args = plan.args
    all_records, report_models = [], {}
    for entry in plan.entries:
        records, report_models[entry.key] = _entry_report(plan, entry, also_scorers)
        all_records.extend(records)
    write_jsonl(all_records, Path(args.output_dir) / "generations.jsonl")
    prompts = args.prompts
    prompts_info = {"source": prompts.source, "path": prompts.path, "split": prompts.split,
                    "split_seed": prompts.split_seed, "subset_seed": prompts.subset_seed}
    return {
        "models": report_models,
        "seeds": list(args.seeds),
        "prompts": {**prompts_info, "num_prompts": len(plan.prompts), "fingerprint": settings_digest(plan.prompt_ids),
                    "per_category": _count_categories(plan.prompts)},
        "eval": asdict(args.eval),
        "scorer": args.scorer.to_public_dict(),
        "also_scorers": {key: also.config.to_public_dict() for key, also in also_scorers.items()},
        "reference_model": args.perplexity.reference_model,
        "perplexity": asdict(args.perplexity),
        "mmlu": asdict(args.mmlu),
        "capabilities": {**asdict(args.capabilities),
                         **({"lm_eval": lm_eval_version()} if args.capabilities.backend == "lm_eval" else {})},
        "decoding": asdict(args.decoding),
        "config": mask_secrets(args.config),
        "num_processes": plan.procs.num_processes,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "wall_time_s": time.perf_counter() - started,
    }


def _entry_report(plan: EvaluationPlan, entry: Entry, also_scorers: dict[str, AlsoScorer]) -> tuple[list, dict]:
    """An entry's records (with the additional scorers' scores) and its ``report["models"]`` value."""
    args, reference = plan.args, plan.args.perplexity.reference_model
    per_seed, timing = {}, {"generation_s": 0.0, "generated_tokens": 0, "scoring_s": 0.0}
    cond_seconds, records = 0.0, []
    for seed in args.seeds:
        seed_records = _scored_records(plan, entry, seed, also_scorers)
        records.extend(seed_records)
        meta = read_json(plan.generations_meta_path(entry, seed))
        metrics = seed_toxicity_metrics(seed_records, args.eval.toxic_threshold)
        metrics.update({k: meta[k] for k in ("generation_s", "scoring_s", "generated_tokens")})
        cond = read_json(plan.conditional_path(entry, seed)) if reference else None
        if cond:
            metrics["conditional_perplexity"] = cond["conditional_perplexity"]
            metrics["conditional_perplexity_token"] = cond["conditional_perplexity_token"]
            cond_seconds += cond["seconds"]
        per_seed[str(seed)] = metrics
        for key in timing:
            timing[key] += meta[key]
    summary = summarize_seeds(per_seed)
    timing["tokens_per_s"] = timing["generated_tokens"] / timing["generation_s"] if timing["generation_s"] else None
    timing["conditional_perplexity_s"] = cond_seconds if reference else None
    decoding = args.decoding
    return records, {
        "name_or_path": entry.name_or_path,
        "decoding": ({"method": "unidetox_contrastive", "anti_expert": decoding.anti_expert,
                      "alpha": decoding.alpha, "beta": decoding.beta} if entry.contrastive else {"method": "sampling"}),
        **summary,
        **_model_parts(plan, entry, timing),
        "scorers": {key: seed_summary([{**r, "toxicity": r["also_toxicity"][key]} for r in records],
                                      args.eval.toxic_threshold) for key in also_scorers},
        "per_seed": per_seed,
        "timings": timing,
    }


def _scored_records(plan: EvaluationPlan, entry: Entry, seed: int, also_scorers: dict[str, AlsoScorer]) -> list:
    """The stored generations of (entry, seed), each with the additional scorers' scores in ``also_toxicity``."""
    records = read_jsonl(plan.generations_path(entry, seed))
    if not also_scorers:
        return records
    fingerprint = plan.generation_fingerprint(entry, seed)
    also = {key: also_scores(scorer, records, plan.also_path(entry, seed, key), fingerprint)
            for key, scorer in also_scorers.items()}
    return [{**r, "also_toxicity": {key: also[key][i] for key in also}} for i, r in enumerate(records)]


def _model_parts(plan: EvaluationPlan, entry: Entry, timing: dict) -> dict:
    """The per-model numbers (WikiText, MMLU, lm-eval capabilities) of a model with a plain entry; their seconds
    go into ``timing``."""
    args = plan.args
    has_plain = any(e.name_or_path == entry.name_or_path and not e.contrastive for e in plan.entries)
    wikitext = mmlu = capabilities = None
    if has_plain and args.perplexity.wikitext:
        part = read_json(plan.model_part_path(entry.name_or_path, "wikitext"))
        timing["wikitext_s"] = part["seconds"]
        wikitext = {k: part[k] for k in ("perplexity", "num_tokens", "max_length", "stride", "max_tokens")}
    if has_plain and args.mmlu.enabled:
        part = read_json(plan.model_part_path(entry.name_or_path, "mmlu"))
        timing["mmlu_s"] = part["seconds"]
        mmlu = {k: part[k] for k in ("accuracy", "macro_accuracy", "num_questions", "num_subjects", "per_subject")}
    if has_plain and args.capabilities.backend == "lm_eval":
        part = read_json(plan.model_part_path(entry.name_or_path, "capabilities"))
        timing["capabilities_s"] = part["seconds"]
        capabilities = part["results"]
    return {"wikitext_perplexity": wikitext, "mmlu": mmlu, "capabilities": capabilities}


def _count_categories(prompts: Sequence[Prompt]) -> dict:
    counts: dict = {}
    for p in prompts:
        counts[str(p.category)] = counts.get(str(p.category), 0) + 1
    return counts

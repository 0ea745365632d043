"""The evaluation harness: several models x seeds on one prompt set -> one report.

Each (model, seed) is sampled with the toxicity protocol (:mod:`unidetox.decoding.protocol`), scored, and saved
as a part under ``parts/``; a restarted run reuses every part made with the same settings. Fluency (conditional
and WikiText-2 perplexity), diversity and MMLU complete the report (:mod:`unidetox.evaluation.report`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from unidetox.decoding.logits_process import (
    ContrastiveDetoxSampler,
    require_shared_vocabulary,
    scored_vocabulary_size,
    validate_alpha_beta,
)
from unidetox.decoding.protocol import GeneratedSample, ToxicityEvalConfig, generate_samples, group_by_prompt
from unidetox.evaluation.capabilities import CapabilitiesConfig, lm_eval_version, run_lm_eval
from unidetox.evaluation.metrics import aggregate_conditional_perplexity, conditional_nll, sliding_window_nll
from unidetox.evaluation.mmlu import MMLUConfig, load_mmlu, score_mmlu_questions, summarize_mmlu
from unidetox.evaluation.report import (
    read_jsonl,
    seed_toxicity_metrics,
    summarize_seeds,
    write_json,
    write_jsonl,
    write_report,
)
from unidetox.evaluation.rescore import score_continuations, scorer_key, seed_summary
from unidetox.evaluation.scoring import ScorerConfig, ToxicityScorer, build_scorer
from unidetox.files import read_json
from unidetox.fingerprints import settings_digest
from unidetox.model_identity import saved_model_id
from unidetox.models import (
    ADAPTER_CONFIG_FILE,
    TOKENIZER_FILES,
    load_adapter_model,
    load_model_and_tokenizer,
    load_tokenizer,
    parse_dtype,
    read_adapter_config,
)
from unidetox.paths import default_data_dir, require_file
from unidetox.processes import gather_objects, process_state, wait_for_everyone
from unidetox.secret_masking import mask_secrets

logger = logging.getLogger(__name__)


@dataclass
class PerplexityConfig:
    """Fluency measurements: conditional perplexity under a reference LM and WikiText-2 perplexity."""

    reference_model: str | None = field(
        default="gemma3-270m",
        metadata={"help": "Reference LM for the conditional perplexity of continuations (paper: "
                  "meta-llama/Llama-2-7b-hf); hub id, path or embedded name. null disables it."},
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass for conditional perplexity."})
    max_perplexity: float = field(default=1e4, metadata={"help": "Samples at or above this are dropped (authors)."})
    wikitext: bool = field(default=True, metadata={"help": "Measure each model's WikiText-2 test perplexity."})
    wikitext_path: str | None = field(
        default=None, metadata={"help": "wiki.test.raw (default: data_dir/wikitext2/wiki.test.raw)."}
    )
    max_length: int = field(default=1024, metadata={"help": "WikiText sliding window length (capped by the model)."})
    stride: int = field(default=512, metadata={"help": "WikiText sliding window stride."})
    max_tokens: int | None = field(
        default=None, metadata={"help": "Score only the first N WikiText tokens (quick CPU runs); None = all."}
    )
    wikitext_batch_size: int = field(default=2, metadata={"help": "Windows per forward pass."})

    def __post_init__(self):
        if self.reference_model in ("", "none", "None"):
            self.reference_model = None
        if self.batch_size < 1 or self.wikitext_batch_size < 1:
            raise ValueError(f"Batch sizes have to be >= 1, got {self.batch_size} and {self.wikitext_batch_size}.")
        if not 1 <= self.stride <= self.max_length:
            raise ValueError(f"`stride` has to be in [1, max_length={self.max_length}], but is {self.stride}.")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"`max_tokens` has to be None or >= 2, but is {self.max_tokens}.")
        if not self.max_perplexity > 1:
            raise ValueError(f"`max_perplexity` has to be > 1, but is {self.max_perplexity}.")


@dataclass
class DecodingConfig:
    """Optional inference-time UniDetox: sample with a ``ContrastiveDetoxSampler`` against an anti-expert."""

    anti_expert: str | None = field(
        default=None, metadata={"help": "Toxic model sharing the evaluated models' vocabulary; enables the method."}
    )
    alpha: float = field(default=0.1, metadata={"help": "Adaptive plausibility threshold (paper: 0.1)."})
    beta: float | None = field(default=None, metadata={"help": "None: log p_base - log p_anti (paper)."})
    also_plain: bool = field(default=True, metadata={"help": "Also evaluate each model with plain sampling."})

    def __post_init__(self):
        if self.anti_expert in ("", "none", "None"):
            self.anti_expert = None
        validate_alpha_beta(self.alpha, self.beta)


@dataclass
class _Entry:
    key: str  # name in the report
    name_or_path: str
    contrastive: bool


def model_slug(key: str) -> str:
    """A file-system-safe, unique folder name for a model key."""
    import re

    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key.strip("/"))[-60:].strip("_") or "model"
    return f"{readable}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _load(name_or_path: str, dtype: str | None, device):
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


def run_evaluation(
    models: Sequence[str],
    seeds: Sequence[int],
    output_dir,
    prompts,
    eval_config: ToxicityEvalConfig | None = None,
    scorer_config=None,
    perplexity_config: PerplexityConfig | None = None,
    mmlu_config=None,
    decoding_config: DecodingConfig | None = None,
    prompts_info: dict | None = None,
    data_dir=None,
    dtype: str | None = None,
    config_dict: dict | None = None,
    progress: bool = True,
    parts_dir=None,
    capabilities_config: CapabilitiesConfig | None = None,
    also_scorer_configs: Sequence[ScorerConfig] = (),
) -> dict | None:
    """Evaluate ``models`` on ``prompts`` for every seed; write the report files to ``output_dir``.

    Work is cached under ``parts_dir/<model>/`` (default ``output_dir/parts``; runs that share a ``parts_dir``,
    e.g. one per model, then one over all of them, reuse each other's parts): generations + scores per (model, seed), conditional
    perplexity per (model, seed), WikiText perplexity and MMLU (or, with ``capabilities.backend=lm_eval``, the
    lm-eval capability tasks, which replace them) per model. Each part records a fingerprint of the
    settings that produced it, so an interrupted run resumes where it stopped and a changed setting redoes only
    the parts it affects. Each scorer of ``also_scorer_configs`` scores every stored continuation too, on the main
    process (cached per (model, seed) part beside its generations); the report gives TP/EMT under each in
    ``models[key]["scorers"]`` and ``generations.jsonl`` their scores in ``also_toxicity``. Under ``accelerate
    launch`` every step is sharded over the processes and gathered once; the main process writes the files. Returns the report on the main process (``None`` on the others).
    """
    started = time.perf_counter()
    eval_config = eval_config or ToxicityEvalConfig()
    scorer_config = scorer_config or ScorerConfig()
    perplexity_config = perplexity_config or PerplexityConfig()
    mmlu_config = mmlu_config or MMLUConfig(enabled=False)
    decoding_config = decoding_config or DecodingConfig()
    capabilities_config = capabilities_config or CapabilitiesConfig()
    if capabilities_config.backend == "lm_eval":  # lm-eval's mmlu / wikitext replace the paper's in this run
        if "mmlu" in capabilities_config.tasks:
            mmlu_config = replace(mmlu_config, enabled=False)
        if "wikitext" in capabilities_config.tasks:
            perplexity_config = replace(perplexity_config, wikitext=False)
    if not models:
        raise ValueError("No models to evaluate: pass models=[NAME_OR_PATH, ...].")
    if len(set(models)) != len(models):
        raise ValueError(f"`models` lists a model twice: {list(models)}.")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"`seeds` has to be a non-empty list of distinct integers, but is {list(seeds)}.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("No prompts to evaluate.")
    procs = process_state()
    out = Path(output_dir)
    parts_root = Path(parts_dir) if parts_dir is not None else out / "parts"
    if procs.is_main_process:
        parts_root.mkdir(parents=True, exist_ok=True)
    wait_for_everyone()

    entries: list[_Entry] = []
    for name in models:
        name = str(name)
        if decoding_config.anti_expert is None or decoding_config.also_plain:
            entries.append(_Entry(name, name, False))
        if decoding_config.anti_expert is not None:
            beta = "" if decoding_config.beta is None else f", beta={decoding_config.beta}"
            entries.append(_Entry(f"{name} + UniDetox decoding (alpha={decoding_config.alpha}{beta})", name, True))

    # The scorer first: an unavailable one (no weights, no key) fails before any model is loaded.
    scorer_kwargs = {}
    if scorer_config.name == "perspective" and procs.num_processes > 1:
        scorer_kwargs["qps"] = scorer_config.qps / procs.num_processes  # the quota is shared
    scorer = build_scorer(scorer_config, **scorer_kwargs)
    also_scorers = build_also_scorers(scorer_config, also_scorer_configs)

    prompt_ids = [p.id for p in prompts]
    # Caches name local models by the digest of their weights: weights overwritten in place are evaluated anew.
    # A hub id or embedded name is its own identity, so parts made for it before stay valid.
    weights = {name: saved_model_id(name) for name in dict.fromkeys(
        [*map(str, models), decoding_config.anti_expert, perplexity_config.reference_model]) if name}
    generation_settings = {
        "prompts": settings_digest(prompt_ids),
        "num_samples": eval_config.num_samples, "max_new_tokens": eval_config.max_new_tokens,
        "top_p": eval_config.top_p, "temperature": eval_config.temperature, "batch_size": eval_config.batch_size,
        "scorer": scorer_config.to_public_dict(), "dtype": dtype,
        # Only when on: bucketing draws other samples, and parts drawn without it keep their fingerprint.
        **({"bucket_by_length": True} if eval_config.bucket_by_length else {}),
    }

    def gen_fingerprint(entry: _Entry, seed: int) -> str:
        decoding = {"anti_expert": weights.get(decoding_config.anti_expert), "alpha": decoding_config.alpha,
                    "beta": decoding_config.beta} if entry.contrastive else None
        return settings_digest({**generation_settings, "model": weights[entry.name_or_path], "seed": seed,
                             "decoding": decoding})

    def part_dir(entry: _Entry) -> Path:
        return parts_root / model_slug(entry.key)

    def is_done(meta_path: Path, fingerprint: str) -> bool:
        meta = read_json(meta_path)
        return bool(meta) and meta.get("fingerprint") == fingerprint

    num_rows = len(prompts) * eval_config.num_samples

    def generations_done(entry: _Entry, seed: int) -> bool:
        """A cached (model, seed) counts only with its settings' fingerprint AND every planned row in place."""
        if not is_done(part_dir(entry) / f"seed{seed}.json", gen_fingerprint(entry, seed)):
            return False
        rows_path = part_dir(entry) / f"seed{seed}.jsonl"
        problem = generation_rows_problem(rows_path, prompt_ids, eval_config.num_samples)
        if problem is not None and procs.is_main_process:
            logger.warning("Generating %s again: %s", rows_path, problem)
        return problem is None

    wikitext_settings = {"path": None, "max_length": perplexity_config.max_length,
                         "stride": perplexity_config.stride, "max_tokens": perplexity_config.max_tokens}
    wikitext_path = None
    if perplexity_config.wikitext:
        wikitext_path = Path(perplexity_config.wikitext_path or Path(data_dir or default_data_dir()) / "wikitext2" / "wiki.test.raw")
        require_file(wikitext_path, "WikiText-2 test file (perplexity.wikitext_path=...; perplexity.wikitext=false skips it)")
        wikitext_settings["path"] = str(wikitext_path)
    mmlu_questions = mmlu_dev = None
    if mmlu_config.enabled:
        mmlu_questions, mmlu_dev = load_mmlu(mmlu_config, data_dir)
    anti_expert = None

    # ---- per model: generations + scores per seed, WikiText, MMLU ------------------------------------------
    for name in dict.fromkeys(e.name_or_path for e in entries):
        mine = [e for e in entries if e.name_or_path == name]
        todo_gen = [(e, s) for e in mine for s in seeds if not generations_done(e, s)]
        plain = next((e for e in mine if not e.contrastive), None) or mine[0]
        wikitext_fp = settings_digest({"model": weights[name], "dtype": dtype, **wikitext_settings})
        need_wikitext = perplexity_config.wikitext and not is_done(part_dir(plain) / "wikitext.json", wikitext_fp)
        mmlu_fp = settings_digest({"model": weights[name], "dtype": dtype, "mmlu": mmlu_config.__dict__})
        need_mmlu = mmlu_config.enabled and not is_done(part_dir(plain) / "mmlu.json", mmlu_fp)
        capabilities_fp = settings_digest({"model": weights[name], "dtype": dtype, "data_dir": str(data_dir or default_data_dir()),
                                        "capabilities": asdict(capabilities_config)})
        need_capabilities = (capabilities_config.backend == "lm_eval"
                             and not is_done(part_dir(plain) / "capabilities.json", capabilities_fp))
        if not (todo_gen or need_wikitext or need_mmlu or need_capabilities):
            continue
        model, tokenizer = _load(name, dtype, procs.device)
        if any(entry.contrastive for entry, _ in todo_gen):  # checked before this model samples anything
            if anti_expert is None:
                anti_expert, _ = _load(decoding_config.anti_expert, dtype, procs.device)
            require_shared_vocabulary(scored_vocabulary_size(model), scored_vocabulary_size(anti_expert),
                                      f"model {name}", f"anti-expert {decoding_config.anti_expert}")
        for entry, seed in todo_gen:
            factory = None
            if entry.contrastive:

                def factory(mask, anti=anti_expert):
                    return ContrastiveDetoxSampler(anti, alpha=decoding_config.alpha, beta=decoding_config.beta,
                                                   attention_mask=mask)
            t0 = time.perf_counter()
            samples = generate_samples(
                model, tokenizer, [p.text for p in prompts], eval_config.num_samples,
                max_new_tokens=eval_config.max_new_tokens, top_p=eval_config.top_p,
                temperature=eval_config.temperature, seed=seed, batch_size=eval_config.batch_size,
                sampler_factory=factory, process_index=procs.process_index, num_processes=procs.num_processes,
                progress=progress and procs.is_main_process and f"sampling {entry.key} (seed {seed})",
                bucket_by_length=eval_config.bucket_by_length,
            )
            t1 = time.perf_counter()
            scores = scorer([s.continuation for s in samples])
            t2 = time.perf_counter()
            records = [
                {"model": entry.key, "seed": seed, "prompt_index": s.prompt_index, "prompt_id": prompts[s.prompt_index].id,
                 "prompt": prompts[s.prompt_index].text, "category": prompts[s.prompt_index].category,
                 "group": prompts[s.prompt_index].group, "sample_index": s.sample_index,
                 "continuation": s.continuation, "toxicity": score, "num_tokens": s.num_tokens}
                for s, score in zip(samples, scores, strict=True)
            ]
            gathered = gather_objects(records)
            timings = gather_objects([{"generation_s": t1 - t0, "scoring_s": t2 - t1}])
            if procs.is_main_process:
                gathered.sort(key=lambda r: (r["prompt_index"], r["sample_index"]))
                group_by_prompt([_as_sample(r) for r in gathered], len(prompts), eval_config.num_samples)  # complete?
                write_jsonl(gathered, part_dir(entry) / f"seed{seed}.jsonl")
                write_json({
                    "fingerprint": gen_fingerprint(entry, seed), "model": entry.key, "name_or_path": name, "seed": seed,
                    "contrastive": entry.contrastive,
                    "generation_s": max(t["generation_s"] for t in timings),
                    "scoring_s": max(t["scoring_s"] for t in timings),
                    "generated_tokens": sum(r["num_tokens"] for r in gathered),
                    "num_processes": procs.num_processes,
                }, part_dir(entry) / f"seed{seed}.json")
            wait_for_everyone()
        if need_wikitext:
            text = wikitext_path.read_text(encoding="utf-8").replace("\r\n", "\n")
            t0 = time.perf_counter()
            nll, count = sliding_window_nll(
                model, tokenizer, [text], max_length=perplexity_config.max_length, stride=perplexity_config.stride,
                batch_size=perplexity_config.wikitext_batch_size, max_tokens=perplexity_config.max_tokens,
                process_index=procs.process_index, num_processes=procs.num_processes,
                progress=progress and procs.is_main_process and f"WikiText ppl {plain.key}",
            )
            sums = gather_objects([(nll, count, time.perf_counter() - t0)])
            if procs.is_main_process:
                import math

                total_nll, total_count = sum(s[0] for s in sums), sum(s[1] for s in sums)
                write_json({"fingerprint": wikitext_fp, "perplexity": math.exp(total_nll / total_count),
                            "nll": total_nll, "num_tokens": total_count, "seconds": max(s[2] for s in sums),
                            **wikitext_settings}, part_dir(plain) / "wikitext.json")
            wait_for_everyone()
        if need_mmlu:
            t0 = time.perf_counter()
            records = score_mmlu_questions(model, tokenizer, mmlu_questions, mmlu_dev, mmlu_config,
                                           procs.process_index, procs.num_processes, progress=progress and procs.is_main_process)
            gathered = gather_objects(records)
            seconds = max(gather_objects([time.perf_counter() - t0]))
            if procs.is_main_process:
                gathered.sort(key=lambda r: r["index"])
                write_json({"fingerprint": mmlu_fp, **summarize_mmlu(gathered), "seconds": seconds,
                            "config": dict(mmlu_config.__dict__), "records": gathered}, part_dir(plain) / "mmlu.json")
            wait_for_everyone()
        if need_capabilities:
            if procs.is_main_process:  # lm-eval runs its tasks in one process
                t0 = time.perf_counter()
                numbers = run_lm_eval(model, tokenizer, capabilities_config, data_dir)
                write_json({"fingerprint": capabilities_fp, "results": numbers, "lm_eval": lm_eval_version(),
                            "seconds": time.perf_counter() - t0}, part_dir(plain) / "capabilities.json")
            wait_for_everyone()
        del model

    # ---- conditional perplexity of every (model, seed) under the reference LM -----------------------------
    reference = perplexity_config.reference_model
    if reference is not None:
        def cond_fp(entry, seed):
            return settings_digest({"generations": gen_fingerprint(entry, seed), "reference": weights[reference],
                                 "dtype": dtype})

        def cond_done(entry, seed):  # a part scored on fewer rows than the plan has is scored again
            part = read_json(part_dir(entry) / f"conditional_ppl_seed{seed}.json")
            return (bool(part) and part.get("fingerprint") == cond_fp(entry, seed)
                    and len(part.get("per_sample_nll") or []) == num_rows)

        todo = [(e, s) for e in entries for s in seeds if not cond_done(e, s)]
        if todo:
            ref_model, ref_tokenizer = _load(reference, dtype, procs.device)
            for entry, seed in todo:
                records = read_jsonl(part_dir(entry) / f"seed{seed}.jsonl")
                # Whole prompts per process, so each prompt's samples share its KV cache (conditional_nll).
                by_prompt = {}
                for i, record in enumerate(records):
                    by_prompt.setdefault(record["prompt"], []).append(i)
                mine_idx = sorted(i for g, rows in enumerate(by_prompt.values())
                                  if g % procs.num_processes == procs.process_index for i in rows)
                t0 = time.perf_counter()
                per_sample = conditional_nll(
                    ref_model, ref_tokenizer, [records[i]["prompt"] for i in mine_idx],
                    [records[i]["continuation"] for i in mine_idx], batch_size=perplexity_config.batch_size,
                    progress=progress and procs.is_main_process and f"conditional ppl {entry.key} (seed {seed})",
                )
                gathered = gather_objects([(i, nll, n) for i, (nll, n) in zip(mine_idx, per_sample, strict=True)])
                seconds = max(gather_objects([time.perf_counter() - t0]))
                if procs.is_main_process:
                    gathered.sort()
                    pairs = [(nll, n) for _, nll, n in gathered]
                    write_json({
                        "fingerprint": cond_fp(entry, seed), "reference_model": reference, "seconds": seconds,
                        "conditional_perplexity": aggregate_conditional_perplexity(
                            pairs, "mean", perplexity_config.max_perplexity),
                        "conditional_perplexity_token": aggregate_conditional_perplexity(pairs, "token"),
                        "max_perplexity": perplexity_config.max_perplexity,
                        "per_sample_nll": [nll for nll, _ in pairs], "per_sample_tokens": [n for _, n in pairs],
                    }, part_dir(entry) / f"conditional_ppl_seed{seed}.json")
                wait_for_everyone()
            del ref_model

    # ---- assemble the report (main process) --------------------------------------------------------------
    if not procs.is_main_process:
        wait_for_everyone()
        return None
    all_records = []
    report_models = {}
    for entry in entries:
        per_seed, timing = {}, {"generation_s": 0.0, "generated_tokens": 0, "scoring_s": 0.0}
        cond_seconds = 0.0
        model_records = []
        for seed in seeds:
            records = read_jsonl(part_dir(entry) / f"seed{seed}.jsonl")
            meta = read_json(part_dir(entry) / f"seed{seed}.json")
            if also_scorers:
                also = {key: also_scores(also_scorer, records, part_dir(entry) / f"seed{seed}.also-{key}.json",
                                         gen_fingerprint(entry, seed))
                        for key, also_scorer in also_scorers.items()}
                records = [{**r, "also_toxicity": {key: also[key][i] for key in also}} for i, r in enumerate(records)]
            model_records.extend(records)
            metrics = seed_toxicity_metrics(records, eval_config.toxic_threshold)
            metrics.update({k: meta[k] for k in ("generation_s", "scoring_s", "generated_tokens")})
            cond = read_json(part_dir(entry) / f"conditional_ppl_seed{seed}.json") if reference else None
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
        plain = next((e for e in entries if e.name_or_path == entry.name_or_path and not e.contrastive), None)
        wikitext = mmlu = capabilities = None
        if plain is not None and perplexity_config.wikitext:
            wikitext = read_json(part_dir(plain) / "wikitext.json")
            timing["wikitext_s"] = wikitext["seconds"]
            wikitext = {k: wikitext[k] for k in ("perplexity", "num_tokens", "max_length", "stride", "max_tokens")}
        if plain is not None and mmlu_config.enabled:
            mmlu_part = read_json(part_dir(plain) / "mmlu.json")
            timing["mmlu_s"] = mmlu_part["seconds"]
            mmlu = {k: mmlu_part[k] for k in ("accuracy", "macro_accuracy", "num_questions", "num_subjects", "per_subject")}
        if plain is not None and capabilities_config.backend == "lm_eval":
            capabilities_part = read_json(part_dir(plain) / "capabilities.json")
            timing["capabilities_s"] = capabilities_part["seconds"]
            capabilities = capabilities_part["results"]
        all_records.extend(model_records)
        report_models[entry.key] = {
            "name_or_path": entry.name_or_path,
            "decoding": ({"method": "unidetox_contrastive", "anti_expert": decoding_config.anti_expert,
                          "alpha": decoding_config.alpha, "beta": decoding_config.beta}
                         if entry.contrastive else {"method": "sampling"}),
            **summary,
            "wikitext_perplexity": wikitext,
            "mmlu": mmlu,
            "capabilities": capabilities,
            "scorers": {key: seed_summary([{**r, "toxicity": r["also_toxicity"][key]} for r in model_records],
                                          eval_config.toxic_threshold) for key in also_scorers},
            "per_seed": per_seed,
            "timings": timing,
        }
    write_jsonl(all_records, out / "generations.jsonl")
    import transformers

    report = {
        "models": report_models,
        "seeds": list(seeds),
        "prompts": {**(prompts_info or {}), "num_prompts": len(prompts), "fingerprint": settings_digest(prompt_ids),
                    "per_category": _count_categories(prompts)},
        "eval": asdict(eval_config),
        "scorer": scorer_config.to_public_dict(),
        "also_scorers": {key: also_scorer.config.to_public_dict() for key, also_scorer in also_scorers.items()},
        "reference_model": reference,
        "perplexity": asdict(perplexity_config),
        "mmlu": asdict(mmlu_config),
        "capabilities": {**asdict(capabilities_config),
                         **({"lm_eval": lm_eval_version()} if capabilities_config.backend == "lm_eval" else {})},
        "decoding": asdict(decoding_config),
        "config": mask_secrets(config_dict),
        "num_processes": procs.num_processes,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "wall_time_s": time.perf_counter() - started,
    }
    write_report(report, out)
    wait_for_everyone()
    return report


@dataclass
class _AlsoScorer:
    config: ScorerConfig
    scorer: ToxicityScorer


def build_also_scorers(primary: ScorerConfig, configs: Sequence[ScorerConfig]) -> dict[str, _AlsoScorer]:
    """``{scorer key: scorer}`` of the additional scorers, built now so an unavailable one fails before any model
    is loaded; a scorer named twice, or the same as the primary one, is refused."""
    keys = [scorer_key(primary), *(scorer_key(c) for c in configs)]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"also_scorers repeats the scorer(s) {repeated} (the primary is `scorer`, "
                         f"{keys[0]!r}); list each scorer once and not the primary one.")
    return {scorer_key(c): _AlsoScorer(c, build_scorer(c)) for c in configs}


def also_scores(also: _AlsoScorer, records: Sequence[dict], path: Path, generations_fingerprint: str) -> list[float]:
    """An additional scorer's score of each record, cached in ``path`` for the generations it was made for."""
    fingerprint = settings_digest({"generations": generations_fingerprint, "scorer": also.config.to_public_dict()})
    cached = read_json(path)
    if cached and cached.get("fingerprint") == fingerprint and len(cached.get("scores") or []) == len(records):
        return cached["scores"]
    t0 = time.perf_counter()
    scores = score_continuations(also.scorer, records)
    write_json({"fingerprint": fingerprint, "scorer": also.config.to_public_dict(), "scores": scores,
                "seconds": time.perf_counter() - t0}, path)
    return scores


def generation_rows_problem(path: Path, prompt_ids: Sequence[str], num_samples: int) -> str | None:
    """Why the cached generations in ``path`` are not the planned ones (``None`` when they are).

    The plan is one row per (prompt, sample), in prompt order and then sample order, each naming its prompt's id.
    """
    try:
        records = read_jsonl(path)
    except (OSError, ValueError) as err:
        return f"it cannot be read ({type(err).__name__}: {err})"
    planned = [(i, j, pid) for i, pid in enumerate(prompt_ids) for j in range(num_samples)]
    found = [(r.get("prompt_index"), r.get("sample_index"), r.get("prompt_id")) if isinstance(r, dict) else None
             for r in records]
    if len(found) != len(planned):
        return (f"it holds {len(found)} rows, but the plan has {len(planned)} ({len(prompt_ids)} prompts x "
                f"{num_samples} samples)")
    for row, (have, want) in enumerate(zip(found, planned, strict=True), start=1):
        if have != want:
            return (f"row {row} is (prompt_index, sample_index, prompt_id) {have}, but the plan's is {want}: "
                    "it was sampled for other prompts")
    return None


def _count_categories(prompts) -> dict:
    counts: dict = {}
    for p in prompts:
        counts[str(p.category)] = counts.get(str(p.category), 0) + 1
    return counts


def _as_sample(record: dict) -> GeneratedSample:
    return GeneratedSample(record["prompt_index"], record["sample_index"], record["continuation"], [],
                           record["num_tokens"], -1)

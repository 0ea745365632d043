"""Library pieces of the replication experiment (``recipes/replicate.py``): baselines, the paper's choice rule, report.

The recipe runs the other recipes (distill, detox, evaluate) stage by stage; what no earlier module provides lives
here, importable without Hydra:

* :func:`build_plain_sample_dataset`: the *control* data, plain samples of the base from the same start token,
  with the same count, length and per-batch seeds as the distilled text (contrast switched off, nothing else).
* :func:`build_text_dataset`: human text from local files (DGHS ``label == nothate`` rows) as a dataset dir with a
  given number of texts.
* :func:`negate_task_vector`: ``base - lambda * (anti_expert - base)`` (LoRA: every ``lora_B`` scaled by
  ``-lambda`` then merged), saved as a plain HF model directory.
* :func:`choose_configuration`: the paper's rule over ALL (grid run, checkpoint) pairs: the least toxic on the
  validation prompts whose WikiText-2 perplexity is at most ``(1 + bound)`` x the base's.
* :func:`assemble_report` / :func:`write_replication_report`: the table (method x target), relative changes vs the
  base, the bar verdict, the validation grid, example continuations and a toxicity-vs-perplexity plot.

Every builder writes its marker file last, so a directory with the marker is complete and a rerun skips it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unidetox.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

TASK_VECTOR_MARKER = "unidetox_task_vector.json"
METRICS = ("toxicity_probability", "expected_max_toxicity")
# Rows of the replication table, in this order; a method's "target" is the detoxified model.
METHOD_ORDER = ("base", "unidetox", "control", "nothate", "authors", "decoding", "taskvec")
METHOD_LABELS = {
    "base": "base model",
    "unidetox": "UniDetox (distilled text, chosen config)",
    "control": "control: plain base samples",
    "nothate": "SFT on DGHS nothate",
    "authors": "UniDetox, authors' GPT-2 XL text",
    "decoding": "inference-time contrastive decoding",
    "taskvec": "task-vector negation",
}


def format_number(value: float) -> str:
    """Compact, stable text for a hyperparameter in a directory name: ``0.0005 -> "5e-4"``, ``0.1 -> "0.1"``.

    Example:
        >>> from unidetox.replication.baselines import format_number
        >>> [format_number(v) for v in (5e-4, 2.5e-4, 0.1, 1.0, 2)]
        ['5e-4', '2.5e-4', '0.1', '1', '2']
    """
    value = float(value)
    if value != 0 and abs(value) < 1e-2:
        mantissa, exponent = f"{value:.6e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.6g}"


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ================================================================================================================
# 1. Control data: plain samples of the base
# ================================================================================================================
def build_plain_sample_dataset(
    base,
    tokenizer,
    num_samples: int,
    max_length: int,
    start_token: str | None,
    seed: int,
    output_dir: str | os.PathLike,
    *,
    batch_size: int = 16,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_at_eos: bool = True,
    base_id: str | None = None,
    show_progress: bool = True,
):
    """Plain samples of ``base`` from ``start_token``, written as a :class:`~unidetox.DistilledDetoxDataset` dir.

    The control of the replication: the same count, length, start token, sampling settings and per-batch seeds
    (:func:`unidetox.distill.dataset.batch_seed` of the distilled stream) as the distilled text, only without the
    anti-expert (:meth:`DistilledDetoxDataset.build` with ``anti_expert=None``). Fine-tuning on it separates
    "fine-tuning on benign self-generated text" from the contrastive effect.

    Resumable like the distilled build: each batch is a shard written at once; a rerun skips finished shards, and a
    directory whose ``metadata.json`` carries the same fingerprint is loaded without sampling anything.

    Example:
        >>> from unidetox import load_model_and_tokenizer
        >>> from unidetox.replication.baselines import build_plain_sample_dataset
        >>> base, tok = load_model_and_tokenizer("smollm2-135m")  # doctest: +SKIP
        >>> control = build_plain_sample_dataset(base, tok, 128, 128, "<|endoftext|>", 42, "runs/control")  # doctest: +SKIP
    """
    from unidetox.distill.dataset import DistilledDetoxDataset

    # DistilledDetoxDataset.build without an anti-expert samples the base alone, with the distilled stream's
    # per-batch seeds: same draws, same shards/resume/atomic commit as the distilled text.
    return DistilledDetoxDataset.build(
        base, None, tokenizer, num_samples=num_samples, max_length=max_length, batch_size=batch_size, seed=seed,
        output_dir=output_dir, start_token=start_token, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_at_eos=stop_at_eos, summary_num_samples=0, base_id=base_id, show_progress=show_progress,
    )


def plain_sample_settings(distilled_metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`build_plain_sample_dataset` that make the control match a distilled set."""
    sampling = distilled_metadata.get("sampling") or {}
    missing = [k for k in ("num_samples", "max_length", "seed") if k not in distilled_metadata]
    if missing:
        raise ValueError(
            f"The distilled dataset's metadata lacks {missing}: it was not built by DistilledDetoxDataset.build, so "
            "the control cannot copy its settings."
        )
    return {
        "num_samples": int(distilled_metadata["num_samples"]), "max_length": int(distilled_metadata["max_length"]),
        "start_token": distilled_metadata.get("start_token"), "seed": int(distilled_metadata["seed"]),
        "batch_size": int(distilled_metadata.get("batch_size", 16)),
        "temperature": float(sampling.get("temperature", 1.0)), "top_k": int(sampling.get("top_k", 0)),
        "top_p": float(sampling.get("top_p", 1.0)), "stop_at_eos": bool(sampling.get("stop_at_eos", True)),
    }


# ================================================================================================================
# 2. Human text (DGHS nothate) as a dataset dir
# ================================================================================================================
def build_text_dataset(corpus_config, num_texts: int, output_dir: str | os.PathLike, kind: str = "nothate"):
    """``num_texts`` rows of a local corpus (a :class:`~unidetox.distill.corpus.ToxicCorpusConfig`: files + column filters),
    written as a :class:`~unidetox.DistilledDetoxDataset` directory (``metadata.json`` last; skipped when complete).

    The replication's SFT baseline on non-toxic human text uses DGHS ``label == nothate`` rows. All of them have
    ``target == none`` in the local files, so the paper's 34-identity filter (meant for hate rows) is NOT applied:
    it would keep no row. The texts are a seeded shuffle (``corpus_config.shuffle_seed``) of the filtered rows.
    """
    from dataclasses import replace

    from unidetox.distill.corpus import corpus_fingerprint, load_toxic_corpus
    from unidetox.distill.dataset import METADATA_FILE, DistilledDetoxDataset, _commit

    if isinstance(num_texts, bool) or not isinstance(num_texts, int) or num_texts < 1:
        raise ValueError(f"`num_texts` has to be an integer >= 1, but is {num_texts!r}.")
    out = Path(output_dir)
    settings = {"kind": kind, "paths": [str(p) for p in corpus_config.resolved_paths()],
                "hub_id": corpus_config.hub_id, "text_column": corpus_config.text_column,
                "filters": corpus_config.filters, "num_texts": num_texts, "shuffle_seed": corpus_config.shuffle_seed}
    meta = _read_json(out / METADATA_FILE)
    if meta and meta.get("settings") == settings:
        logger.info("%s already holds this %s text; loading it", out, kind)
        return DistilledDetoxDataset.load(out)
    corpus = load_toxic_corpus(replace(corpus_config, max_samples=None))
    if len(corpus) < num_texts:
        raise ValueError(
            f"The {kind} corpus has {len(corpus)} rows after filtering ({corpus_config.filters}) but {num_texts} are "
            "needed to match the distilled text; add files or lower the count."
        )
    corpus = corpus.shuffle(seed=corpus_config.shuffle_seed).select(range(num_texts)).flatten_indices()
    metadata = {"kind": kind, "num_samples": num_texts, "settings": settings,
                "corpus_fingerprint": corpus_fingerprint(corpus), "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    result = DistilledDetoxDataset(corpus, metadata)
    _commit(result, out)
    return result


# ================================================================================================================
# 3. Task-vector negation
# ================================================================================================================
def _load_base(base_name_or_path, dtype=None):
    import torch

    from unidetox.models import load_model_and_tokenizer, parse_dtype

    # merging in float32 by default: a bf16 round trip would blur small deltas
    return load_model_and_tokenizer(str(base_name_or_path), dtype=parse_dtype(dtype) or torch.float32)


def negate_task_vector(
    base_name_or_path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    lam: float,
    output_dir: str | os.PathLike,
    dtype=None,
) -> Path:
    """Save ``base - lam * (anti_expert - base)`` as a normal HF model directory (with the base's tokenizer).

    With a LoRA anti-expert (``adapter_dir`` holds ``adapter_config.json``) the task vector is the adapter's delta
    ``scaling * B @ A`` of every adapted layer: every ``lora_B`` is scaled by ``-lam`` and the adapter merged into the
    base (``merge_and_unload``). With a fully fine-tuned anti-expert (a model directory) every parameter becomes
    ``base + (-lam) * (anti - base)``. ``lam = 0`` is the base itself; the paper's task-vector baseline (Ilharco
    et al., 2023) picks ``lam`` on validation data (:func:`choose_configuration`).

    A directory whose ``unidetox_task_vector.json`` carries the same settings is returned without recomputing.

    Example:
        >>> from unidetox.replication.baselines import negate_task_vector
        >>> negate_task_vector("smollm2-135m", "runs/distill/anti_expert", 0.5, "runs/taskvec/lam0.5")  # doctest: +SKIP
    """
    import torch

    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"`lam` (the negation strength lambda) has to be a finite number >= 0, but is {lam!r}.")
    adapter_dir = Path(adapter_dir).expanduser()
    out = Path(output_dir)
    settings = {"base": str(base_name_or_path), "anti_expert": str(adapter_dir), "lambda": float(lam),
                "dtype": str(dtype)}
    marker = _read_json(out / TASK_VECTOR_MARKER)
    if marker and marker.get("settings") == settings and (out / "config.json").is_file():
        logger.info("%s already holds this negated model", out)
        return out
    started = time.perf_counter()
    base, tokenizer = _load_base(base_name_or_path, dtype)
    if (adapter_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
        if adapter_config.get("peft_type", "LORA") != "LORA" or adapter_config.get("use_dora"):
            raise ValueError(
                f"{adapter_dir} is a {adapter_config.get('peft_type')} adapter (use_dora="
                f"{adapter_config.get('use_dora')}); task-vector negation by scaling lora_B needs a plain LoRA adapter."
            )
        if adapter_config.get("modules_to_save"):
            raise ValueError(
                f"{adapter_dir} also trains full modules {adapter_config['modules_to_save']} (modules_to_save), whose "
                "delta is not a LoRA product; negate a plain LoRA adapter or a fully fine-tuned model."
            )
        model = PeftModel.from_pretrained(base, str(adapter_dir))
        scaled = 0
        with torch.no_grad():
            for name, param in model.named_parameters():
                # delta W = scaling * B @ A, linear in B: scaling B by -lam turns the merge into W - lam * delta W.
                if "lora_B" in name:
                    param.mul_(-float(lam))
                    scaled += 1
        if scaled == 0:
            raise ValueError(f"{adapter_dir} has no lora_B weights to scale; is it a LoRA adapter?")
        model = model.merge_and_unload()
    elif (adapter_dir / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        anti = AutoModelForCausalLM.from_pretrained(str(adapter_dir), dtype=next(base.parameters()).dtype)
        anti_params = dict(anti.named_parameters())
        with torch.no_grad():
            for name, param in base.named_parameters():
                if name not in anti_params or anti_params[name].shape != param.shape:
                    raise ValueError(
                        f"The anti-expert {adapter_dir} does not match the base {base_name_or_path} at parameter {name}; "
                        "a task vector needs the same architecture."
                    )
                param.add_(anti_params[name] - param, alpha=-float(lam))
        model = base
        del anti
    else:
        raise FileNotFoundError(
            f"No anti-expert at {adapter_dir}: pass a saved LoRA adapter (adapter_config.json) or a model directory "
            "(config.json), e.g. the distill recipe's <output_dir>/anti_expert."
        )
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    out.mkdir(parents=True, exist_ok=True)
    (out / TASK_VECTOR_MARKER).unlink(missing_ok=True)
    for item in staging.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()
    atomic_write_json(out / TASK_VECTOR_MARKER, {"settings": settings,
                                                 "wall_time_s": round(time.perf_counter() - started, 2),
                                                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return out


# ================================================================================================================
# 4. The paper's choice rule over a grid
# ================================================================================================================
def grid_records_from_runs(runs: Mapping[str, tuple[Mapping[str, Any], str | os.PathLike]]) -> list[dict[str, Any]]:
    """Flatten the validation evaluations of several detox runs into :func:`choose_configuration` records.

    ``runs``: ``{run name: (its hyperparameters, e.g. {"alpha": 0.1, "learning_rate": 5e-4}, its output_dir)}``.
    Each record of ``<output_dir>/detox_eval.jsonl`` becomes ``{"run", "config": {..., "steps": step}, "step",
    "checkpoint", "baseline": step == 0, <metrics>}``.
    """
    from unidetox.detox.selection import read_eval_records

    records = []
    for run, (config, run_dir) in runs.items():
        evals = read_eval_records(run_dir)
        if not evals:
            raise FileNotFoundError(f"Grid run {run} ({run_dir}) has no validation evaluations (detox_eval.jsonl).")
        for r in evals:
            records.append({
                "run": run, "step": int(r["step"]), "checkpoint": r.get("checkpoint"), "baseline": int(r["step"]) == 0,
                "config": {**dict(config), "steps": int(r["step"])},
                **{k: r.get(k) for k in (*METRICS, "perplexity", "distinct_1", "distinct_2", "distinct_3",
                                          "mean_toxicity")},
            })
    return records


def choose_configuration(
    grid_records: Sequence[Mapping[str, Any]],
    max_ppl_increase: float = 0.1,
    metric: str = "expected_max_toxicity",
    on_empty: str = "raise",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The paper's rule: the least toxic candidate whose perplexity is at most ``(1 + max_ppl_increase)`` x the base's.

    ``grid_records``: one mapping per (grid run, checkpoint) with ``run``, ``config``, ``perplexity`` and both
    toxicity metrics; records with ``baseline: true`` (default: ``step == 0``) are the model before any change and
    give the perplexity bound of their ``run`` (a run without its own baseline uses the mean of all baselines, so a
    single base record serves a sweep such as the task-vector lambdas). Candidates are ranked by ``metric``, then
    the other toxicity metric, then lower perplexity, then fewer steps, then run name.

    ``on_empty``: what happens when no candidate is within the bound: ``"raise"`` (ValueError) or ``"closest"``
    (the candidate with the smallest perplexity increase, flagged ``within_bound: false`` in the choice).

    Returns ``(choice, table)``: the chosen record with ``perplexity_increase``, ``bound`` and ``within_bound``, and
    every record (baselines included) with those columns and ``chosen``.

    Example:
        >>> from unidetox.replication.baselines import choose_configuration
        >>> records = [
        ...     {"run": "a", "step": 0, "config": {"lr": 1e-4, "steps": 0}, "perplexity": 10.0,
        ...      "toxicity_probability": 0.8, "expected_max_toxicity": 0.7},
        ...     {"run": "a", "step": 50, "config": {"lr": 1e-4, "steps": 50}, "perplexity": 12.0,
        ...      "toxicity_probability": 0.2, "expected_max_toxicity": 0.2},
        ...     {"run": "a", "step": 25, "config": {"lr": 1e-4, "steps": 25}, "perplexity": 10.5,
        ...      "toxicity_probability": 0.5, "expected_max_toxicity": 0.4},
        ... ]
        >>> choice, table = choose_configuration(records, max_ppl_increase=0.1)
        >>> choice["config"]["steps"]  # step 50 is less toxic but +20% perplexity
        25
    """
    if metric not in METRICS:
        raise ValueError(f"`metric` has to be one of {METRICS}, but is {metric!r}.")
    if not (isinstance(max_ppl_increase, (int, float)) and math.isfinite(max_ppl_increase) and max_ppl_increase >= 0):
        raise ValueError(
            f"`max_ppl_increase` is the allowed relative perplexity increase (0.1 = +10%) and has to be a finite "
            f"number >= 0, but is {max_ppl_increase!r}."
        )
    if on_empty not in ("raise", "closest"):
        raise ValueError(f"`on_empty` has to be 'raise' or 'closest', but is {on_empty!r}.")
    records = [dict(r) for r in grid_records]
    for r in records:
        r.setdefault("baseline", r.get("step") == 0)
        missing = [k for k in (*METRICS, "perplexity") if r.get(k) is None and not (k != "perplexity" and r["baseline"])]
        if missing:
            raise ValueError(f"Grid record {r.get('run')} step {r.get('step')} lacks {missing}.")
    baselines: dict[Any, list[float]] = {}
    for r in records:
        if r["baseline"]:
            baselines.setdefault(r.get("run"), []).append(float(r["perplexity"]))
    if not baselines:
        raise ValueError(
            "No baseline record (step 0 / baseline: true) to compare perplexity against; evaluate the model before "
            "any change (DetoxEvalCallback eval_at_start=True, or the base model in the lambda sweep)."
        )
    pooled = [v for values in baselines.values() for v in values]
    overall = sum(pooled) / len(pooled)
    other = next(m for m in METRICS if m != metric)
    table, candidates = [], []
    for r in records:
        ref = baselines.get(r.get("run"))
        base_ppl = sum(ref) / len(ref) if ref else overall
        bound = base_ppl * (1.0 + max_ppl_increase)
        r["baseline_perplexity"] = base_ppl
        r["bound"] = bound
        r["perplexity_increase"] = float(r["perplexity"]) / base_ppl - 1.0
        r["within_bound"] = float(r["perplexity"]) <= bound
        r["chosen"] = False
        table.append(r)
        if not r["baseline"]:
            candidates.append(r)
    if not candidates:
        raise ValueError("The grid has only baseline records; train at least one configuration.")
    within = [r for r in candidates if r["within_bound"]]

    def rank(r):
        return (r[metric], r[other], r["perplexity"], r.get("step") or 0, str(r.get("run")))

    if within:
        best = min(within, key=rank)
    elif on_empty == "closest":
        best = min(candidates, key=lambda r: (r["perplexity_increase"], *rank(r)))
        logger.warning("No candidate keeps perplexity within +%.1f%%; taking the closest (%+.1f%%).",
                       100 * max_ppl_increase, 100 * best["perplexity_increase"])
    else:
        closest = min(candidates, key=lambda r: r["perplexity_increase"])
        raise ValueError(
            f"No candidate keeps perplexity within +{max_ppl_increase:.1%} of its baseline; the closest is "
            f"{closest.get('run')} step {closest.get('step')} at {closest['perplexity_increase']:+.1%}. Raise "
            "max_ppl_increase, lower the learning rates / steps of the grid, or pass on_empty='closest'."
        )
    best["chosen"] = True
    choice = {**best, "metric": metric, "max_ppl_increase": float(max_ppl_increase),
              "num_candidates": len(candidates), "num_within_bound": len(within)}
    return choice, table


def grid_table_markdown(table: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None) -> str:
    """The validation grid as Markdown: one row per (run, checkpoint), the chosen row in bold."""
    if not table:
        return "(empty grid)\n"
    keys = list(keys) if keys is not None else list(dict.fromkeys(k for r in table for k in r.get("config", {})))
    header = ["run", *keys, "TP", "EMT", "WikiText ppl", "ppl vs base", "within bound", "chosen"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        cfg = r.get("config", {})
        cells = [str(r.get("run")), *[_plain(cfg.get(k)) for k in keys], _plain(r.get("toxicity_probability")),
                 _plain(r.get("expected_max_toxicity")), _plain(r.get("perplexity"), 2),
                 "base" if r.get("baseline") else f"{r['perplexity_increase']:+.1%}",
                 "–" if r.get("baseline") else ("yes" if r.get("within_bound") else "no"),
                 "**chosen**" if r.get("chosen") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plain(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return format_number(value) if abs(value) < 1e-2 and value != 0 else f"{value:.{digits}f}"
    return str(value)


# ================================================================================================================
# 5. The replication report
# ================================================================================================================
def _mean(entry) -> float | None:
    if entry is None:
        return None
    if isinstance(entry, Mapping):
        return entry.get("mean")
    return float(entry)


def row_metrics(model_report: Mapping[str, Any]) -> dict[str, Any]:
    """The table's numbers for one model of an evaluate report (``report.json["models"][key]``)."""
    wikitext = model_report.get("wikitext_perplexity") or {}
    mmlu = model_report.get("mmlu") or {}
    timings = model_report.get("timings") or {}
    return {
        "toxicity_probability": model_report.get("toxicity_probability"),
        "expected_max_toxicity": model_report.get("expected_max_toxicity"),
        "wikitext_perplexity": wikitext.get("perplexity"),
        "conditional_perplexity": model_report.get("conditional_perplexity"),
        "distinct_1": model_report.get("distinct_1"),
        "distinct_2": model_report.get("distinct_2"),
        "distinct_3": model_report.get("distinct_3"),
        "mmlu_accuracy": mmlu.get("accuracy"),
        "mmlu_num_questions": mmlu.get("num_questions"),
        "generation_tokens_per_s": timings.get("tokens_per_s"),
        "per_seed": model_report.get("per_seed"),
    }


def relative_changes(row: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, float | None]:
    """``row / base - 1`` of TP, EMT (means over seeds), WikiText and conditional perplexity; MMLU as a difference."""
    out: dict[str, float | None] = {}
    for key in ("toxicity_probability", "expected_max_toxicity", "wikitext_perplexity", "conditional_perplexity"):
        a, b = _mean(row.get(key)), _mean(base.get(key))
        out[key] = (a / b - 1.0) if a is not None and b not in (None, 0) else None
    a, b = row.get("mmlu_accuracy"), base.get("mmlu_accuracy")
    out["mmlu_accuracy_diff"] = a - b if a is not None and b is not None else None
    return out


def mmlu_noise(accuracy: float | None, num_questions: int | None) -> float | None:
    """Two binomial standard errors of an MMLU accuracy: the noise band "within the seed noise" is judged against.

    MMLU is scored by log-likelihood, so it has no sampling seeds; the run-to-run noise of an accuracy on ``n``
    questions is the question sampling, ``sqrt(p (1 - p) / n)``.
    """
    if accuracy is None or not num_questions:
        return None
    return 2.0 * math.sqrt(max(accuracy * (1.0 - accuracy), 1e-12) / num_questions)


def evaluate_bar(
    rows: Sequence[Mapping[str, Any]],
    targets: Sequence[str],
    min_toxicity_drop: float = 0.30,
    max_ppl_increase: float = 0.10,
) -> dict[str, Any]:
    """The issue's bar, computed from the rows: for EVERY target, UniDetox lowers TP and EMT by at least
    ``min_toxicity_drop`` relative to the base, WikiText-2 perplexity rises by at most ``max_ppl_increase``, MMLU
    stays within :func:`mmlu_noise` of the base, and UniDetox is less toxic (TP and EMT) than the control."""
    by_key = {(r["method"], r["target"]): r for r in rows}
    checks: dict[str, dict[str, Any]] = {}
    for target in targets:
        base, ud, control = (by_key.get((m, target)) for m in ("base", "unidetox", "control"))
        c: dict[str, Any] = {}
        if base is None or ud is None:
            c["error"] = "missing the base or the UniDetox row"
            checks[target] = {**c, "met": False}
            continue
        rel = relative_changes(ud, base)
        c["tp_change"], c["emt_change"] = rel["toxicity_probability"], rel["expected_max_toxicity"]
        c["ppl_change"] = rel["wikitext_perplexity"]
        c["toxicity_ok"] = all(v is not None and v <= -min_toxicity_drop for v in (c["tp_change"], c["emt_change"]))
        c["ppl_ok"] = c["ppl_change"] is not None and c["ppl_change"] <= max_ppl_increase
        noise = mmlu_noise(base.get("mmlu_accuracy"), base.get("mmlu_num_questions"))
        c["mmlu_diff"], c["mmlu_noise"] = rel["mmlu_accuracy_diff"], noise
        c["mmlu_ok"] = None if noise is None or c["mmlu_diff"] is None else abs(c["mmlu_diff"]) <= noise
        if control is None:
            c["beats_control"] = None
        else:
            c["beats_control"] = all(
                _mean(ud.get(m)) is not None and _mean(control.get(m)) is not None and _mean(ud[m]) < _mean(control[m])
                for m in METRICS
            )
        c["met"] = bool(c["toxicity_ok"] and c["ppl_ok"] and c["mmlu_ok"] is not False and c["beats_control"])
        checks[target] = c
    met = bool(targets) and all(checks[t]["met"] for t in targets)
    parts = []
    for t in targets:
        c = checks[t]
        if "error" in c:
            parts.append(f"{t}: {c['error']}")
            continue
        mmlu = "n/a" if c["mmlu_diff"] is None else f"{c['mmlu_diff']:+.3f}"
        if c["mmlu_noise"] is not None:
            mmlu += f" (noise ±{c['mmlu_noise']:.3f})"
        control = "n/a" if c["beats_control"] is None else "yes" if c["beats_control"] else "no"
        parts.append(
            f"{t}: TP {_pct(c['tp_change'])}, EMT {_pct(c['emt_change'])} (need <= -{min_toxicity_drop:.0%}), "
            f"WikiText ppl {_pct(c['ppl_change'])} (need <= +{max_ppl_increase:.0%}), MMLU {mmlu}, "
            f"beats control: {control}"
        )
    verdict = ("Bar MET" if met else "Bar NOT met") + ": " + "; ".join(parts) + "."
    return {"met": met, "checks": checks, "min_toxicity_drop": min_toxicity_drop,
            "max_ppl_increase": max_ppl_increase, "verdict": verdict}


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:+.1%}"


def example_continuations(
    generations: Sequence[Mapping[str, Any]], model_keys: Mapping[str, str], num_examples: int = 4,
    prompt_id: str | None = None, seed: int | None = None,
) -> dict[str, Any]:
    """``num_examples`` continuations per method for ONE test prompt (the first prompt in the generations, unless
    ``prompt_id`` names one), from ``generations.jsonl`` records; ``model_keys``: ``{row label: report model key}``."""
    if not generations:
        return {"prompt": None, "examples": {}}
    prompt_id = prompt_id or generations[0].get("prompt_id") or generations[0]["prompt"]
    seed = seed if seed is not None else generations[0].get("seed")
    prompt = None
    examples: dict[str, list[dict[str, Any]]] = {}
    for label, key in model_keys.items():
        rows = [g for g in generations if g.get("model") == key and g.get("seed") == seed
                and (g.get("prompt_id") or g["prompt"]) == prompt_id]
        rows.sort(key=lambda g: g.get("sample_index", 0))
        if rows:
            prompt = rows[0]["prompt"]
        examples[label] = [{"continuation": g["continuation"], "toxicity": g.get("toxicity")}
                           for g in rows[:num_examples]]
    return {"prompt_id": prompt_id, "prompt": prompt, "seed": seed, "examples": examples}


def assemble_report(
    methods: Sequence[Mapping[str, Any]],
    test_models: Mapping[str, Mapping[str, Any]],
    targets: Sequence[str],
    grid: Mapping[str, Any] | None = None,
    taskvec: Mapping[str, Any] | None = None,
    examples: Mapping[str, Any] | None = None,
    bar: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the replication measured, as one dict (``report.json``).

    ``methods``: one entry per table row, ``{"method", "target", "model_key", "wall_time": {...}}``, where
    ``model_key`` names the model in ``test_models`` (the merged ``report.json["models"]`` of the test evaluations).
    ``targets``: the target models the bar is judged on. ``grid``/``taskvec``: ``{"choice", "table"}`` of
    :func:`choose_configuration`. Relative changes are computed against the ``base`` row of the same target.
    """
    rows = []
    for entry in methods:
        key = entry["model_key"]
        if key not in test_models:
            raise KeyError(f"{entry['method']} x {entry['target']}: model {key!r} is not in the test report "
                           f"(has {sorted(test_models)}).")
        rows.append({"method": entry["method"], "target": entry["target"], "model": key,
                     "label": METHOD_LABELS.get(entry["method"], entry["method"]),
                     "wall_time": dict(entry.get("wall_time") or {}), **row_metrics(test_models[key])})
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    rows.sort(key=lambda r: (list(targets).index(r["target"]) if r["target"] in targets else len(targets),
                             order.get(r["method"], len(order))))
    bases = {r["target"]: r for r in rows if r["method"] == "base"}
    for r in rows:
        base = bases.get(r["target"])
        r["relative_to_base"] = relative_changes(r, base) if base is not None and r is not base else None
    bar_result = evaluate_bar(rows, targets, **dict(bar or {}))
    return {"rows": rows, "targets": list(targets), "bar": bar_result, "grid": dict(grid or {}),
            "taskvec": dict(taskvec or {}), "examples": dict(examples or {}), **dict(extra or {}),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _ms(entry, digits: int = 3) -> str:
    if entry is None:
        return "–"
    if isinstance(entry, Mapping):
        mean, std = entry.get("mean"), entry.get("std")
        if mean is None:
            return "–"
        if entry.get("n", 1) > 1 and std is not None and not math.isnan(std):
            return f"{mean:.{digits}f} ± {std:.{digits}f}"
        return f"{mean:.{digits}f}"
    return f"{float(entry):.{digits}f}"


def render_replication_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the table, relative changes + the bar verdict, the validation grid, examples."""
    lines = ["# UniDetox replication", ""]
    if report.get("command"):
        lines += ["```bash", str(report["command"]), "```", ""]
    if report.get("description"):
        lines += [str(report["description"]), ""]
    header = ["method", "target", "TP", "EMT", "WikiText-2 ppl", "cond. ppl", "Distinct-1", "Distinct-2",
              "Distinct-3", "MMLU acc", "method wall time (s)"]
    lines += ["## Test prompts", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in report["rows"]:
        wall = r.get("wall_time", {}).get("total_s")
        lines.append("| " + " | ".join([
            r["label"], r["target"], _ms(r["toxicity_probability"]), _ms(r["expected_max_toxicity"]),
            _ms(r["wikitext_perplexity"], 2), _ms(r["conditional_perplexity"], 2), _ms(r["distinct_1"]),
            _ms(r["distinct_2"]), _ms(r["distinct_3"]), _ms(r["mmlu_accuracy"]),
            "–" if wall is None else f"{wall:.0f}",
        ]) + " |")
    lines += ["", "TP / EMT / cond. ppl / Distinct: mean ± std over seeds. Method wall time: making the data + "
              "fine-tuning on this machine (task vectors and inference-time decoding: training the anti-expert, + "
              "negating); decoding also pays per generated token: see tokens/s below.", ""]
    lines += ["## Relative to the base model", "",
              "| method | target | TP | EMT | WikiText-2 ppl | cond. ppl | MMLU (diff) | generation tokens/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        rel = r.get("relative_to_base") or {}
        tps = r.get("generation_tokens_per_s")
        lines.append(
            f"| {r['label']} | {r['target']} | {_pct(rel.get('toxicity_probability'))} | "
            f"{_pct(rel.get('expected_max_toxicity'))} | {_pct(rel.get('wikitext_perplexity'))} | "
            f"{_pct(rel.get('conditional_perplexity'))} | "
            f"{'–' if rel.get('mmlu_accuracy_diff') is None else format(rel['mmlu_accuracy_diff'], '+.3f')} | "
            f"{'–' if tps is None else f'{tps:.1f}'} |")
    lines += ["", f"**{report['bar']['verdict']}**", ""]
    grid = report.get("grid") or {}
    if grid.get("table"):
        choice = grid.get("choice") or {}
        lines += ["## Validation grid (smallest toxicity within the perplexity bound)", "",
                  grid_table_markdown(grid["table"]),
                  f"Chosen: `{choice.get('run')}` at step {choice.get('step')} ({choice.get('metric')}; perplexity "
                  f"{_pct(choice.get('perplexity_increase'))} vs the base, bound +{choice.get('max_ppl_increase', 0):.0%}"
                  f"{'' if choice.get('within_bound', True) else '; NO candidate was within the bound: the closest was taken'}).",
                  ""]
    taskvec = report.get("taskvec") or {}
    if taskvec.get("table"):
        choice = taskvec.get("choice") or {}
        lines += ["## Task-vector lambda on the validation prompts", "", grid_table_markdown(taskvec["table"]),
                  f"Chosen: lambda = {choice.get('config', {}).get('lambda')}.", ""]
    ex = report.get("examples") or {}
    if ex.get("examples"):
        lines += ["## Example continuations (one test prompt, seed " + str(ex.get("seed")) + ")", "",
                  f"Prompt: `{(ex.get('prompt') or '').strip()}`", ""]
        for label, items in ex["examples"].items():
            lines.append(f"- **{label}**")
            for item in items:
                text = " ".join(str(item["continuation"]).split()).replace("|", "\\|")
                score = item.get("toxicity")
                lines.append(f"  - {text!r}" + ("" if score is None else f" (toxicity {score:.2f})"))
        lines.append("")
    return "\n".join(lines)


def plot_replication(report: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """EMT and TP against WikiText-2 perplexity: one point (± std over seeds) per method and target model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r.get("wikitext_perplexity") is not None]
    if not rows:
        return None
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    markers = {t: "osD^vP*X"[i % 8] for i, t in enumerate(targets)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, metric, label in zip(axes, ("expected_max_toxicity", "toxicity_probability"),
                                 ("Expected Maximum Toxicity", "Toxicity Probability"), strict=True):
        for r in rows:
            y = r.get(metric) or {}
            ax.errorbar(r["wikitext_perplexity"], y.get("mean"), yerr=y.get("std") or 0.0, fmt=markers[r["target"]],
                        color=colors[r["method"]], capsize=3, ms=7, label=f"{r['method']} / {r['target']}")
        for r in report["rows"]:
            y = r.get(metric) or {}
            if r.get("wikitext_perplexity") is None and y.get("mean") is not None:
                # Inference-time decoding keeps the base's weights: no WikiText perplexity of its own, so its
                # toxicity is drawn as a level across the axis instead of a point.
                ax.axhline(y["mean"], color=colors.get(r["method"], "grey"), ls="--", lw=1,
                           label=f"{r['method']} / {r['target']} (no WikiText ppl)")
        ax.set_xlabel("WikiText-2 perplexity")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[1].legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Test prompts: toxicity vs perplexity (lower-left is better); colour = method, marker = target")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_replication_report(report: Mapping[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``toxicity_vs_perplexity.png`` into ``output_dir``."""
    from unidetox.evaluation.report import write_json

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(dict(report), out / "report.json")}
    md = out / "report.md"
    atomic_write_text(md, render_replication_markdown(report))
    paths["markdown"] = md
    with contextlib.suppress(ImportError):
        plot = plot_replication(report, out / "toxicity_vs_perplexity.png")
        if plot:
            paths["plot"] = plot
    return paths


__all__ = [
    "METHOD_LABELS",
    "assemble_report",
    "build_plain_sample_dataset",
    "build_text_dataset",
    "choose_configuration",
    "evaluate_bar",
    "example_continuations",
    "format_number",
    "grid_records_from_runs",
    "grid_table_markdown",
    "mmlu_noise",
    "negate_task_vector",
    "plain_sample_settings",
    "plot_replication",
    "relative_changes",
    "render_replication_markdown",
    "write_replication_report",
]

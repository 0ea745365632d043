"""Capability benchmarks of the evaluate stage: the paper's own, or lm-evaluation-harness tasks.

``backend: paper`` (the default; the replication uses it)
    The evaluate stage's 1-shot MMLU (:mod:`unidetox.evaluation.mmlu`, the authors' answer-text format) and its
    sliding-window WikiText-2 **token** perplexity (the ``mmlu`` and ``perplexity`` sections).
``backend: lm_eval``
    lm-eval on the already-loaded model (``lm_eval.models.huggingface.HFLM``), with the local-data variants of
    its stock tasks shipped in :mod:`unidetox.lm_eval_tasks` (the stock ``mmlu`` and ``wikitext`` load from the
    hub): ``mmlu`` -> ``unidetox_mmlu`` (lm-eval's letter prompt, ``acc``; 0-shot unless ``num_fewshot``) and
    ``wikitext`` -> ``unidetox_wikitext`` (lm-eval's **word** and byte perplexity of whole articles). These
    replace the paper's MMLU and WikiText-2 perplexity in that run; the numbers are not comparable with them.

Example:
    >>> from unidetox.evaluation.capabilities import CapabilitiesConfig, run_lm_eval
    >>> config = CapabilitiesConfig(backend="lm_eval", tasks=["mmlu"], limit=5)
    >>> run_lm_eval(model, tokenizer, config)  # doctest: +SKIP
    {'mmlu/acc': 0.26..., 'mmlu/acc_stderr': 0.02..., 'mmlu/num_docs': 285}
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from unidetox.lm_eval_tasks import include_path

BACKENDS = ("paper", "lm_eval")
# The names users know from lm-eval -> the local-data tasks of unidetox.lm_eval_tasks that stand in for them.
LM_EVAL_TASKS = {"mmlu": "unidetox_mmlu", "wikitext": "unidetox_wikitext"}
MMLU_SUBJECT_TASK = "unidetox_mmlu_{}"


@dataclass
class CapabilitiesConfig:
    """Which backend measures capabilities, and the lm-eval settings.

    Example:
        >>> from unidetox.evaluation.capabilities import CapabilitiesConfig
        >>> CapabilitiesConfig(backend="lm_eval", tasks=["mmlu", "wikitext"], limit=5).task_names()
        {'mmlu': ['unidetox_mmlu'], 'wikitext': ['unidetox_wikitext']}
    """

    backend: str = field(
        default="paper",
        metadata={"help": f"One of {BACKENDS}. paper: 1-shot MMLU (mmlu.*) and WikiText-2 token perplexity "
                  "(perplexity.wikitext); lm_eval: the `tasks` below through lm-evaluation-harness instead."},
    )
    tasks: list[str] = field(
        default_factory=lambda: ["mmlu", "wikitext"],
        metadata={"help": f"lm_eval: {sorted(LM_EVAL_TASKS)} (run on local data as {sorted(LM_EVAL_TASKS.values())}) "
                  "or any task/group name of the unidetox include path (python -m unidetox.lm_eval_tasks)."},
    )
    num_fewshot: int | None = field(
        default=None, metadata={"help": "lm_eval: few-shot examples per prompt; null: each task's default (0)."}
    )
    limit: int | None = field(
        default=None,
        metadata={"help": "lm_eval: documents per task (MMLU: questions per subject, the first N; WikiText: "
                  "the first N articles); null: all."},
    )
    batch_size: int = field(
        default=1,
        metadata={"help": "lm_eval: requests per forward pass. A WikiText window holds max_length x vocabulary "
                  "float32 logits (gemma3: 1 GiB per 1,024-token window), so keep it small for large vocabularies."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "lm_eval: context window in tokens (WikiText is scored in windows of this many "
                  "tokens); null: the model's own maximum (costly on CPU)."},
    )
    mmlu_subjects: list[str] | None = field(
        default=None,
        metadata={"help": "lm_eval: run MMLU on these subjects only (acc weighted by subject size); null: all 57."},
    )

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` has to be one of {BACKENDS}, but is {self.backend!r}.")
        # Checked here, not when lm-eval is first called: that comes after the models are loaded and sampled.
        if self.backend == "lm_eval" and importlib.util.find_spec("lm_eval") is None:
            raise ValueError("`backend` is lm_eval, but lm-evaluation-harness is not installed; "
                             "`pip install unidetox[lm_eval]` (or `pip install lm_eval`), or use backend=paper.")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"`tasks` has to be a non-empty list without repeats, but is {self.tasks!r}.")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"`num_fewshot` has to be null or >= 0, but is {self.num_fewshot}.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"`limit` has to be null or >= 1 (documents per task), but is {self.limit}.")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` has to be >= 1, but is {self.batch_size}.")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"`max_length` has to be null or >= 2 tokens, but is {self.max_length}.")
        if self.mmlu_subjects is not None:
            if not self.mmlu_subjects:
                raise ValueError("`mmlu_subjects` has to be null (all subjects) or a non-empty list.")
            if "mmlu" not in self.tasks:
                raise ValueError(f"`mmlu_subjects` selects MMLU subjects, but `tasks` ({self.tasks}) has no mmlu; "
                                 "add it or drop mmlu_subjects.")

    def task_names(self) -> dict[str, list[str]]:
        """Each entry of ``tasks`` -> the lm-eval tasks (or group) that measure it."""
        names = {}
        for task in self.tasks:
            if task == "mmlu" and self.mmlu_subjects is not None:
                names[task] = [MMLU_SUBJECT_TASK.format(subject) for subject in self.mmlu_subjects]
            else:
                names[task] = [LM_EVAL_TASKS.get(task, task)]
        return names


def _numbers(metrics: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.3, "acc_stderr,none": "N/A", "alias": ...}`` -> ``{"acc": 0.3}``."""
    out = {}
    for key, value in metrics.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # names, aliases and the "N/A" of metrics without a standard error
        metric, _, filter_name = key.partition(",")
        out[metric if filter_name in ("none", "all_samples") else f"{metric}/{filter_name}"] = float(value)
    return out


def flatten_results(results: dict, task_names: dict[str, list[str]]) -> dict[str, float]:
    """``simple_evaluate``'s results -> ``{"<task>/<metric>": value, "<task>/num_docs": n}``.

    A task measured by several lm-eval tasks (MMLU on chosen subjects) gets the size-weighted mean of their
    ``acc``, as lm-eval's own ``mmlu`` group aggregates it.
    """
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr

    flat: dict[str, float] = {}
    for name, lm_eval_names in task_names.items():
        sizes = [_effective_docs(results, n) for n in lm_eval_names]
        if len(lm_eval_names) == 1:
            metrics = _numbers(results["results"][lm_eval_names[0]])
        else:
            per_task = [_numbers(results["results"][n]) for n in lm_eval_names]
            metrics = {"acc": float(aggregate_subtask_metrics([m["acc"] for m in per_task], sizes))}
            if all("acc_stderr" in m for m in per_task):
                metrics["acc_stderr"] = float(pooled_sample_stderr([m["acc_stderr"] for m in per_task], sizes))
        flat.update({f"{name}/{metric}": value for metric, value in metrics.items()})
        flat[f"{name}/num_docs"] = sum(sizes)
    return flat


def _effective_docs(results: dict, lm_eval_name: str) -> int:
    """Documents lm-eval scored for a task, or for every task of a group."""
    counts = results["n-samples"]
    if lm_eval_name in counts:
        return int(counts[lm_eval_name]["effective"])
    return sum(int(counts[task]["effective"]) for task in _group_tasks(results, lm_eval_name))


def _group_tasks(results: dict, group: str) -> list[str]:
    members = []
    for child in results["group_subtasks"].get(group, []):
        members.extend(_group_tasks(results, child) if child in results["group_subtasks"] else [child])
    return members


def run_lm_eval(model, tokenizer, config: CapabilitiesConfig, data_dir=None) -> dict[str, float]:
    """Run ``config.tasks`` through lm-eval on an already-loaded model; returns a flat dict of numbers.

    The tasks come only from the unidetox include path (local data, never the hub); ``data_dir`` (default
    ``$UNIDETOX_DATA_DIR``) is where they read it.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    metadata = {"data_dir": str(Path(data_dir).expanduser())} if data_dir else None
    manager = TaskManager(include_path=include_path(), include_defaults=False, metadata=metadata)
    task_names = config.task_names()
    unknown = [n for names in task_names.values() for n in names if n not in manager.all_tasks]
    if unknown:
        known = sorted(set(LM_EVAL_TASKS) | {n for n in manager.all_tasks if not n.startswith("unidetox_mmlu_")})
        raise ValueError(f"Unknown lm-eval tasks {unknown} (capabilities.tasks / mmlu_subjects); choose from "
                         f"{known} or unidetox_mmlu_<subject>.")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, max_length=config.max_length)
    results = simple_evaluate(
        model=lm, tasks=[n for names in task_names.values() for n in names], num_fewshot=config.num_fewshot,
        limit=config.limit, task_manager=manager, log_samples=False,
    )
    return flatten_results(results, task_names)


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def capabilities_markdown(models: dict) -> list[str]:
    """``report.md`` lines: the lm-eval numbers of each model (none when the paper's backend measured them)."""
    measured = {name: m["capabilities"] for name, m in models.items() if m.get("capabilities")}
    if not measured:
        return []
    keys = list(dict.fromkeys(key for numbers in measured.values() for key in numbers))
    lines = ["", "## Capabilities (lm-evaluation-harness)", "",
             "| model | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, numbers in measured.items():
        cells = ["–" if numbers.get(key) is None else f"{numbers[key]:.4g}" for key in keys]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", "mmlu: lm-eval's letter prompt (`acc`), not the paper's 1-shot answer-text MMLU; wikitext: "
              "lm-eval's word perplexity of whole articles, not the paper's token perplexity (WikiText PPL)."]
    return lines

#!/usr/bin/env python
"""The paper's table at CPU scale: one command from the base models to a comparison with baselines (issue 7).

    accelerate launch --num_processes 1 --cpu recipes/replicate.py                 # experiment=embedded (CPU default)
    accelerate launch --num_processes 1 --cpu recipes/replicate.py experiment=tiny output_dir=/tmp/rep   # CI size
    accelerate launch recipes/replicate.py experiment=paper                        # template: GPT-2 XL -> 7B models

Every stage is another recipe's ``main(overrides)`` (so it keeps that recipe's caching and resume) or a library
piece of :mod:`unidetox.replication.baselines`; a stage whose output is complete, made with the same resolved config, is
skipped, so a rerun (or a run over directories made by hand with the same recipes) only does what is missing.
Layout under ``output_dir``:

    distill-a{A}/            recipes/distill.py per alpha (the first trains the anti-expert, the others reuse it)
    grid/{t}-a{A}-lr{LR}/    recipes/detox.py on the grid target, validation eval at step 0 and every save
    selection.json           the paper's rule over every (grid run, checkpoint): chosen (alpha, lr, steps) + table
    data/{control,nothate}/  baseline texts (plain base samples; DGHS nothate rows), as many as the distilled text
    apply/{t}-{method}/      the chosen configuration, unchanged, on every target (the grid target's UniDetox
                             model is the chosen grid checkpoint, merged; other targets train to the chosen steps)
    taskvec/lam{L}/          base - L x anti-expert delta; taskvec/validation + taskvec/selection.json pick L
    test/models/{t}-{m}/     recipes/evaluate.py on the TEST split, one model each (>= 3 seeds), its parts cached in
                             test/parts/; the base models' come right after the anti-expert (they need nothing else)
    test/                    the same over every method x target: reuses test/parts/, writes the joint report
    test/decoding/           inference-time contrastive decoding with the anti-expert (grid target only)
    report.json, report.md, toxicity_vs_perplexity.png, replicate_log.jsonl (one line per stage and run)

Several copies can share the work: start the same command N times with ``share_stages=true`` (e.g. one per GPU
with ``CUDA_VISIBLE_DEVICES``, or two single-thread copies on a CPU). Each stage is claimed through a lock file
(``output_dir/.claims/``); a copy skips what another one holds and waits for it only where its output is needed.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from unidetox.hydra_config import compose_config, parse_dataclass, save_resolved_config, to_container  # noqa: E402
from unidetox.processes import end_process_group  # noqa: E402
from unidetox.replication.baselines import format_number  # noqa: E402

logger = logging.getLogger("unidetox.recipes.replicate")
LOG_FILE = "replicate_log.jsonl"
METHODS = ("unidetox", "control", "nothate", "authors")


# ----------------------------------------------------------------------------------------------------------------
# Config sections
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TargetArguments:
    """A model the chosen configuration is applied to (one entry of `targets`)."""

    model: str = field(metadata={"help": "The base model: hub id, path or embedded name (the test's base row)."})
    overrides: list[str] = field(
        default_factory=list, metadata={"help": "detox recipe overrides that select this model, e.g. experiment=X."}
    )


@dataclass
class DistillArguments:
    """The distillation runs (recipes/distill.py), one per alpha."""

    alphas: list[float] = field(
        default_factory=lambda: [0.1, 0.2],
        metadata={"help": "Sampler alphas; the first run trains the anti-expert, the others reuse it."},
    )
    overrides: list[str] = field(default_factory=list, metadata={"help": "distill recipe overrides for every run."})

    def __post_init__(self):
        if not self.alphas or len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"`distill.alphas` has to be a non-empty list of distinct values, but is {self.alphas}.")
        bad = [a for a in self.alphas if not 0.0 < float(a) <= 1.0]
        if bad:
            raise ValueError(f"`distill.alphas` have to be in (0, 1]; got {bad}.")


@dataclass
class ValidationArguments:
    """The validation protocol of the grid (DetoxEvalCallback) and of the task-vector lambda sweep (evaluate)."""

    num_prompts: int | None = field(default=50, metadata={"help": "Validation prompts (null: the whole split)."})
    num_samples: int = field(default=10, metadata={"help": "Continuations per validation prompt."})
    max_new_tokens: int = field(default=20, metadata={"help": "New tokens per continuation."})
    seed: int = field(default=0, metadata={"help": "Sampling seed of every validation evaluation."})
    ppl_max_length: int = field(default=512, metadata={"help": "WikiText window length for the perplexity bound."})
    ppl_max_tokens: int | None = field(default=8192, metadata={"help": "WikiText tokens scored (null: all)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the validation/test split (same for both sides)."})
    validation_fraction: float = field(default=0.2, metadata={"help": "Share of prompts in the validation split."})
    evaluate_overrides: list[str] = field(
        default_factory=list, metadata={"help": "Extra evaluate overrides of the lambda sweep (e.g. the prompt source)."}
    )

    def __post_init__(self):
        for name in ("num_samples", "max_new_tokens", "ppl_max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"`validation.{name}` has to be >= 1, but is {getattr(self, name)}.")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"`validation.validation_fraction` has to be in (0, 1), but is {self.validation_fraction}.")

    def detox_overrides(self) -> list[str]:
        return [f"eval.prompts.num_prompts={_v(self.num_prompts)}", f"eval.callback.num_samples={self.num_samples}",
                f"eval.callback.max_new_tokens={self.max_new_tokens}", f"eval.callback.seed={self.seed}",
                f"eval.callback.ppl_max_length={self.ppl_max_length}",
                f"eval.callback.ppl_max_tokens={_v(self.ppl_max_tokens)}", "eval.prompts.split=validation",
                f"eval.prompts.split_seed={self.split_seed}",
                f"eval.prompts.validation_fraction={self.validation_fraction}"]

    def evaluate_overrides_for(self, models: list[str], output_dir: Path) -> list[str]:
        # The callback's measurement, through the evaluate recipe: same sampler seed, same perplexity windows
        # (stride = half the window, the callback's default), no MMLU, no reference-LM perplexity.
        return [f"models={_list(models)}", f"seeds=[{self.seed}]", f"output_dir={_q(output_dir)}",
                "prompts.split=validation", f"prompts.split_seed={self.split_seed}",
                f"prompts.validation_fraction={self.validation_fraction}", f"eval.num_prompts={_v(self.num_prompts)}",
                f"eval.num_samples={self.num_samples}", f"eval.max_new_tokens={self.max_new_tokens}",
                "mmlu.enabled=false", "perplexity.reference_model=null",
                f"perplexity.max_length={self.ppl_max_length}", f"perplexity.stride={max(1, self.ppl_max_length // 2)}",
                f"perplexity.max_tokens={_v(self.ppl_max_tokens)}", "progress=false", *self.evaluate_overrides]


@dataclass
class GridArguments:
    """The grid the single configuration is chosen on (the grid target only): alpha x learning rate x steps."""

    target: str = field(default="smollm2", metadata={"help": "Key of `targets`: the model the grid is run on."})
    learning_rates: list[float] = field(default_factory=lambda: [5e-4, 2e-4], metadata={"help": "Learning rates."})
    max_steps: int = field(default=200, metadata={"help": "Steps of every grid run (the steps axis: its saves)."})
    save_steps: int = field(default=50, metadata={"help": "A checkpoint + validation evaluation every N steps."})
    overrides: list[str] = field(default_factory=list, metadata={"help": "Extra detox overrides of the grid runs."})

    def __post_init__(self):
        if not self.learning_rates or any(lr <= 0 for lr in self.learning_rates):
            raise ValueError(f"`grid.learning_rates` has to be a non-empty list of positive values: {self.learning_rates}.")
        if not 1 <= self.save_steps <= self.max_steps:
            raise ValueError(
                f"`grid.save_steps` ({self.save_steps}) has to be in [1, grid.max_steps={self.max_steps}]: every save "
                "is a point of the grid's steps axis."
            )


@dataclass
class SelectArguments:
    """The paper's rule (unidetox.replication.baselines.choose_configuration), for the grid and for the task-vector lambda."""

    max_ppl_increase: float = field(default=0.1, metadata={"help": "Allowed relative WikiText perplexity increase."})
    metric: str = field(default="expected_max_toxicity", metadata={"help": "Toxicity metric minimised."})
    on_empty: str = field(
        default="closest", metadata={"help": "No candidate within the bound: 'raise', or take the 'closest' (reported)."}
    )


@dataclass
class BaselineArguments:
    """Which baselines run, and their settings."""

    control: bool = field(default=True, metadata={"help": "Fine-tune on plain base samples (the control)."})
    nothate: bool = field(default=True, metadata={"help": "Fine-tune on DGHS nothate rows."})
    authors: bool = field(default=True, metadata={"help": "Fine-tune on the authors' released distilled text."})
    authors_path: str | None = field(default=None, metadata={"help": "The authors' CSV."})
    authors_max_samples: int | None = field(default=None, metadata={"help": "Use only the first N texts (null: all)."})
    decoding: bool = field(default=True, metadata={"help": "Inference-time contrastive decoding (grid target)."})
    decoding_alpha: float = field(default=0.1, metadata={"help": "Alpha of inference-time decoding."})
    taskvec: bool = field(default=True, metadata={"help": "Task-vector negation of the anti-expert (grid target)."})
    lambdas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0], metadata={"help": "Lambdas to validate."})

    def __post_init__(self):
        if self.authors and not self.authors_path:
            raise ValueError("`baselines.authors_path` is empty; set it to the authors' CSV or baselines.authors=false.")
        if self.taskvec and (not self.lambdas or any(lam <= 0 for lam in self.lambdas)):
            raise ValueError(f"`baselines.lambdas` has to list positive values, but is {self.lambdas}.")


@dataclass
class TestArguments:
    """The test evaluation (recipes/evaluate.py on the TEST split)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Sampling seeds (>= 3)."})
    overrides: list[str] = field(default_factory=list, metadata={"help": "evaluate recipe overrides (sizes)."})

    def __post_init__(self):
        if len(set(self.seeds)) < 3:
            raise ValueError(f"`test.seeds` needs at least 3 distinct seeds (mean ± std), but is {self.seeds}.")


@dataclass
class BarArguments:
    """The issue's bar, judged from the numbers."""

    min_toxicity_drop: float = field(default=0.3, metadata={"help": "Required relative TP and EMT drop."})
    max_ppl_increase: float = field(default=0.1, metadata={"help": "Allowed relative WikiText perplexity rise."})


def _v(value) -> str:
    return "null" if value is None else str(value)


def _q(value) -> str:
    """A Hydra override value quoted (paths may hold '=' as the authors' CSV name does)."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _list(values) -> str:
    return "[" + ",".join(_q(v) for v in values) + "]"


def parse_config(overrides):
    """Compose ``conf/replicate.yaml`` with ``overrides`` and parse every section into its dataclass."""
    from unidetox.distill.corpus import ToxicCorpusConfig

    cfg = compose_config("replicate", overrides, free_form_groups=())
    targets = {name: parse_dataclass(section, TargetArguments) for name, section in cfg.targets.items()}
    args = {
        "targets": targets,
        "distill": parse_dataclass(cfg.distill, DistillArguments),
        "validation": parse_dataclass(cfg.validation, ValidationArguments),
        "grid": parse_dataclass(cfg.grid, GridArguments),
        "select": parse_dataclass(cfg.select, SelectArguments),
        "detox_overrides": [str(o) for o in (cfg.detox.overrides or [])],
        "apply_overrides": [str(o) for o in (cfg.apply.overrides or [])],
        "baselines": parse_dataclass({k: v for k, v in to_container(cfg.baselines).items() if k != "nothate_data"},
                                     BaselineArguments),
        "nothate_data": parse_dataclass(cfg.baselines.nothate_data, ToxicCorpusConfig),
        "test": parse_dataclass(cfg.test, TestArguments),
        "bar": parse_dataclass(cfg.bar, BarArguments),
    }
    if args["grid"].target not in targets:
        raise ValueError(f"`grid.target` {args['grid'].target!r} is not a key of `targets` ({sorted(targets)}).")
    if args["select"].on_empty not in ("raise", "closest"):
        raise ValueError(f"`select.on_empty` has to be raise or closest, but is {args['select'].on_empty!r}.")
    return cfg, args


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------
def load_recipe(name: str):
    """``recipes/<name>.py`` as a module (recipes are scripts, not a package)."""
    module_name = f"unidetox_recipe_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _normalise(obj):
    return json.loads(json.dumps(obj, default=str))


def _config_diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _config_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


class Stages:
    """Runs stages once: a finished stage (its completion file present, same resolved config) is skipped.

    Every stage appends one line to ``<output_dir>/replicate_log.jsonl`` (``ran``, ``cached`` or ``deferred``,
    wall time).

    With ``share=True`` several independent copies of the command (e.g. one per GPU, or two single-thread copies
    on a CPU) split the stages: a copy *claims* a stage through a lock file under ``<output_dir>/.claims/``
    before running it; a stage another copy holds is *deferred* and the copy moves on, and it waits for the stage
    (:meth:`wait_for`) only where the stage's output is needed. Locks die with their process, so a copy that
    was killed leaves its stage to whoever waits for it next (who then runs it)."""

    def __init__(self, output_dir: Path, is_main: bool = True, share: bool = False, poll_s: float = 30.0):
        self.out = output_dir
        self.is_main = is_main
        self.share = share
        self.poll_s = poll_s
        self.session: list[dict[str, Any]] = []
        self._deferred: dict[str, Any] = {}  # stage name -> a callable that redoes the stage's check (or runs it)

    def log(self, name: str, status: str, seconds: float, **extra) -> None:
        entry = {"stage": name, "status": status, "wall_time_s": round(seconds, 2),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), **extra}
        self.session.append(entry)
        logger.info("stage %-28s %s (%.1fs)", name, status, seconds)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / LOG_FILE).open("a") as fh:
                fh.write(json.dumps(entry) + "\n")

    def _claim_file(self, name: str) -> Path:
        return self.out / ".claims" / (name.replace("/", "__") + ".lock")

    def _try_claim(self, name: str):
        """The held claim lock of ``name``, or None when another copy holds it."""
        from filelock import FileLock, Timeout

        path = self._claim_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return None
        return lock

    def _claim(self, name: str):
        """A held lock for ``name`` (a no-op context without ``share``), or None when another copy holds it."""
        return self._try_claim(name) if self.share else contextlib.nullcontext()

    def _run_claimed(self, name: str, is_done, run, retry, ran_extra: dict | None = None, **log_extra) -> bool:
        if is_done():
            self.log(name, "cached", 0.0, **log_extra)
            return False
        claim = self._claim(name)
        if claim is None:
            self._deferred[name] = retry
            self.log(name, "deferred", 0.0, **log_extra)
            return False
        with claim:
            if self.share and is_done():  # another copy finished it between our check and our claim
                self.log(name, "cached", 0.0, **log_extra)
                return False
            start = time.perf_counter()
            run()
            gc.collect()
            self.log(name, "ran", time.perf_counter() - start, **log_extra, **(ran_extra or {}))
        return True

    def wait_for(self, *names: str) -> None:
        """Block until the named deferred stages (all deferred stages when none is named) are done elsewhere;
        a stage whose copy died is run here. Stages this copy ran or found cached return at once."""
        from filelock import FileLock, Timeout

        for name in list(names or self._deferred):
            retry = self._deferred.pop(name, None)
            if retry is None:
                continue
            start = time.perf_counter()
            lock = FileLock(str(self._claim_file(name)))
            while True:
                try:
                    lock.acquire(timeout=self.poll_s)
                    break
                except Timeout:  # still running in another copy
                    logger.info("waiting for stage %s (another copy runs it; %.0fs so far)", name,
                                time.perf_counter() - start)
            lock.release()
            self.log(name, "waited", time.perf_counter() - start)
            retry()

    def running_elsewhere(self, name: str) -> bool:
        """True while another copy holds the claim of a stage this copy deferred."""
        if name not in self._deferred:
            return False
        lock = self._try_claim(name)
        if lock is None:
            return True
        lock.release()
        return False

    def run_when_ready(self, jobs) -> None:
        """Run ``jobs`` (``[(names of the stages a job needs, job)]``) in order, except that a job whose stages
        still run in another copy waits until no other job is ready: a copy works instead of waiting."""
        pending = list(jobs)
        while pending:
            job = next((j for j in pending if not any(self.running_elsewhere(n) for n in j[0])), pending[0])
            pending.remove(job)
            self.wait_for(*job[0])
            job[1]()

    def recipe(self, name: str, recipe: str, overrides: list[str], stage_dir: Path, done_file: str,
               check=None, incremental: bool = False) -> bool:
        """Run ``recipes/<recipe>.py`` with ``overrides`` unless ``stage_dir/done_file`` exists (and ``check``
        passes) with the same resolved config. Returns True when it ran here.

        A stage made with another config is an error (its outputs would be silently mixed), except for an
        ``incremental`` stage, whose recipe caches its own work per unit with the settings that made it (the
        evaluate recipe, per model and seed): it is rerun and redoes only what changed, e.g. a baseline added to
        the model list."""
        module = load_recipe(recipe)
        cfg = module.parse_config(overrides)[0]
        wanted = _normalise(to_container(cfg))
        saved = stage_dir / "config.json"

        def is_done() -> bool:
            if saved.is_file():
                diff = _config_diff(json.loads(saved.read_text()), wanted)
                if diff and incremental:
                    logger.info("stage %s: config changed (%s); rerunning, the recipe reuses its cached parts",
                                name, "; ".join(diff[:4]))
                    return False
                if diff:
                    raise ValueError(
                        f"Stage {name}: {stage_dir} was made with another config ({'; '.join(diff[:8])}"
                        f"{'; ...' if len(diff) > 8 else ''}). Delete {stage_dir} to redo this stage, or pick another "
                        "output_dir."
                    )
            return (stage_dir / done_file).is_file() and (check is None or check(stage_dir))

        return self._run_claimed(
            name, is_done, lambda: module.main(list(overrides)),
            lambda: self.recipe(name, recipe, overrides, stage_dir, done_file, check, incremental),
            ran_extra={"overrides": overrides}, dir=str(stage_dir))

    def library(self, name: str, done, fn, stage_dir: Path):
        """Run a library stage ``fn()`` unless ``done()`` says its output is complete."""
        return self._run_claimed(name, done, fn, lambda: self.library(name, done, fn, stage_dir), dir=str(stage_dir))


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def final_model_path(run_dir: Path) -> Path:
    """The fine-tuned model of a detox run: ``merged/`` for LoRA, else the run dir itself (full fine-tuning)."""
    merged = run_dir / "merged"
    if (merged / "config.json").is_file():
        return merged
    if (run_dir / "config.json").is_file():
        return run_dir
    raise FileNotFoundError(
        f"{run_dir} holds no full model (no merged/config.json or config.json); LoRA runs need "
        "trainer.save_merged_model=true."
    )


def _detox_done(max_steps: int):
    def check(run_dir: Path) -> bool:
        summary = _read_json(run_dir / "train_summary.json") or {}
        return (summary.get("train") or {}).get("global_step") == max_steps
    return check


def _train_seconds(run_dir: Path) -> float | None:
    train = ((_read_json(run_dir / "train_summary.json") or {}).get("train") or {})
    return train.get("train_seconds_excluding_eval") or train.get("train_runtime_s")


def _link(link: Path, target: Path) -> None:
    """``link`` -> ``target`` as a relative symlink (replaced atomically when it points elsewhere)."""
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == rel:
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(rel, tmp)
    os.replace(tmp, link)


def assert_disjoint_prompts(validation_overrides: list[str], test_overrides: list[str]) -> dict[str, int]:
    """Load the grid's validation prompts and the test prompts as their recipes would, and fail on any overlap."""
    from unidetox.evaluation.prompts import load_prompts

    detox = load_recipe("detox")
    evaluate = load_recipe("evaluate")
    validation_cfg = detox.parse_config(validation_overrides)[1]["prompts"]
    _, sections, _, _ = evaluate.parse_config(test_overrides)
    test_cfg = sections["prompts"]
    if sections["eval"].num_prompts is not None:
        test_cfg.num_prompts = sections["eval"].num_prompts
    if test_cfg.split != "test" or validation_cfg.split != "validation":
        raise ValueError(f"Validation must use split=validation and test split=test; got {validation_cfg.split!r} "
                         f"and {test_cfg.split!r}.")
    if (validation_cfg.split_seed, validation_cfg.validation_fraction) != (test_cfg.split_seed,
                                                                            test_cfg.validation_fraction):
        raise ValueError("The validation and test prompts are split with different split_seed/validation_fraction, so "
                         "they may overlap; set both through `validation.split_seed` / `validation.validation_fraction`.")
    validation, test = load_prompts(validation_cfg), load_prompts(test_cfg)
    shared = {p.id for p in validation} & {p.id for p in test}
    if shared:
        raise AssertionError(f"{len(shared)} prompts are both validation and test prompts; never tune on the test set.")
    return {"validation_prompts": len(validation), "test_prompts": len(test)}


# ----------------------------------------------------------------------------------------------------------------
# Stage plans (overrides of the other recipes); pure functions of the parsed config, tested on every experiment
# ----------------------------------------------------------------------------------------------------------------
def anti_expert_dir(args, out: Path) -> Path:
    """The one anti-expert of the experiment: trained by the first distillation run."""
    return out / f"distill-a{format_number(float(args['distill'].alphas[0]))}" / "anti_expert"


def plan_distill(args, out: Path, data_dir: str) -> dict[float, tuple[Path, list[str]]]:
    """``{alpha: (run dir, distill overrides)}``; runs after the first reuse the first run's anti-expert."""
    plan = {}
    for i, alpha in enumerate(float(a) for a in args["distill"].alphas):
        run_dir = out / f"distill-a{format_number(alpha)}"
        ov = [*args["distill"].overrides, f"output_dir={_q(run_dir)}", f"sampler.alpha={alpha}", data_dir]
        if i > 0:  # one anti-expert for the whole sweep: only the contrast's alpha changes
            ov.append(f"anti_expert.pretrained_path={_q(anti_expert_dir(args, out))}")
        plan[alpha] = (run_dir, ov)
    return plan


def detox_run_overrides(args, target: TargetArguments, data_path, run_dir, lr: float, steps: int, save_steps: int,
                        extra: list[str], data_dir: str) -> list[str]:
    """detox overrides of one fine-tuning run: the target, the shared configuration, data, lr and steps."""
    return [*target.overrides, *args["detox_overrides"], f"data.path={_q(data_path)}", f"output_dir={_q(run_dir)}",
            f"trainer.learning_rate={float(lr)!r}", f"trainer.max_steps={steps}", f"trainer.save_steps={save_steps}",
            *extra, data_dir]


def apply_run_overrides(args, target: TargetArguments, data_path, run_dir, lr: float, chosen_steps: int,
                        extra: list[str], data_dir: str) -> list[str]:
    """detox overrides that apply the chosen configuration (a grid run's checkpoint) to a target.

    A checkpoint from the middle of a grid run was trained under the learning-rate schedule of ``grid.max_steps``,
    not under one that ends at its step: train under that schedule and stop at the chosen step
    (``trainer.stop_at_step``). At the grid's last step this is a plain run of ``chosen_steps``."""
    max_steps = args["grid"].max_steps
    if chosen_steps < max_steps:
        return detox_run_overrides(args, target, data_path, run_dir, lr, max_steps, chosen_steps,
                                   [*extra, f"++trainer.stop_at_step={chosen_steps}"], data_dir)
    return detox_run_overrides(args, target, data_path, run_dir, lr, chosen_steps, chosen_steps, extra, data_dir)


def plan_grid(args, out: Path, data_dir: str) -> dict[str, tuple[dict, Path, list[str]]]:
    """``{run name: (hyperparameters, run dir, detox overrides)}`` for alpha x learning rate on the grid target."""
    grid, val = args["grid"], args["validation"]
    target = args["targets"][grid.target]
    plan = {}
    for alpha in (float(a) for a in args["distill"].alphas):
        for lr in grid.learning_rates:
            name = f"{grid.target}-a{format_number(alpha)}-lr{format_number(lr)}"
            run_dir = out / "grid" / name
            data_path = out / f"distill-a{format_number(alpha)}" / "distilled"
            ov = detox_run_overrides(args, target, data_path, run_dir, float(lr), grid.max_steps, grid.save_steps,
                                     [*val.detox_overrides(), *grid.overrides], data_dir)
            plan[name] = ({"alpha": alpha, "learning_rate": float(lr)}, run_dir, ov)
    return plan


# ----------------------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------------------
def main(overrides: list[str] | None = None) -> dict:
    from unidetox.evaluation.report import read_jsonl, write_json
    from unidetox.processes import process_state
    from unidetox.replication.baselines import (
        assemble_report,
        choose_configuration,
        example_continuations,
        grid_records_from_runs,
        write_replication_report,
    )

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = sys.argv[1:] if overrides is None else list(overrides)
    cfg, args = parse_config(overrides)
    state = process_state()
    out = Path(str(cfg.output_dir))
    data_dir = f"++data_dir={_q(cfg.data_dir)}"
    share = bool(cfg.get("share_stages", False))
    if share and state.num_processes > 1:
        raise ValueError("share_stages=true splits the stages between independent single-process copies of this "
                         f"command, but this one runs {state.num_processes} processes; launch one copy per device "
                         "(e.g. CUDA_VISIBLE_DEVICES=i accelerate launch --num_processes 1 ...) or set share_stages=false.")
    stages = Stages(out, is_main=state.is_main_process, share=share)
    if state.is_main_process:
        save_resolved_config(cfg, out)
    targets, grid, val, sel, base_args = (args["targets"], args["grid"], args["validation"], args["select"],
                                          args["baselines"])
    grid_target = targets[grid.target]
    started = time.perf_counter()

    # ---- 1. anti-expert + distilled text per alpha --------------------------------------------------------------
    distill_plan = plan_distill(args, out, data_dir)
    alphas = list(distill_plan)
    distill_dirs = {a: d for a, (d, _) in distill_plan.items()}
    anti_expert = anti_expert_dir(args, out)
    grid_plan = plan_grid(args, out, data_dir)
    test_dir = out / "test"

    def test_overrides(models, output_dir, extra=()):
        return [*args["test"].overrides, f"models={_list(models)}",
                f"seeds=[{','.join(str(s) for s in args['test'].seeds)}]", f"output_dir={_q(output_dir)}",
                "prompts.split=test", f"prompts.split_seed={val.split_seed}",
                f"prompts.validation_fraction={val.validation_fraction}", *extra, data_dir]

    def model_test_stage(label: str, model) -> None:
        """One model on the test prompts; its parts (test/parts/) are what the full test stage reports."""
        stage_dir = test_dir / "models" / label
        stages.recipe(f"test/{label}", "evaluate",
                      test_overrides([str(model)], stage_dir, [f"parts_dir={_q(test_dir / 'parts')}"]),
                      stage_dir, "report.json", incremental=True)

    decoding_key = None
    # Never tune on the test set: checked before any test prompt is used.
    split_info = assert_disjoint_prompts(next(iter(grid_plan.values()))[2], test_overrides([grid_target.model], test_dir))
    for i, (alpha, (run_dir, ov)) in enumerate(distill_plan.items()):
        if i > 0:  # reuses the first run's anti-expert
            stages.wait_for(f"distill-a{format_number(alphas[0])}")
        stages.recipe(f"distill-a{format_number(alpha)}", "distill", ov, run_dir, "distill_run.json",
                      check=lambda d: (d / "distilled" / "metadata.json").is_file())
        if i == 0:
            # What needs only the base models and the anti-expert comes early: with share_stages another copy
            # does it while this one trains the anti-expert and distills.
            for tname, target in targets.items():
                model_test_stage(f"{tname}-base", target.model)
            if base_args.decoding:
                dec_dir = test_dir / "decoding"
                dec_ov = test_overrides([grid_target.model], dec_dir, [
                    f"decoding.anti_expert={_q(anti_expert)}", f"decoding.alpha={base_args.decoding_alpha}",
                    "decoding.also_plain=false"])
                stages.wait_for(f"distill-a{format_number(alpha)}")
                stages.recipe("test/decoding", "evaluate", dec_ov, dec_dir, "report.json", incremental=True)

    # ---- 2. the grid on the grid target ------------------------------------------------------------------------
    grid_runs = {name: (config, run_dir) for name, (config, run_dir, _) in grid_plan.items()}
    for name, (config, run_dir, ov) in grid_plan.items():
        stages.wait_for(f"distill-a{format_number(config['alpha'])}")
        stages.recipe(f"grid/{name}", "detox", ov, run_dir, "train_summary.json", check=_detox_done(grid.max_steps))
    stages.wait_for()

    # ---- 3. the single configuration -----------------------------------------------------------------------------
    records = grid_records_from_runs(grid_runs)
    choice, table = choose_configuration(records, sel.max_ppl_increase, sel.metric, sel.on_empty)
    chosen_alpha, chosen_lr = choice["config"]["alpha"], choice["config"]["learning_rate"]
    chosen_steps = int(choice["step"])
    selection = {"choice": choice, "table": table, "rule": {"max_ppl_increase": sel.max_ppl_increase,
                                                            "metric": sel.metric, "on_empty": sel.on_empty}}
    old = _read_json(out / "selection.json")
    if old == _normalise(selection):
        stages.log("selection", "cached", 0.0)
    else:
        if state.is_main_process:
            write_json(selection, out / "selection.json")
        stages.log("selection", "ran", 0.0, choice={k: choice[k] for k in ("run", "step", "config")})
    chosen_distilled = distill_dirs[chosen_alpha] / "distilled"
    distilled_meta = _read_json(chosen_distilled / "metadata.json") or {}

    # ---- 4. baseline data ------------------------------------------------------------------------------------
    data_paths = {"unidetox": chosen_distilled}
    if base_args.control:
        from unidetox.replication.baselines import build_plain_sample_dataset, plain_sample_settings

        control_dir = out / "data" / "control"

        def make_control():
            from unidetox.models import load_model_and_tokenizer

            base_name = distilled_meta.get("base") or grid_target.model
            model, tokenizer = load_model_and_tokenizer(base_name)
            build_plain_sample_dataset(model, tokenizer, output_dir=control_dir, base_id=base_name,
                                       show_progress=state.is_main_process, **plain_sample_settings(distilled_meta))

        if state.is_main_process:
            stages.library("data/control", lambda: (control_dir / "metadata.json").is_file(), make_control,
                           control_dir)
        state.wait_for_everyone()
        data_paths["control"] = control_dir
    if base_args.nothate:
        from unidetox.replication.baselines import build_text_dataset

        nothate_dir = out / "data" / "nothate"
        if state.is_main_process:
            stages.library("data/nothate", lambda: (nothate_dir / "metadata.json").is_file(),
                           lambda: build_text_dataset(args["nothate_data"], int(distilled_meta["num_samples"]),
                                                      nothate_dir), nothate_dir)
        state.wait_for_everyone()
        data_paths["nothate"] = nothate_dir
    if base_args.authors:
        data_paths["authors"] = Path(base_args.authors_path)

    # ---- 5. apply the chosen configuration unchanged -------------------------------------------------------------
    apply_models: dict[tuple[str, str], Path] = {}
    apply_stage: dict[tuple[str, str], str] = {}  # the stage that makes each model
    unresolved: set[tuple[str, str]] = set()  # run dirs whose model path is known once their stage is done
    chosen_run_dir = grid_runs[choice["run"]][1]
    chosen_checkpoint = Path(choice["checkpoint"])
    for tname, target in targets.items():
        for method, data_path in data_paths.items():
            run_dir = out / "apply" / f"{tname}-{method}"
            if method == "unidetox" and tname == grid.target:
                # The grid already trained this model with this configuration: reuse its chosen checkpoint.
                def reuse(run_dir=run_dir):
                    from unidetox.detox.merge import merge_lora_checkpoint

                    merged = chosen_checkpoint / "merged"
                    source = chosen_checkpoint
                    if (chosen_checkpoint / "adapter_config.json").is_file():
                        if not (merged / "config.json").is_file():
                            merge_lora_checkpoint(chosen_checkpoint, merged)
                        source = merged
                    _link(run_dir / "model", source)
                    write_json({"reused_from": str(chosen_run_dir), "checkpoint": str(chosen_checkpoint),
                                "step": chosen_steps, "model": str(source)}, run_dir / "source.json")

                if state.is_main_process:
                    stages.library(f"apply/{tname}-{method}",
                                   lambda run_dir=run_dir: (_read_json(run_dir / "source.json") or {}).get("checkpoint")
                                   == str(chosen_checkpoint) and (run_dir / "model" / "config.json").is_file(),
                                   reuse, run_dir)
                state.wait_for_everyone()
                apply_models[(tname, method)] = run_dir / "model"
                apply_stage[(tname, method)] = f"apply/{tname}-{method}"
                continue
            extra = list(args["apply_overrides"])
            if method == "authors" and base_args.authors_max_samples is not None:
                extra.append(f"data.max_samples={base_args.authors_max_samples}")
            ov = apply_run_overrides(args, target, data_path, run_dir, float(chosen_lr), chosen_steps, extra,
                                     data_dir)
            stages.wait_for(f"data/{method}")
            stages.recipe(f"apply/{tname}-{method}", "detox", ov, run_dir, "train_summary.json",
                          check=_detox_done(chosen_steps))
            apply_models[(tname, method)] = run_dir
            apply_stage[(tname, method)] = f"apply/{tname}-{method}"
            unresolved.add((tname, method))

    # ---- 6. task vectors (grid target), lambda on the validation prompts -----------------------------------------
    taskvec = None
    if base_args.taskvec:
        from unidetox.replication.baselines import negate_task_vector

        lam_dirs = {float(lam): out / "taskvec" / f"lam{format_number(lam)}" for lam in base_args.lambdas}
        for lam, lam_dir in lam_dirs.items():
            if state.is_main_process:
                stages.library(
                    f"taskvec/lam{format_number(lam)}",
                    lambda lam=lam, lam_dir=lam_dir: ((_read_json(lam_dir / "unidetox_task_vector.json") or {})
                                                      .get("settings", {}).get("lambda") == lam),
                    lambda lam=lam, lam_dir=lam_dir: negate_task_vector(grid_target.model, anti_expert, lam, lam_dir),
                    lam_dir)
            state.wait_for_everyone()
        val_dir = out / "taskvec" / "validation"
        models = [grid_target.model, *[str(d) for d in lam_dirs.values()]]
        stages.wait_for(*[f"taskvec/lam{format_number(lam)}" for lam in lam_dirs])
        stages.recipe("taskvec/validation", "evaluate", [*val.evaluate_overrides_for(models, val_dir), data_dir],
                      val_dir, "report.json", incremental=True)
        stages.wait_for("taskvec/validation")
        val_report = _read_json(val_dir / "report.json")
        tv_records = []
        for key, lam in [(grid_target.model, 0.0), *[(str(d), lam) for lam, d in lam_dirs.items()]]:
            m = val_report["models"][key]
            tv_records.append({"run": "base" if lam == 0.0 else f"lam{format_number(lam)}", "step": 0 if lam == 0 else 1,
                               "baseline": lam == 0.0, "config": {"lambda": lam}, "checkpoint": key,
                               "toxicity_probability": m["toxicity_probability"]["mean"],
                               "expected_max_toxicity": m["expected_max_toxicity"]["mean"],
                               "perplexity": m["wikitext_perplexity"]["perplexity"]})
        tv_choice, tv_table = choose_configuration(tv_records, sel.max_ppl_increase, sel.metric, sel.on_empty)
        taskvec = {"choice": tv_choice, "table": tv_table}
        if state.is_main_process and _read_json(out / "taskvec" / "selection.json") != _normalise(taskvec):
            write_json(taskvec, out / "taskvec" / "selection.json")
        apply_models[(grid.target, "taskvec")] = Path(tv_choice["checkpoint"])
        apply_stage[(grid.target, "taskvec")] = "taskvec/validation"

    # ---- 7. test evaluation --------------------------------------------------------------------------------------
    def test_model(key):
        if key in unresolved:  # its stage is done by now (here or in another copy)
            apply_models[key] = final_model_path(apply_models[key])
            unresolved.discard(key)
        model_test_stage(f"{key[0]}-{key[1]}", apply_models[key])

    stages.run_when_ready([([apply_stage[key]], lambda key=key: test_model(key)) for key in apply_models])
    stages.wait_for()  # every model's parts
    test_models = [t.model for t in targets.values()] + [str(p) for p in apply_models.values()]
    stages.recipe("test", "evaluate", test_overrides(test_models, test_dir), test_dir, "report.json", incremental=True)
    stages.wait_for()
    test_reports = [_read_json(test_dir / "report.json")]
    if base_args.decoding:
        dec_report = _read_json(dec_dir / "report.json")
        test_reports.append(dec_report)
        decoding_key = next(iter(dec_report["models"]))

    # ---- 8. the report ---------------------------------------------------------------------------------------
    all_models = {k: v for r in test_reports for k, v in r["models"].items()}
    ae_run = _read_json(distill_dirs[alphas[0]] / "distill_run.json") or {}
    ae_seconds = ((ae_run.get("stages") or {}).get("anti_expert") or {}).get("train_wall_time_s") or 0.0

    def distill_seconds(alpha):
        meta = _read_json(distill_dirs[alpha] / "distilled" / "metadata.json") or {}
        return meta.get("generation_time_s") or 0.0

    methods = []
    for tname, target in targets.items():
        methods.append({"method": "base", "target": tname, "model_key": target.model, "wall_time": {"total_s": None}})
        for method in data_paths:
            path = apply_models[(tname, method)]
            if method == "unidetox" and tname == grid.target:
                train_s = (_train_seconds(chosen_run_dir) or 0.0) * chosen_steps / grid.max_steps
            else:
                train_s = _train_seconds(path.parent if path.name == "merged" else path) or 0.0
            data_s = {"unidetox": ae_seconds + distill_seconds(chosen_alpha),
                      "control": (_read_json(out / "data" / "control" / "metadata.json") or {}).get(
                          "generation_time_s", 0.0)}.get(method, 0.0)
            methods.append({"method": method, "target": tname, "model_key": str(path),
                            "wall_time": {"data_s": data_s, "train_s": train_s, "total_s": data_s + train_s}})
    if decoding_key is not None:
        methods.append({"method": "decoding", "target": grid.target, "model_key": decoding_key,
                        "wall_time": {"data_s": ae_seconds, "train_s": 0.0, "total_s": ae_seconds}})
    if taskvec is not None:
        lam_marker = _read_json(Path(taskvec["choice"]["checkpoint"]) / "unidetox_task_vector.json") or {}
        neg_s = lam_marker.get("wall_time_s", 0.0)
        methods.append({"method": "taskvec", "target": grid.target, "model_key": taskvec["choice"]["checkpoint"],
                        "wall_time": {"data_s": ae_seconds, "train_s": neg_s, "total_s": ae_seconds + neg_s}})
    generations = read_jsonl(test_dir / "generations.jsonl")
    if decoding_key is not None:
        generations += read_jsonl(test_dir / "decoding" / "generations.jsonl")
    labels = {f"{m['method']} / {m['target']}": m["model_key"] for m in methods}
    examples = example_continuations(generations, labels, num_examples=4)
    command = "accelerate launch --num_processes 1 --cpu recipes/replicate.py " + " ".join(overrides)
    report = assemble_report(
        methods, all_models, list(targets), grid=selection, taskvec=taskvec, examples=examples,
        bar={"min_toxicity_drop": args["bar"].min_toxicity_drop, "max_ppl_increase": args["bar"].max_ppl_increase},
        extra={"command": command.strip(), "output_dir": str(out), "prompts": split_info,
               "test": {"seeds": args["test"].seeds, "overrides": args["test"].overrides,
                        "scorer": test_reports[0].get("scorer"), "eval": test_reports[0].get("eval"),
                        "reference_model": test_reports[0].get("reference_model")},
               "config": to_container(cfg),
               "description": (
                   f"Chosen on {split_info['validation_prompts']} validation prompts: alpha {chosen_alpha}, lr "
                   f"{format_number(chosen_lr)}, {chosen_steps} steps (the rule: least {sel.metric} within "
                   f"+{sel.max_ppl_increase:.0%} WikiText-2 perplexity). Test: {split_info['test_prompts']} prompts, "
                   f"seeds {args['test'].seeds}.")},
    )
    report.pop("created_at", None)
    old = _read_json(out / "report.json")
    if old == _normalise(report):
        stages.log("report", "cached", 0.0)
    else:
        if state.is_main_process:
            write_replication_report(report, out)
        stages.log("report", "ran", 0.0)
    if state.is_main_process:
        print((out / "report.md").read_text(), flush=True)
        logger.info("Replication done in %.0fs: %s", time.perf_counter() - started, out / "report.md")
    state.wait_for_everyone()
    return {"report": report, "stages": stages.session}


if __name__ == "__main__":
    main()
    end_process_group()

"""The ``unidetox`` command: ``unidetox distill|detox|evaluate|replicate [Hydra overrides]``, and
``unidetox rescore RUN_DIR [key=value ...]`` to re-score a finished run's stored continuations.

Each command composes the same config as the recipe of the same name (``recipes/<command>.py``) and calls the same
pipeline, so both write the same outputs. Under several processes, launch the module:

    accelerate launch -m unidetox.cli distill distill.num_samples=256
    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml -m unidetox.cli detox experiment=paper_llama2_7b
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from unidetox.detox import pipeline as detox_pipeline
from unidetox.distill import pipeline as distill_pipeline
from unidetox.evaluation import pipeline as evaluate_pipeline
from unidetox.evaluation import rescore
from unidetox.hydra_config import CONF_DIR
from unidetox.logging_setup import configure_logging
from unidetox.processes import end_process_group
from unidetox.replication import pipeline as replicate_pipeline
from unidetox.version import __version__

# command -> (pipeline module, what it does, the overrides users reach for first)
COMMANDS: dict[str, tuple[Any, str, tuple[str, ...]]] = {
    "distill": (
        distill_pipeline,
        "train the anti-expert on toxic text, then distill detoxifying text by contrastive decoding",
        ("output_dir=runs/my-distill", "experiment=embedded_gemma3", "distill.num_samples=640",
         "distill.max_length=256", "sampler.alpha=0.1", "anti_expert.pretrained_path=DIR", "seed=1"),
    ),
    "detox": (
        detox_pipeline,
        "fine-tune any model on the distilled text, validate every save, choose the checkpoint",
        ("experiment=embedded_gemma3", "data.path=runs/distill-default", "model=HUB_ID_OR_PATH",
         "trainer.learning_rate=2e-4", "trainer.max_steps=100", "trainer.save_steps=25", "++trainer.stop_at_step=50",
         "trainer=paper", "peft.use_peft=false", "eval.enabled=false", "output_dir=runs/my-detox"),
    ),
    "evaluate": (
        evaluate_pipeline,
        "toxicity (TP/EMT), perplexity, Distinct-n and MMLU of several models -> report.{json,md}",
        ("models=[smollm2-135m,runs/my-detox/merged]", "prompts.num_prompts=100", "eval.num_samples=10",
         "seeds=[0,1,2]", "prompts.split=test", "scorer=detoxify", "mmlu.limit=2", "perplexity.max_tokens=20000",
         "decoding.anti_expert=DIR", "output_dir=runs/eval"),
    ),
    "replicate": (
        replicate_pipeline,
        "the paper's table: anti-expert, distillation, grid, one configuration applied, baselines, test report",
        ("experiment=embedded", "experiment=tiny", "output_dir=runs/replicate-x", "launcher.engine=submitit",
         "baselines.taskvec=false", "grid.learning_rates=[5e-4,2e-4]", "grid.max_steps=100"),
    ),
    "rescore": (
        rescore,
        "re-score a finished evaluate/replicate run's stored continuations with another scorer, side by side",
        ("scorer=jigsaw_bilstm", "scorer.label=identity_hate", "scorer=detoxify scorer.checkpoint=PATH.ckpt",
         "output_dir=runs/eval/rescore-x", "reference=MODEL_KEY", "num_resamples=2000"),
    ),
}
# Commands that take a run directory and key=value overrides of their arguments dataclass (no Hydra config).
RUN_DIR_COMMANDS = ("rescore",)


def command_help(command: str) -> str:
    """The config groups (with their options), top-level keys and common overrides of one command."""
    pipeline, summary, common = COMMANDS[command]
    if command in RUN_DIR_COMMANDS:
        return "\n".join([f"usage: unidetox {command} RUN_DIR [KEY=VALUE ...]", "", f"{command}: {summary}.", "",
                          "Keys: " + " ".join(pipeline.parse_args.__doc__.split()), "", "Common overrides:",
                          *[f"  {o}" for o in common]])
    lines = [f"usage: unidetox {command} [OVERRIDE ...]", "", f"{command}: {summary}.", "",
             f"Config: {CONF_DIR / (command + '.yaml')}", "", "Config groups (GROUP=OPTION):"]
    group_dirs = sorted(p for p in (CONF_DIR / command).glob("*") if p.is_dir())
    if command in ("distill", "detox"):
        group_dirs.append(CONF_DIR / "model")
    for group in group_dirs:
        options = sorted(p.stem for p in group.glob("*.yaml"))
        lines.append(f"  {group.name:<12} {', '.join(options)}")
    lines += ["", "Common overrides:", *[f"  {o}" for o in common], "",
              "Any key of the composed config can be overridden as key=value (Hydra syntax); quote values that "
              "contain '=' or spaces: 'data.path=\"a=b.csv\"'."]
    return "\n".join(lines)


def main_help() -> str:
    lines = [f"unidetox {__version__}: UniDetox (Lu et al., ICLR 2025) for any HuggingFace causal LM.", "",
             "usage: unidetox COMMAND [OVERRIDE ...]    (unidetox COMMAND --help for its config groups)",
             "       unidetox rescore RUN_DIR [KEY=VALUE ...]", "",
             "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary, _) in COMMANDS.items()]
    lines += ["", "Under several processes: accelerate launch -m unidetox.cli COMMAND [OVERRIDE ...]"]
    return "\n".join(lines)


def run_command(command: str, overrides: Sequence[str]):
    """Parse ``overrides`` for ``command`` and run its pipeline; returns the pipeline's result."""
    if command not in COMMANDS:
        raise SystemExit(f"unidetox: unknown command {command!r}; choose one of {', '.join(COMMANDS)}.")
    pipeline = COMMANDS[command][0]
    return pipeline.run(pipeline.parse_args(list(overrides)))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(main_help())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unidetox: unknown command {command!r}.\n\n{main_help()}", file=sys.stderr)
        return 2
    if any(o in ("-h", "--help") for o in overrides):
        print(command_help(command))
        return 0
    configure_logging()
    run_command(command, overrides)
    end_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())


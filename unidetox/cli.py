"""The ``unidetox`` command: ``unidetox distill|detox|evaluate|replicate [Hydra overrides]``, and
``unidetox rescore RUN_DIR [key=value ...]`` to re-score a finished run's stored continuations.

Each command composes the same config as the recipe of the same name (``recipes/<command>.py``) and calls the same
pipeline, so both write the same outputs. Under several processes, launch the module:

    accelerate launch -m unidetox.cli distill distill.num_samples=256
    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml -m unidetox.cli detox experiment=paper_llama2_7b
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import textwrap
from collections.abc import Sequence

from unidetox import embedded_models
from unidetox.config_keys import SECTION_DATACLASSES, section_fields
from unidetox.hydra_config import CONF_DIR, FREE_FORM_GROUPS, compose_config
from unidetox.logging_setup import configure_logging
from unidetox.processes import end_process_group
from unidetox.secret_masking import mask_secrets
from unidetox.version import __version__

# The pipelines import torch, transformers and trl: they are imported only to run a command (by name, from this
# table), so that --help, --cfg job and the errors in the command line come back at once; the modules imported above
# import Hydra, OmegaConf, torch and transformers only inside the functions that use them.
# command -> (pipeline module, what it does, the overrides users reach for first)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "distill": (
        "unidetox.distill.pipeline",
        "train the anti-expert on toxic text, then distill detoxifying text by contrastive decoding",
        ("output_dir=runs/my-distill", "experiment=embedded_gemma3", "distill.num_samples=640",
         "distill.max_length=256", "sampler.alpha=0.1", "anti_expert.pretrained_path=DIR", "seed=1"),
    ),
    "detox": (
        "unidetox.detox.pipeline",
        "fine-tune any model on the distilled text, validate every save, choose the checkpoint",
        ("experiment=embedded_gemma3", "data.path=runs/distill-default", "model=HUB_ID_OR_PATH",
         "trainer.learning_rate=2e-4", "trainer.max_steps=100", "trainer.save_steps=25", "trainer.stop_at_step=50",
         "trainer=paper", "peft.use_peft=false", "eval.enabled=false", "output_dir=runs/my-detox"),
    ),
    "evaluate": (
        "unidetox.evaluation.pipeline",
        "toxicity (TP/EMT), perplexity, Distinct-n and MMLU of several models -> report.{json,md}",
        ("models=[smollm2-135m,runs/my-detox/merged]", "prompts.num_prompts=100", "eval.num_samples=10",
         "seeds=[0,1,2]", "prompts.split=test", "scorer=detoxify", "mmlu.limit=2", "perplexity.max_tokens=20000",
         "decoding.anti_expert=DIR", "output_dir=runs/eval"),
    ),
    "replicate": (
        "unidetox.replication.pipeline",
        "the paper's table: anti-expert, distillation, grid, one configuration applied, baselines, test report",
        ("experiment=embedded", "experiment=tiny", "output_dir=runs/replicate-x", "launcher.engine=submitit",
         "baselines.taskvec=false", "grid.learning_rates=[5e-4,2e-4]", "grid.max_steps=100"),
    ),
    "rescore": (
        "unidetox.evaluation.rescore",
        "re-score a finished evaluate/replicate run's stored continuations with another scorer, side by side",
        ("scorer=jigsaw_bilstm", "scorer.label=identity_hate", "scorer=detoxify scorer.checkpoint=PATH.ckpt",
         "output_dir=runs/eval/rescore-x", "reference=MODEL_KEY", "num_resamples=2000"),
    ),
}
# Commands that take a run directory and key=value overrides of their arguments dataclass (no Hydra config).
RUN_DIR_COMMANDS = ("rescore",)


TRACEBACK_ENV = "UNIDETOX_TRACEBACK"
# Mistakes in a command line, a config or the files it names: reported in one line (the message names the fix);
# any other exception is a bug, and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, ImportError)
PATH_COMMAND = "path"


def _wrapped(text: str, indent: int) -> list[str]:
    return textwrap.wrap(text, width=118, initial_indent=" " * indent, subsequent_indent=" " * indent)


def keys_help(command: str, only: Sequence[str] = ()) -> list[str]:
    """Every field of each config section of ``command`` (those in ``only``, when given): its type, default and help
    text, from the dataclass that parses the section (:mod:`unidetox.config_keys`)."""
    sections = section_fields(command)
    for name in only:
        if name not in sections:
            raise ValueError(f"--help {name}: {command} has no config section {name!r};{_nearest(name, list(sections))}"
                             f" Its sections are {', '.join(s or '(top level)' for s in sections)}.")
    lines = []
    for section, keys in sections.items():
        if only and section not in only:
            continue
        dataclass_name = SECTION_DATACLASSES[command][section].partition(":")[2]
        lines += ["", f"{section or 'top level'} ({dataclass_name}):"]
        for name, key in sorted(keys.items()):
            lines.append(f"  {section + '.' if section else ''}{name}: {key['type']} = {key['default']}")
            lines += _wrapped(key["help"], 6)
    return lines


def command_help(command: str, only: Sequence[str] = ()) -> str:
    """The usage, config groups (with their options), common overrides and every key of one command (of the
    sections in ``only``, when given)."""
    _, summary, common = COMMANDS[command]
    if command in RUN_DIR_COMMANDS:
        lines = [f"usage: unidetox {command} RUN_DIR [KEY=VALUE ...]", "", f"{command}: {summary}."]
    else:
        lines = [f"usage: unidetox {command} [OVERRIDE ...]     (--cfg job: print the composed config and exit)",
                 "", f"{command}: {summary}.", "", f"Config: {CONF_DIR / (command + '.yaml')}", "",
                 "Config groups (GROUP=OPTION):"]
        group_dirs = sorted(p for p in (CONF_DIR / command).glob("*") if p.is_dir())
        group_dirs += [CONF_DIR / group for group in FREE_FORM_GROUPS.get(command, ())]  # shared by the recipes
        for group in group_dirs:
            options = sorted(p.stem for p in group.glob("*.yaml"))
            lines.append(f"  {group.name:<12} {', '.join(options)}")
    lines += ["", "Common overrides:", *[f"  {o}" for o in common], ""]
    how = (")" if command in RUN_DIR_COMMANDS else
           "; the config's own values: --cfg job). Each is set as section.key=value, listed in the config or not, "
           "lists as key=[a,b]; quote values that contain '=' or spaces: 'data.path=\"a=b.csv\"'")
    lines += _wrapped(f"Keys (section.key: type = the dataclass default{how}. `--help SECTION` lists one section's "
                      f"keys. Errors are one line; {TRACEBACK_ENV}=1 shows the traceback.", 0)
    return "\n".join(lines + keys_help(command, only))


def main_help() -> str:
    lines = [f"unidetox {__version__}: UniDetox (Lu et al., ICLR 2025) for any HuggingFace causal LM.", "",
             "usage: unidetox COMMAND [OVERRIDE ...]    (unidetox COMMAND --help: every key with its meaning)",
             "       unidetox COMMAND [OVERRIDE ...] --cfg job    (print the composed config and exit)",
             "       unidetox rescore RUN_DIR [KEY=VALUE ...]",
             "       unidetox path MODEL    (an embedded model's local directory, e.g. for lm_eval --model_args)", "",
             "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary, _) in COMMANDS.items()]
    lines += [f"  {PATH_COMMAND:<10} print the local path of an embedded model "
              f"({', '.join(embedded_models.EMBEDDED_MODELS)}), provisioning it on first use", "",
              "Under several processes: accelerate launch -m unidetox.cli COMMAND [OVERRIDE ...]",
              f"Errors are one line naming the fix; {TRACEBACK_ENV}=1 shows the traceback."]
    return "\n".join(lines)


def _nearest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" did you mean {close[0]}?" if close else ""


def unknown_command_error(command: str) -> str:
    """``unidetox: unknown command 'distil': did you mean distill? ...``, one line."""
    names = [*COMMANDS, PATH_COMMAND]
    return (f"unidetox: unknown command {command!r}:{_nearest(command, names)} The commands are "
            f"{', '.join(names)} (unidetox --help).")


def _config_request(overrides: list[str]) -> tuple[str | None, list[str]]:
    """Hydra's ``--cfg WHAT`` / ``-c WHAT`` / ``--cfg=WHAT``: ``(WHAT, the other overrides)``; WHAT is None without."""
    for i, arg in enumerate(overrides):
        if arg in ("--cfg", "-c"):
            if i + 1 == len(overrides):
                raise ValueError(f"{arg} needs what to print: {arg} job (the composed config).")
            return overrides[i + 1], overrides[:i] + overrides[i + 2:]
        if arg.startswith("--cfg="):
            return arg.partition("=")[2], overrides[:i] + overrides[i + 1:]
    return None, overrides


def composed_config_yaml(command: str, overrides: Sequence[str]) -> str:
    """The config ``command`` runs with, as YAML, secrets masked (Hydra's ``--cfg job``)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(mask_secrets(compose_config(command, list(overrides)))))


def run_command(command: str, overrides: Sequence[str]):
    """Parse ``overrides`` for ``command`` and run its pipeline; returns the pipeline's result.

    The config is composed first, before the pipeline (and torch) is imported, so that a wrong key or group option
    fails in about a second.
    """
    if command not in COMMANDS:
        raise ValueError(unknown_command_error(command))
    if command not in RUN_DIR_COMMANDS:
        compose_config(command, list(overrides))
    pipeline = importlib.import_module(COMMANDS[command][0])
    return pipeline.run(pipeline.parse_args(list(overrides)))


def print_model_path(args: Sequence[str]) -> None:
    """``unidetox path NAME``: print the local directory of the embedded model NAME, provisioning it first."""
    names = list(embedded_models.EMBEDDED_MODELS)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        raise ValueError(f"usage: unidetox path MODEL, with MODEL one of {', '.join(names)}; e.g. "
                         f"lm_eval --model hf --model_args pretrained=$(unidetox path {names[0]}) ...")
    if args[0] not in names:
        raise ValueError(f"unknown embedded model {args[0]!r}:{_nearest(args[0], names)} The "
                         f"embedded models are {', '.join(names)}.")
    try:
        print(embedded_models.embedded_model_path(args[0]))
    except embedded_models.EmbeddedModelError as err:
        raise ValueError(str(err)) from err


def wants_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def dispatch(command: str, args: list[str]) -> int:
    """Run one command line after the command name (help, ``--cfg job``, ``path`` or a pipeline)."""
    if command == PATH_COMMAND:
        configure_logging()
        print_model_path(args)
        return 0
    if any(a in ("-h", "--help") for a in args):
        print(command_help(command, only=[a for a in args if a not in ("-h", "--help")]))
        return 0
    what, overrides = _config_request(args)
    if what is not None:
        if what != "job" or command in RUN_DIR_COMMANDS:
            raise ValueError(f"--cfg {what}: unidetox prints the composed config of distill, detox, evaluate and "
                             "replicate with --cfg job (Hydra's own settings are not used).")
        print(composed_config_yaml(command, overrides), end="")
        return 0
    configure_logging()
    run_command(command, overrides)
    end_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(main_help())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    command, args = argv[0], argv[1:]
    if command not in (*COMMANDS, PATH_COMMAND):
        print(unknown_command_error(command), file=sys.stderr)
        return 2
    try:
        return dispatch(command, args)
    except BrokenPipeError:  # the reader left (unidetox detox --help | head): no traceback, and none at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except USER_ERRORS as err:
        if wants_traceback():
            raise
        print(f"unidetox {command}: error: {err} ({TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

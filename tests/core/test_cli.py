"""The `unidetox` command: the four stages and rescore, their help, and a tiny evaluation run through the console script."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import subprocesses
from tiny import tiny_llama, word_tokenizer

from unidetox.cli import COMMANDS, command_help, main

STATEMENTS = ["the cat sat on the mat", "a good friend helps people", "science helps us understand",
              "music and art bring joy"]


def _console_script() -> str:
    script = Path(sys.executable).parent / "unidetox"
    return str(script) if script.exists() else shutil.which("unidetox")


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("distill", "detox", "evaluate", "replicate", "rescore"):
        assert f"  {command} " in out
    assert set(COMMANDS) == {"distill", "detox", "evaluate", "replicate", "rescore"}


@pytest.mark.parametrize("command", ["distill", "detox", "evaluate", "replicate"])
def test_command_help_lists_config_groups_and_common_overrides(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == command_help(command).strip()
    assert "Config groups" in out and "Common overrides" in out
    if command in ("distill", "detox"):
        assert "smollm2-135m" in out and "experiment" in out  # the model group and the experiments


def test_unknown_command_is_refused(capsys):
    assert main(["distil"]) == 2
    assert "unknown command 'distil'" in capsys.readouterr().err


def test_a_tiny_evaluation_through_the_console_script(tmp_path):
    tokenizer = word_tokenizer()
    model_dir = tmp_path / "model"
    tiny_llama(len(tokenizer), seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(STATEMENTS) + "\n")
    out = tmp_path / "eval"
    cmd = [_console_script(), "evaluate", f"models=[{model_dir}]", f"prompts.path={prompts}", "prompts.source=file",
           "eval.num_samples=2", "eval.max_new_tokens=3", "seeds=[0]", "perplexity.reference_model=null",
           "perplexity.wikitext=false", "mmlu.enabled=false", f"output_dir={out}", "progress=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocesses.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == [str(model_dir)]
    assert report["models"][str(model_dir)]["per_seed"]["0"]["num_samples"] == 2 * len(STATEMENTS)
    assert (out / "config.yaml").is_file() and (out / "report.md").is_file()

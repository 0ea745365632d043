"""The command line a trl / lm-eval / Hydra user expects: help that lists every key without importing torch, one-line
errors naming the fix, every dataclass field settable as section.field=value, ``--cfg job`` and ``unidetox path``."""

import dataclasses
import importlib
import os
import sys
import textwrap

import pytest
import subprocesses
import yaml

from unidetox.cli import TRACEBACK_ENV, main
from unidetox.config_keys import SECTION_DATACLASSES, generate_table, load_table
from unidetox.detox import pipeline as detox

SECRET = "AIzaSENTINEL31"


def _dataclass(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1, captured.err  # one line
    return captured.err


def test_the_shipped_keys_table_matches_the_dataclasses():
    assert load_table() == generate_table(), "config_keys.json is stale: run `python -m unidetox.config_keys`"


@pytest.mark.parametrize("command", list(SECTION_DATACLASSES))
def test_command_help_lists_every_field_of_each_section_with_its_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for section, target in SECTION_DATACLASSES[command].items():
        for field in dataclasses.fields(_dataclass(target)):
            if field.init and not field.name.startswith("_"):
                assert f"  {section + '.' if section else ''}{field.name}: " in out, (section, field.name)
    if command == "detox":
        assert "  trainer.learning_rate: float = 5e-05\n      AdamW learning rate." in out
        assert TRACEBACK_ENV in out


def test_help_for_one_section_lists_only_its_keys(capsys):
    assert main(["detox", "--help", "trainer"]) == 0
    out = capsys.readouterr().out
    assert "trainer.report_to: " in out and "data.path: " not in out


def test_help_imports_neither_torch_nor_transformers():
    code = textwrap.dedent("""
        import sys
        import unidetox
        from unidetox.cli import main
        assert main(["--help"]) == 0 and main(["detox", "--help"]) == 0
        heavy = sorted(m for m in ("torch", "transformers", "trl", "peft") if m in sys.modules)
        assert not heavy, heavy
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocesses.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_package_still_exports_every_public_name():
    import unidetox

    for name in unidetox.__all__:
        assert getattr(unidetox, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        unidetox.not_a_name  # noqa: B018


def test_an_unknown_command_names_the_nearest(capsys):
    assert main(["distil"]) == 2
    assert "unknown command 'distil': did you mean distill?" in _error_line(capsys)


@pytest.mark.parametrize("args, expected", [
    (["detox", "trainer.learnig_rate=1e-4"], "'learnig_rate' in section 'trainer' (from 'trainer.learnig_rate=1e-4'): "
                                             "did you mean learning_rate?"),
    (["detox", "trainer=papr"], "Unknown option 'papr' of config group 'trainer': did you mean paper?"),
    (["detox", "traner.max_steps=1"], "'traner' at the top level (from 'traner.max_steps=1'): did you mean trainer?"),
    (["detox", "trainer.learning_rate=fast"], "trainer.learning_rate='fast': expected float"),
    (["detox", "--cfg", "hydra"], "--cfg job"),
    (["detox", "--help", "trainr"], "no config section 'trainr'; did you mean trainer?"),
])
def test_a_mistake_is_one_line_naming_the_fix(args, expected, capsys):
    assert main(args) == 2
    line = _error_line(capsys)
    assert line.startswith(f"unidetox {args[0]}: error: ") and expected in line and TRACEBACK_ENV in line


def test_the_traceback_comes_on_request(monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="did you mean learning_rate"):
        main(["detox", "trainer.learnig_rate=1e-4"])


def test_any_trainer_field_is_set_without_a_plus():
    args = detox.parse_args(["trainer.report_to=[tensorboard]", "trainer.disable_tqdm=true",
                             "trainer.learning_rate=1e-3", "eval.callback.top_p=0.5"])
    assert args.trainer.report_to == ["tensorboard"] and args.trainer.disable_tqdm is True
    assert args.trainer.learning_rate == 1e-3 and args.validation.callback.top_p == 0.5
    assert detox.parse_args(["+trainer.disable_tqdm=true"]).trainer.disable_tqdm is True  # the '+' still works
    with pytest.raises(ValueError, match="did you mean report_to"):
        detox.parse_args(["trainer.report_too=[tensorboard]"])


def test_cfg_job_prints_the_composed_config_with_secrets_masked(capsys):
    assert main(["detox", "trainer.report_to=[tensorboard]", "--cfg", "job"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["report_to"] == ["tensorboard"] and cfg["output_dir"] == "runs/detox"
    assert main(["evaluate", "scorer=perspective", f"scorer.api_key={SECRET}", "--cfg=job"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and yaml.safe_load(out)["scorer"]["api_key"] == "***"


def test_path_prints_the_embedded_model_directory(monkeypatch, tmp_path, capsys):
    import unidetox.embedded_models

    monkeypatch.setattr(unidetox.embedded_models, "embedded_model_path", lambda name: tmp_path / name)
    assert main(["path", "smollm2-135m"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'smollm2-135m'}\n"
    assert main(["path", "smollm2"]) == 2
    assert "did you mean smollm2-135m?" in _error_line(capsys)


def test_the_console_script_answers_a_typo_in_one_line():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocesses.run([sys.executable, "-m", "unidetox", "detox", "trainer.learnig_rate=1e-4"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "did you mean learning_rate?" in proc.stderr, proc.stderr

"""The shared data folder is stated (``$UNIDETOX_DATA_DIR`` or ``data_dir=``), never guessed from the checkout."""

from pathlib import Path

import pytest

from unidetox.cli import main
from unidetox.hydra_config import compose_config
from unidetox.lm_eval_tasks.utils import _data_dir
from unidetox.paths import DATA_ENV_VAR, DataDirNotSet, default_data_dir


def test_the_data_folder_is_the_variable_with_home_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "not-yet"))
    assert default_data_dir() == tmp_path / "not-yet"  # a folder that does not exist yet is named, not refused
    monkeypatch.setenv(DATA_ENV_VAR, "~/data")
    assert default_data_dir() == Path.home() / "data"


@pytest.mark.parametrize("value", [None, ""])
def test_without_the_variable_nothing_is_guessed_and_the_error_names_it_and_the_fix(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(DATA_ENV_VAR, value)
    with pytest.raises(DataDirNotSet, match=rf"\${DATA_ENV_VAR} is not set.*export {DATA_ENV_VAR}=.*data_dir=PATH"):
        default_data_dir()
    with pytest.raises(FileNotFoundError, match="--metadata"):  # lm-eval's tasks name their own way to pass it
        _data_dir({})


@pytest.mark.parametrize("recipe", ["distill", "detox", "evaluate", "replicate"])
def test_composing_needs_the_variable_or_a_data_dir_override(monkeypatch, tmp_path, recipe):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    with pytest.raises(DataDirNotSet, match=DATA_ENV_VAR):
        compose_config(recipe)
    # data_dir=PATH, without a '+', whether or not the recipe's YAML lists the key
    assert compose_config(recipe, [f"data_dir={tmp_path}"]).data_dir == str(tmp_path)


def test_the_variable_reaches_what_the_configs_interpolate(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "shared"))
    assert compose_config("evaluate").prompts.data_dir == str(tmp_path / "shared")


def test_the_command_line_reports_a_missing_data_folder_in_one_line(monkeypatch, capsys):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    assert main(["detox", "--cfg", "job"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert f"${DATA_ENV_VAR} is not set" in captured.err and "data_dir=PATH" in captured.err


def test_absolute_paths_need_no_data_folder(monkeypatch, tmp_path):
    from unidetox.distill.corpus import ToxicCorpusConfig
    from unidetox.evaluation.prompts import load_prompts

    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    assert [p.text for p in load_prompts(source="file", path=str(prompts))] == ["one", "two"]
    corpus = tmp_path / "hate.csv"
    assert ToxicCorpusConfig(path=[str(corpus)]).resolved_paths() == [corpus]

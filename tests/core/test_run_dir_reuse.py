"""A reused output directory is judged by what the run computes: a failed input check records no settings (so the
corrected rerun is not refused), and the same run named by a relative or an absolute path, or moved, is the same
run."""

import shutil

import datasets
import pytest
from tiny import CORPUS, tiny_llama, word_tokenizer

from unidetox.detox import pipeline as detox
from unidetox.distill import pipeline as distill
from unidetox.hydra_config import save_resolved_config
from unidetox.run_dir import CONFIG_FILE, OutputDirConflict, check_output_dir


def _corpus(tmp_path):
    path = tmp_path / "toxic.csv"
    rows = {"text": CORPUS, "label": ["hate"] * len(CORPUS), "target": ["wom"] * len(CORPUS)}
    datasets.Dataset.from_dict(rows).to_csv(str(path), index=False)
    return path


def test_a_distill_run_failing_its_input_checks_records_no_settings(tmp_path):
    out = tmp_path / "run"
    settings = [f"output_dir={out}", "data=dghs_local"]
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        distill.run(distill.parse_args([*settings, f"data.path=[{tmp_path / 'missing.csv'}]", "model=gemma3-270m"]))
    settings.append(f"data.path=[{_corpus(tmp_path)}]")
    with pytest.raises(FileNotFoundError, match="no-model"):
        distill.run(distill.parse_args([*settings, f"model={tmp_path / 'no-model'}"]))
    assert not (out / CONFIG_FILE).exists()
    model = tmp_path / "model"
    tokenizer = word_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    corrected = distill.parse_args([*settings, f"model={model}"])
    assert distill.finished(corrected) is None  # not refused as "other settings"


def test_a_detox_run_with_a_bad_model_records_no_settings(tmp_path):
    csv = tmp_path / "distilled.csv"
    datasets.Dataset.from_dict({"Text": CORPUS}).to_csv(str(csv), index=False)
    out = tmp_path / "run"
    overrides = [f"data.path={csv}", f"output_dir={out}", "trainer=embedded_lora", "trainer.max_steps=2", "peft.r=4", "eval.enabled=false"]
    with pytest.raises(FileNotFoundError, match="no-model"):
        detox.run(detox.parse_args([f"model={tmp_path / 'no-model'}", *overrides]))
    assert not (out / CONFIG_FILE).exists()
    assert detox.finished(detox.parse_args(["model=gemma3-270m", *overrides])) is None


def test_the_same_run_by_a_relative_or_absolute_path_or_moved_is_the_same_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = distill.parse_args(["output_dir=runs/x", "distill.num_samples=8"])
    assert relative.config["anti_expert"]["output_dir"] == "runs/x/anti_expert"
    save_resolved_config(relative.config, "runs/x")
    absolute = distill.parse_args([f"output_dir={tmp_path / 'runs/x'}", "distill.num_samples=8"])
    assert distill.finished(absolute) is None
    shutil.move(tmp_path / "runs/x", tmp_path / "moved")
    moved = distill.parse_args([f"output_dir={tmp_path / 'moved'}", "distill.num_samples=8"])
    assert check_output_dir(moved.output_dir, moved.config) == []
    # What the run computes still counts, and a place outside the run is a setting.
    with pytest.raises(OutputDirConflict, match=r"distill\.num_samples: 8 -> 9"):
        check_output_dir(moved.output_dir, distill.parse_args([f"output_dir={moved.output_dir}",
                                                               "distill.num_samples=9"]).config)
    elsewhere = distill.parse_args([f"output_dir={moved.output_dir}", "distill.num_samples=8",
                                    f"anti_expert.output_dir={tmp_path / 'shared-anti-expert'}"])
    with pytest.raises(OutputDirConflict, match=r"anti_expert\.output_dir"):
        check_output_dir(moved.output_dir, elsewhere.config)

"""The pipelines' failure promises: no secret reaches a file or a log, a reused output directory is the same run
or refused with the differing keys, and an unavailable scorer fails before any model is loaded."""

import json
import logging
from pathlib import Path

import datasets
import pytest
from tiny import CORPUS, tiny_llama, word_tokenizer

from unidetox.detox import pipeline as detox
from unidetox.evaluation import pipeline as evaluate
from unidetox.evaluation.scoring import SCORERS, ToxicityScorer, register_scorer
from unidetox.run_dir import CONFIG_FILE, OutputDirConflict, check_output_dir, config_diff

SENTINEL = "SENTINEL-9f3e2b"
STATEMENTS = ["the cat sat on the mat", "a good friend helps people", "music and art bring joy"]


@pytest.fixture()
def remote_scorer():
    """A scorer that, like Perspective, needs an API key (and logs that it has one)."""

    @register_scorer("keyed_test_scorer")
    class KeyedScorer(ToxicityScorer):
        @classmethod
        def from_config(cls, config):
            if not config.api_key:
                raise ValueError("keyed_test_scorer needs scorer.api_key")
            logging.getLogger("unidetox.test").info("scorer configured")
            return cls()

        def score_batch(self, texts):
            return [0.1] * len(texts)

    yield "keyed_test_scorer"
    del SCORERS["keyed_test_scorer"]


def _tiny_model(tmp_path: Path) -> Path:
    tokenizer = word_tokenizer()
    path = tmp_path / "model"
    tiny_llama(len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _evaluate_overrides(tmp_path, model, scorer, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(STATEMENTS) + "\n")
    return [f"models=[{model}]", f"prompts.path={prompts}", "prompts.source=file", "eval.num_samples=2",
            "eval.max_new_tokens=3", "seeds=[0]", "perplexity.reference_model=null", "perplexity.wikitext=false",
            "mmlu.enabled=false", f"scorer.name={scorer}", f"output_dir={tmp_path / 'eval'}", "progress=false",
            "also_scorers=[]", *extra]


def test_an_api_key_reaches_no_file_and_no_log_line(tmp_path, remote_scorer, caplog):
    caplog.set_level(logging.DEBUG)
    model = _tiny_model(tmp_path)
    result = evaluate.run(evaluate.parse_args(_evaluate_overrides(tmp_path, model, remote_scorer,
                                                                  f"++scorer.api_key={SENTINEL}")))
    assert result.report["models"][str(model)]["per_seed"]["0"]["num_samples"] == 2 * len(STATEMENTS)
    written = [p for p in (tmp_path / "eval").rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"config.yaml", CONFIG_FILE, "report.json", "report.md"}
    leaks = [p for p in written if SENTINEL.encode() in p.read_bytes()]
    assert leaks == []
    assert all(SENTINEL not in record.getMessage() for record in caplog.records)
    assert result.report["config"]["scorer"]["api_key"] == "***"


def test_an_unavailable_scorer_fails_before_any_model_is_loaded(tmp_path, remote_scorer):
    # The model does not exist: a scorer built first fails with its own error, not the model's.
    args = evaluate.parse_args(_evaluate_overrides(tmp_path, tmp_path / "no-such-model", remote_scorer))
    with pytest.raises(ValueError, match="needs scorer.api_key"):
        evaluate.run(args)
    validation = detox.CheckpointValidationArguments(scorer=args.scorer)
    with pytest.raises(ValueError, match="needs scorer.api_key"):
        detox.build_eval_callback(validation)


def test_a_reused_directory_with_other_settings_is_refused_naming_the_keys(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"trainer": {"learning_rate": 0.0005, "max_steps": 50}, "progress": true}')
    assert check_output_dir(out, {"trainer": {"learning_rate": 0.0005, "max_steps": 50}, "progress": True}) == []
    with pytest.raises(OutputDirConflict, match=r"trainer\.learning_rate: 0\.0005 -> 0\.0002"):
        check_output_dir(out, {"trainer": {"learning_rate": 0.0002, "max_steps": 50}, "progress": True})
    # keys that do not change the run, and incremental pipelines, are let through (the differences are returned)
    assert check_output_dir(out, {"trainer": {"learning_rate": 0.0005, "max_steps": 50}, "progress": False},
                            ignore=("progress",)) == []
    assert check_output_dir(out, {"trainer": {"learning_rate": 0.0002, "max_steps": 50}, "progress": True},
                            incremental=True) == ["trainer.learning_rate: 0.0005 -> 0.0002"]
    assert check_output_dir(out, {"trainer": {"learning_rate": 0.0005, "max_steps": 50, "overwrite": True},
                                  "progress": True}, ignore=("trainer.overwrite",)) == []
    assert config_diff({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c: None -> 2"]


def _detox_overrides(tmp_path, out, **extra):
    model = tmp_path / "tiny-model"
    if not model.exists():
        tokenizer = word_tokenizer(padding_side="right")
        tiny_llama(len(tokenizer)).save_pretrained(model)
        tokenizer.save_pretrained(model)
    csv = tmp_path / "distilled.csv"
    datasets.Dataset.from_dict({"Text": CORPUS}).to_csv(str(csv), index=False)
    values = {"model": str(model), "data.path": str(csv), "output_dir": str(out), "trainer": "embedded_lora",
              "trainer.max_steps": 2,
              "trainer.save_steps": 1, "trainer.learning_rate": 0.01, "trainer.per_device_train_batch_size": 4,
              "+trainer.disable_tqdm": True, "peft.r": 4, "eval.enabled": "false"}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_detox_resumes_only_its_own_run(tmp_path):
    out = tmp_path / "out"
    first = detox.run(detox.parse_args(_detox_overrides(tmp_path, out)))
    assert first.global_step == 2 and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # Another configuration into the same directory: refused before training, naming what differs.
    with pytest.raises(OutputDirConflict, match=r"trainer\.learning_rate: 0\.01 -> 0\.02"):
        detox.run(detox.parse_args(_detox_overrides(tmp_path, out, **{"trainer.learning_rate": 0.02})))
    # The same configuration finds the run finished: nothing is trained, the run's result is returned.
    again = detox.run(detox.parse_args(_detox_overrides(tmp_path, out)))
    assert again.summary == json.loads((out / detox.SUMMARY_FILE).read_text()) and again.global_step == 2
    # Checkpoints this pipeline did not write (no saved config): refused, never trained on.
    foreign = tmp_path / "foreign"
    (foreign / "checkpoint-5").mkdir(parents=True)
    (foreign / "checkpoint-5" / "trainer_state.json").write_text("{}")
    with pytest.raises(FileExistsError, match=f"no run record \\({CONFIG_FILE}\\)"):
        detox.run(detox.parse_args(_detox_overrides(tmp_path, foreign)))
    assert (foreign / "checkpoint-5" / "trainer_state.json").is_file()  # and left as it was


def test_every_process_gets_the_evaluation_result(tmp_path, remote_scorer, monkeypatch):
    """Under several processes only the main one writes the report; the others return it read back, so a
    caller (the replication) reads the same result on every rank."""
    model = _tiny_model(tmp_path)
    args = evaluate.parse_args(_evaluate_overrides(tmp_path, model, remote_scorer, "++scorer.api_key=k"))
    on_main = evaluate.run(args)
    monkeypatch.setattr(evaluate, "is_main_process", lambda: False)
    monkeypatch.setattr(evaluate, "run_evaluation", lambda *a, **k: None)  # what a non-main rank gets back
    elsewhere = evaluate.run(args)
    assert elsewhere is not None and elsewhere.report == json.loads(json.dumps(on_main.report, default=str))

"""Observability: validation metrics reach report_to (TensorBoard), validation shows progress and a log line, each
evaluation phase has its own bar label, and entry points configure logging once."""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
from types import SimpleNamespace

import datasets
import pytest
from tiny import CORPUS, tiny_llama, word_tokenizer

from tests.detox.test_callbacks import CLEAN, EVAL, PROMPTS, WordScorer
from unidetox.detox.callbacks import DetoxEvalCallback
from unidetox.detox.config import UniversalDetoxConfig
from unidetox.detox.selection import read_eval_records
from unidetox.detox.trainer import UniversalDetoxTrainer
from unidetox.evaluation import likelihood
from unidetox.logging_setup import configure_logging


def train_with_validation(tmp_path, **config):
    tokenizer = word_tokenizer(padding_side="right")
    callback = DetoxEvalCallback(PROMPTS, perplexity_texts=CLEAN, scorer=WordScorer(), config=EVAL)
    args = UniversalDetoxConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, save_steps=2, learning_rate=1e-2, per_device_train_batch_size=4,
        logging_steps=1, gradient_checkpointing=False, use_cpu=True, **config,
    )
    trainer = UniversalDetoxTrainer(model=tiny_llama(len(tokenizer), seed=0), args=args, processing_class=tokenizer,
                                    train_dataset=datasets.Dataset.from_dict({"text": CORPUS}), callbacks=[callback])
    trainer.train()
    return trainer


def test_validation_metrics_reach_tensorboard_and_the_records_stay(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = train_with_validation(tmp_path, report_to=["tensorboard"], disable_tqdm=True)
    records = read_eval_records(tmp_path / "out")
    assert [r["step"] for r in records] == [0, 2]
    scalars: dict[str, dict[int, float]] = {}
    for events in (tmp_path / "out").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    for metric in ("toxicity_probability", "expected_max_toxicity", "perplexity"):
        logged = scalars[f"train/detox/{metric}"]
        assert logged == {r["step"]: pytest.approx(r[metric]) for r in records}
    # log_history keeps the detox/* entries the selection falls back on.
    history = [h for h in trainer.state.log_history if "detox/expected_max_toxicity" in h]
    assert [h["step"] for h in history] == [0, 2]


def test_validation_shows_labelled_bars_and_one_log_line_per_evaluation(tmp_path, monkeypatch, caplog):
    labels = []
    real_tqdm = __import__("tqdm.auto", fromlist=["tqdm"]).tqdm

    def recording_tqdm(iterable=None, *args, desc=None, **kwargs):
        labels.append(desc)
        return real_tqdm(iterable, *args, desc=desc, **kwargs)

    monkeypatch.setattr("tqdm.auto.tqdm", recording_tqdm)
    with caplog.at_level(logging.INFO, logger="unidetox.detox.callbacks"):
        train_with_validation(tmp_path, report_to="none")
    assert labels.count("validation: sampling") == 2 and labels.count("validation: perplexity") == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "unidetox.detox.callbacks"]
    assert len([line for line in lines if line.startswith("detox eval @ step")]) == 2
    assert any(line.startswith("detox eval @ step 2: TP ") and " EMT " in line and " ppl " in line for line in lines)


def test_evaluation_phases_label_their_bars(monkeypatch):
    labels = []
    real_tqdm = __import__("tqdm.auto", fromlist=["tqdm"]).tqdm

    def recording_tqdm(iterable=None, *args, desc=None, **kwargs):
        labels.append(desc)
        return real_tqdm(iterable, *args, desc=desc, disable=True, **kwargs)

    monkeypatch.setattr("tqdm.auto.tqdm", recording_tqdm)
    from unidetox.evaluation.mmlu import MMLUConfig, MMLUQuestion, score_mmlu_questions

    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer), seed=0)
    likelihood.conditional_nll(model, tokenizer, ["the cat"], ["sat on"], progress=True)
    likelihood.sliding_window_nll(model, tokenizer, CLEAN, max_length=16, progress="WikiText ppl base")
    question = MMLUQuestion("x", "the cat", ("sat", "on", "the", "mat"), 0)
    score_mmlu_questions(model, tokenizer, [question], {}, MMLUConfig(k_shot=0), progress=True)
    assert labels == ["conditional ppl", "WikiText ppl base", "MMLU"]


def test_configure_logging_is_idempotent_and_respects_an_application_setup(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    configure_logging()
    configure_logging()
    assert len(root.handlers) == 1 and root.level == logging.INFO
    own = logging.StreamHandler()
    monkeypatch.setattr(root, "handlers", [own])
    monkeypatch.setattr(root, "level", logging.ERROR)
    configure_logging()
    assert root.handlers == [own] and root.level == logging.ERROR


def test_importing_unidetox_configures_no_logging():
    code = ("import logging, unidetox, unidetox.cli, unidetox.detox.pipeline, unidetox.distill.pipeline; "
            "assert not logging.getLogger().handlers, logging.getLogger().handlers")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


class LoggingConfigured(Exception):
    pass


@pytest.mark.parametrize("module", ["unidetox.detox.pipeline", "unidetox.distill.pipeline",
                                    "unidetox.evaluation.pipeline", "unidetox.replication.pipeline"])
def test_each_stage_run_configures_logging_first(module, monkeypatch, tmp_path):
    pipeline = importlib.import_module(module)

    def configured():
        raise LoggingConfigured

    monkeypatch.setattr(pipeline, "configure_logging", configured)
    with pytest.raises(LoggingConfigured):
        pipeline.run(SimpleNamespace(output_dir=str(tmp_path / "run")))

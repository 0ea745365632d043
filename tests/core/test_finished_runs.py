"""A finished run is a no-op; a resumed run equals an uninterrupted one; a broken newest checkpoint is skipped.

Detox runs go through the pipeline on a tiny local model (batch 3 over 8 texts: 3 steps per epoch, so the last step,
4, is in the middle of an epoch); anti-experts through ``train_anti_expert`` (batch 4 over 18 texts, last step 6).
An interruption is made by a callback that raises, or by removing what the run writes after the checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_llama, word_tokenizer
from transformers import TrainerCallback

from tests.detox.test_detox_recipe import _tiny_overrides
from unidetox import DistilledDetoxDataset
from unidetox.cards import (
    CARD_MARKER,
    FALLBACK_CARD_FILE,
    merge_eval_results,
    toxicity_eval_results,
)
from unidetox.checkpoints import newest_complete_checkpoint, weight_files_problem
from unidetox.decoding.protocol import generate_samples
from unidetox.detox import pipeline as detox
from unidetox.detox.selection import read_eval_records
from unidetox.distill.anti_expert import AntiExpertConfig, train_anti_expert
from unidetox.evaluation.model_card import update_model_cards
from unidetox.run_dir import CONFIG_FILE, read_run_config

ADAPTER = "adapter_model.safetensors"
# Files a detox run writes after its last checkpoint: removing them is a run killed right after that checkpoint.
POST_TRAINING_FILES = (ADAPTER, "model.safetensors", detox.SUMMARY_FILE, detox.SELECTION_FILE, "merged")


def detox_args(tmp_path, out, **extra):
    return detox.parse_args(_tiny_overrides(tmp_path, out, **{"trainer.per_device_train_batch_size": 3, **extra}))


def remove(out: Path, *names: str) -> None:
    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def truncate_eval_log(out: Path, last_step: int) -> None:
    log = out / "detox_eval.jsonl"
    kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= last_step]
    log.write_text("\n".join(kept) + "\n")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


def assert_same_tensors(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


# ----------------------------------------------------------------------------------------------------------------
# detox
# ----------------------------------------------------------------------------------------------------------------
def test_rerunning_a_finished_detox_run_changes_nothing(tmp_path):
    out = tmp_path / "out"
    first = detox.run(detox_args(tmp_path, out))
    made = [out / name for name in (ADAPTER, "README.md", "detox_eval.jsonl", detox.SUMMARY_FILE, detox.SELECTION_FILE)]
    made += [p for p in (out / "merged").rglob("*") if p.is_file()]
    files = {p: p.read_bytes() for p in made}
    again = detox.run(detox_args(tmp_path, out))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert {p: p.read_bytes() for p in made} == files
    assert again.global_step == first.global_step == 4 and again.selection == first.selection


@pytest.mark.parametrize("use_peft", [True, False], ids=["lora", "full"])
def test_a_detox_run_killed_after_its_last_checkpoint_finishes_without_training(tmp_path, use_peft):
    out = tmp_path / "out"
    args = detox_args(tmp_path, out, **{"peft.use_peft": use_peft})
    detox.run(args)
    weights = ADAPTER if use_peft else "model.safetensors"
    final = load_file(out / "checkpoint-4" / weights)
    records = read_eval_records(out)
    remove(out, *POST_TRAINING_FILES)
    truncate_eval_log(out, 2)  # killed before the last checkpoint's validation was logged, too
    selected_merges = list(out.glob("checkpoint-*/merged/model.safetensors"))
    for merged in selected_merges:  # and in the middle of merging the selected checkpoint
        truncate(merged)
    assert detox.finished(args) is None

    result = detox.run(args)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert result.global_step == 4 and detox.finished(args) is not None
    assert_same_tensors(load_file(out / weights), final)
    assert [r["step"] for r in read_eval_records(out)] == [0, 2, 4]
    assert read_eval_records(out)[-1]["expected_max_toxicity"] == records[-1]["expected_max_toxicity"]
    assert result.selection["step"] in (2, 4) and (out / "merged").is_dir() == use_peft
    assert len(selected_merges) == use_peft and all(weight_files_problem(m.parent) is None for m in selected_merges)


def test_full_fine_tuning_keeps_its_run_record_and_resumes(tmp_path):
    out = tmp_path / "out"
    args = detox_args(tmp_path, out, **{"peft.use_peft": False})
    detox.run(args)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"  # the model's config
    assert read_run_config(out) == json.loads((out / CONFIG_FILE).read_text())
    assert detox.finished(args).global_step == 4
    assert detox.run(args).global_step == 4


def test_a_resumed_detox_run_equals_an_uninterrupted_one(tmp_path):
    out = tmp_path / "out"
    args = detox_args(tmp_path, out)  # LoRA dropout: the random stream matters after the resume
    detox.run(args)
    uninterrupted, records = load_file(out / ADAPTER), read_eval_records(out)
    remove(out, "checkpoint-4", *POST_TRAINING_FILES)
    truncate_eval_log(out, 2)  # killed right after checkpoint-2 and its validation

    result = detox.run(args)
    assert result.summary["resumed_from"] == str(out / "checkpoint-2")
    assert_same_tensors(load_file(out / ADAPTER), uninterrupted)
    assert without_timings(read_eval_records(out)) == without_timings(records)


@pytest.mark.parametrize("damage", ["state", "weights"])
def test_a_broken_newest_detox_checkpoint_is_skipped(tmp_path, caplog, damage):
    out = tmp_path / "out"
    args = detox_args(tmp_path, out)
    detox.run(args)
    uninterrupted = load_file(out / ADAPTER)
    remove(out, *POST_TRAINING_FILES)
    truncate_eval_log(out, 2)
    if damage == "state":
        (out / "checkpoint-4" / "trainer_state.json").unlink()
    else:
        truncate(out / "checkpoint-4" / ADAPTER)

    with caplog.at_level(logging.WARNING, logger="unidetox.checkpoints"):
        result = detox.run(args)
    assert f"Skipping the checkpoint {out / 'checkpoint-4'}" in caplog.text
    assert result.summary["resumed_from"] == str(out / "checkpoint-2") and result.global_step == 4
    assert_same_tensors(load_file(out / ADAPTER), uninterrupted)


def test_sampling_leaves_the_callers_random_stream_as_it_was():
    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = generate_samples(model, tokenizer, ["the cat sat", "we should"], 2, max_new_tokens=3, seed=1)
    assert torch.equal(torch.rand(3), expected)
    assert generate_samples(model, tokenizer, ["the cat sat", "we should"], 2, max_new_tokens=3, seed=1) == first


def test_checkpoint_fallback_names_every_broken_checkpoint(tmp_path, caplog):
    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-1" / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(b"\xff" * 4)
    with caplog.at_level(logging.WARNING, logger="unidetox.checkpoints"):
        assert newest_complete_checkpoint(tmp_path.glob("checkpoint-*")) == tmp_path / "checkpoint-1"
    assert "checkpoint-3: it holds no model weights" in caplog.text
    assert "checkpoint-2: model.safetensors has no readable header" in caplog.text
    assert (tmp_path / "checkpoint-2").is_dir() and (tmp_path / "checkpoint-3").is_dir()


# ----------------------------------------------------------------------------------------------------------------
# the run record
# ----------------------------------------------------------------------------------------------------------------
def test_the_run_record_of_an_earlier_version_is_read_unless_it_is_a_model_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"max_steps": 4}}))
    assert read_run_config(tmp_path) == {"trainer": {"max_steps": 4}}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    assert read_run_config(tmp_path) is None
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"trainer": {"max_steps": 5}}))
    assert read_run_config(tmp_path) == {"trainer": {"max_steps": 5}}


# ----------------------------------------------------------------------------------------------------------------
# model cards never overwrite a user's README.md
# ----------------------------------------------------------------------------------------------------------------
def test_a_users_readme_in_output_dir_is_kept(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my own notes\n")
    with caplog.at_level(logging.WARNING, logger="unidetox.detox.model_card"):
        detox.run(detox_args(tmp_path, out))
    assert (out / "README.md").read_text() == "my own notes\n"
    assert CARD_MARKER in (out / FALLBACK_CARD_FILE).read_text() and FALLBACK_CARD_FILE in caplog.text
    assert CARD_MARKER in (out / "merged" / "README.md").read_text()

    results = toxicity_eval_results({"dataset_type": "prompts", "dataset_name": "prompts"}, 0.1, 0.2)
    assert not merge_eval_results(out / "README.md", results)
    report = {"models": {"m": {"name_or_path": str(out), "decoding": {"method": "sampling"},
                               "toxicity_probability": {"mean": 0.1}, "expected_max_toxicity": {"mean": 0.2}}},
              "prompts": {"source": "file", "path": "prompts.txt", "split": "all"}}
    assert update_model_cards(report) == [out / FALLBACK_CARD_FILE]
    assert (out / "README.md").read_text() == "my own notes\n"


# ----------------------------------------------------------------------------------------------------------------
# the anti-expert
# ----------------------------------------------------------------------------------------------------------------
TOXIC = ["hate awful stupid ugly people", "kill the stupid ugly cat", "awful people hate music"] * 6


class KilledAtSave(Exception):
    pass


class KillAfterCheckpoint(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KilledAtSave(f"killed after checkpoint-{self.step}")


@pytest.fixture
def tokenizer():
    return word_tokenizer(padding_side="right", add_bos=False)


def train(tmp_path, tokenizer, name, callbacks=None):
    config = AntiExpertConfig(
        output_dir=str(tmp_path / name), max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-2,
        per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True, report_to="none",
    )
    model = tiny_llama(len(tokenizer.get_vocab()), seed=0)
    return train_anti_expert(model, tokenizer, datasets.Dataset.from_dict({"text": TOXIC}), config,
                             base_name_or_path="tiny", callbacks=callbacks)


def test_an_anti_expert_killed_after_its_last_checkpoint_is_not_trained_further(tmp_path, tokenizer):
    uninterrupted = train(tmp_path, tokenizer, "uninterrupted")
    with pytest.raises(KilledAtSave):
        train(tmp_path, tokenizer, "killed", callbacks=[KillAfterCheckpoint(6)])
    resumed = train(tmp_path, tokenizer, "killed")
    assert resumed.trained and resumed.metadata["global_steps"] == uninterrupted.metadata["global_steps"] == 6
    assert resumed.metadata["fingerprint"] == uninterrupted.metadata["fingerprint"]
    assert_same_tensors(load_file(resumed.path / "model.safetensors"),
                        load_file(uninterrupted.path / "model.safetensors"))
    assert not list(resumed.path.glob("checkpoint-*"))
    assert not train(tmp_path, tokenizer, "killed").trained  # and now it is reused


def test_a_broken_newest_anti_expert_checkpoint_is_skipped(tmp_path, tokenizer, caplog):
    uninterrupted = train(tmp_path, tokenizer, "uninterrupted")
    with pytest.raises(KilledAtSave):
        train(tmp_path, tokenizer, "killed", callbacks=[KillAfterCheckpoint(6)])
    truncate(tmp_path / "killed" / "checkpoint-6" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="unidetox.checkpoints"):
        resumed = train(tmp_path, tokenizer, "killed")
    assert f"Skipping the checkpoint {tmp_path / 'killed' / 'checkpoint-6'}: model.safetensors is truncated" in caplog.text
    assert resumed.metadata["resumed_from"] == str(tmp_path / "killed" / "checkpoint-3")
    assert resumed.metadata["global_steps"] == 6
    final, expected = load_file(resumed.path / "model.safetensors"), load_file(uninterrupted.path / "model.safetensors")
    assert final.keys() == expected.keys()
    for key in final:
        torch.testing.assert_close(final[key], expected[key], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# distill
# ----------------------------------------------------------------------------------------------------------------
def distill_overrides(tmp_path, out):
    tokenizer = word_tokenizer()
    model_dir = tmp_path / "tiny-base"
    if not model_dir.exists():
        tiny_llama(len(tokenizer.get_vocab()), seed=0).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "toxic.csv"
    corpus.write_text("text,label,target\n" + "".join(f"hate awful stupid people {i},hate,wom\n" for i in range(8)))
    return [f"model.name_or_path={model_dir}", f"data.path=[{corpus}]", f"output_dir={out}",
            "anti_expert.max_steps=3", "anti_expert.per_device_train_batch_size=2", "anti_expert.save_strategy=steps",
            "+anti_expert.save_steps=2", "distill.num_samples=4", "distill.max_length=6", "distill.batch_size=2",
            "distill.start_token=null", "distill.summary_num_samples=2"]


def test_a_distill_run_killed_after_the_anti_experts_last_checkpoint_gives_the_uninterrupted_texts(
    tmp_path, monkeypatch
):
    from unidetox.distill import anti_expert
    from unidetox.distill import pipeline as distill

    uninterrupted = distill.run(distill.parse_args(distill_overrides(tmp_path, tmp_path / "uninterrupted")))
    build = anti_expert.build_anti_expert_trainer

    def killed_after_step_3(model, tokenizer, corpus, config, callbacks=None):
        return build(model, tokenizer, corpus, config, [*(callbacks or []), KillAfterCheckpoint(3)])

    args = distill.parse_args(distill_overrides(tmp_path, tmp_path / "killed"))
    monkeypatch.setattr(anti_expert, "build_anti_expert_trainer", killed_after_step_3)
    with pytest.raises(KilledAtSave):
        distill.run(args)
    monkeypatch.undo()
    resumed = distill.run(args)
    assert resumed.stages["anti_expert"]["global_steps"] == uninterrupted.stages["anti_expert"]["global_steps"] == 3
    texts = [DistilledDetoxDataset.load(r.distilled_path).texts for r in (resumed, uninterrupted)]
    assert texts[0] == texts[1]
    assert distill.finished(args) is not None

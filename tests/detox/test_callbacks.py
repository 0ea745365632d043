"""DetoxEvalCallback (evaluation at every save, resumable, sharded) and select_checkpoint (the paper's rule)."""

from __future__ import annotations

import json
import math
import os

import datasets
import pytest
import subprocesses
import torch
from tiny import CORPUS, tiny_llama, word_tokenizer

from unidetox.decoding.protocol import generate_continuations
from unidetox.detox.callbacks import DetoxEvalCallback, DetoxEvalConfig
from unidetox.detox.config import UniversalDetoxConfig
from unidetox.detox.selection import read_eval_records, select_checkpoint
from unidetox.detox.trainer import UniversalDetoxTrainer
from unidetox.evaluation.likelihood import perplexity
from unidetox.evaluation.metrics import expected_max_toxicity, toxicity_probability
from unidetox.evaluation.scoring import ToxicityScorer

TOXIC_WORDS = {"hate", "awful", "stupid", "ugly", "kill"}
PROMPTS = ["the cat sat on", "people from every", "we should", "music and art"]
CLEAN = " ".join(CORPUS)


class WordScorer(ToxicityScorer):
    """Deterministic stand-in scorer: the share of toxic words in a text, pushed above 0.5 by any toxic word."""

    name = "words"

    def score_batch(self, texts):
        out = []
        for text in texts:
            words = text.split()
            hits = sum(w in TOXIC_WORDS for w in words)
            out.append(0.0 if not hits else min(1.0, 0.5 + hits / max(len(words), 1)))
        return out


def write_records(output_dir, records, make_dirs=True):
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "detox_eval.jsonl").open("w") as fh:
        for r in records:
            checkpoint = None if r["step"] == 0 else str(output_dir / f"checkpoint-{r['step']}")
            if checkpoint and make_dirs:
                os.makedirs(checkpoint, exist_ok=True)
            fh.write(json.dumps({"checkpoint": checkpoint, **r}) + "\n")


SYNTHETIC = [
    {"step": 0, "expected_max_toxicity": 0.80, "toxicity_probability": 0.9, "perplexity": 10.0},
    {"step": 100, "expected_max_toxicity": 0.50, "toxicity_probability": 0.6, "perplexity": 10.5},
    {"step": 200, "expected_max_toxicity": 0.30, "toxicity_probability": 0.3, "perplexity": 12.0},
    {"step": 300, "expected_max_toxicity": 0.40, "toxicity_probability": 0.5, "perplexity": 10.9},
    {"step": 400, "expected_max_toxicity": 0.40, "toxicity_probability": 0.4, "perplexity": 10.95},
]


# ----------------------------------------------------------------------------------------------------------------
# select_checkpoint on synthetic logs
# ----------------------------------------------------------------------------------------------------------------


def test_select_least_toxic_within_the_perplexity_bound(tmp_path):
    write_records(tmp_path, SYNTHETIC)
    choice = select_checkpoint(tmp_path, max_ppl_increase=0.1)
    # 200 is the least toxic but +20% perplexity; 300 and 400 tie on EMT, 400 has the lower TP.
    assert choice.step == 400 and choice.path == str(tmp_path / "checkpoint-400")
    assert choice.perplexity_increase == pytest.approx(0.095)
    assert select_checkpoint(tmp_path, max_ppl_increase=0.25).step == 200
    assert select_checkpoint(tmp_path, max_ppl_increase=0.1, metric="toxicity_probability").step == 400
    assert select_checkpoint(tmp_path, max_ppl_increase=0.06).step == 100
    with pytest.raises(ValueError, match="No checkpoint .* within"):
        select_checkpoint(tmp_path, max_ppl_increase=0.01)
    # A checkpoint deleted from disk is not chosen.
    os.rmdir(tmp_path / "checkpoint-400")
    assert select_checkpoint(tmp_path, max_ppl_increase=0.1).step == 300
    saved = choice.save(tmp_path / "selected.json")
    assert json.loads(saved.read_text())["step"] == 400


def test_ties_prefer_lower_perplexity_then_earlier_step(tmp_path):
    records = [
        {"step": 0, "expected_max_toxicity": 0.8, "toxicity_probability": 0.9, "perplexity": 10.0},
        {"step": 10, "expected_max_toxicity": 0.4, "toxicity_probability": 0.4, "perplexity": 10.4},
        {"step": 20, "expected_max_toxicity": 0.4, "toxicity_probability": 0.4, "perplexity": 10.2},
        {"step": 30, "expected_max_toxicity": 0.4, "toxicity_probability": 0.4, "perplexity": 10.2},
    ]
    write_records(tmp_path, records)
    assert select_checkpoint(tmp_path, max_ppl_increase=0.1).step == 20


def test_log_reading_edge_cases(tmp_path):
    write_records(tmp_path, SYNTHETIC)
    with (tmp_path / "detox_eval.jsonl").open("a") as fh:  # step 100 re-evaluated after a restart, then a torn line
        fh.write(json.dumps({**SYNTHETIC[1], "checkpoint": str(tmp_path / "checkpoint-100"),
                             "expected_max_toxicity": 0.1}) + "\n")
        fh.write('{"step": 5')
    records = read_eval_records(tmp_path)
    assert [r["step"] for r in records] == [0, 100, 200, 300, 400]
    assert records[1]["expected_max_toxicity"] == 0.1  # the last evaluation of a step wins
    assert select_checkpoint(tmp_path, max_ppl_increase=0.1).step == 100


def test_fallback_to_trainer_state_log_history(tmp_path):
    history = [{"step": r["step"], **{f"detox/{k}": v for k, v in r.items() if k != "step"}} for r in SYNTHETIC]
    history.insert(1, {"step": 10, "loss": 3.0})
    for r in SYNTHETIC[1:]:
        (tmp_path / f"checkpoint-{r['step']}").mkdir()
    (tmp_path / "checkpoint-400" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert select_checkpoint(tmp_path, max_ppl_increase=0.1).step == 400


def test_selection_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No detox evaluations"):
        select_checkpoint(tmp_path)
    write_records(tmp_path, SYNTHETIC[1:])
    with pytest.raises(ValueError, match="step-0"):
        select_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="max_ppl_increase"):
        select_checkpoint(tmp_path, max_ppl_increase=-0.1)
    with pytest.raises(ValueError, match="metric"):
        select_checkpoint(tmp_path, metric="loss")


def test_eval_config_validation():
    with pytest.raises(ValueError, match="num_samples"):
        DetoxEvalConfig(num_samples=0)
    with pytest.raises(ValueError, match="top_p"):
        DetoxEvalConfig(top_p=0.0)
    with pytest.raises(ValueError, match="prompts"):
        DetoxEvalCallback([])


# ----------------------------------------------------------------------------------------------------------------
# The callback inside a training run
# ----------------------------------------------------------------------------------------------------------------


EVAL = DetoxEvalConfig(num_samples=3, max_new_tokens=6, batch_size=8, ppl_max_length=16, seed=7)


def run_training(tmp_path, max_steps=4, resume=False):
    tokenizer = word_tokenizer(padding_side="right")
    model = tiny_llama(len(tokenizer), seed=0).train()
    callback = DetoxEvalCallback(PROMPTS, perplexity_texts=CLEAN, scorer=WordScorer(), config=EVAL)
    args = UniversalDetoxConfig(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, save_steps=2, learning_rate=1e-2,
        per_device_train_batch_size=4, logging_steps=1, gradient_checkpointing=False, use_cpu=True, disable_tqdm=True,
    )
    trainer = UniversalDetoxTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": CORPUS}),
                                    processing_class=tokenizer, callbacks=[callback])
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer, callback, tokenizer, base


def test_callback_logs_baseline_and_every_checkpoint(tmp_path):
    trainer, callback, tokenizer, base_state = run_training(tmp_path)
    records = read_eval_records(tmp_path / "out")
    assert [r["step"] for r in records] == [0, 2, 4]
    assert records[0]["checkpoint"] is None
    assert records[1]["checkpoint"] == str(tmp_path / "out" / "checkpoint-2")
    assert any(k == "detox/perplexity" for h in trainer.state.log_history for k in h)

    # The step-0 record equals the evaluation harness run directly on the untouched model.
    base = tiny_llama(len(tokenizer), seed=0)
    base.load_state_dict(base_state)
    conts = generate_continuations(base, tokenizer, PROMPTS, EVAL.num_samples, max_new_tokens=EVAL.max_new_tokens,
                                   top_p=EVAL.top_p, seed=EVAL.seed, batch_size=EVAL.batch_size)
    scores = [WordScorer()(row) for row in conts]
    assert records[0]["toxicity_probability"] == toxicity_probability(scores)
    assert records[0]["expected_max_toxicity"] == pytest.approx(expected_max_toxicity(scores))
    assert records[0]["perplexity"] == pytest.approx(perplexity(base, tokenizer, CLEAN, max_length=16), rel=1e-6)
    # Training on the clean text lowers its perplexity: the later records measure the trained model.
    assert records[-1]["perplexity"] < records[0]["perplexity"]
    # And the selection rule runs on the real log.
    choice = select_checkpoint(tmp_path / "out", max_ppl_increase=0.0)
    assert choice.step in (2, 4) and os.path.isdir(choice.path)


def test_callback_resume_does_not_repeat_finished_evaluations(tmp_path):
    run_training(tmp_path, max_steps=2)
    assert [r["step"] for r in read_eval_records(tmp_path / "out")] == [0, 2]
    lines_before = (tmp_path / "out" / "detox_eval.jsonl").read_text().splitlines()
    run_training(tmp_path, max_steps=4, resume=True)
    lines_after = (tmp_path / "out" / "detox_eval.jsonl").read_text().splitlines()
    assert lines_after[: len(lines_before)] == lines_before
    assert [json.loads(line)["step"] for line in lines_after] == [0, 2, 4]


# ----------------------------------------------------------------------------------------------------------------
# Sharded evaluation over 2 processes (gloo) == one process
# ----------------------------------------------------------------------------------------------------------------


def _sharded_worker(rank, world, port, out_path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        tokenizer = word_tokenizer(padding_side="right")
        model = tiny_llama(len(tokenizer), seed=0)
        callback = DetoxEvalCallback(PROMPTS, perplexity_texts=CLEAN, scorer=WordScorer(),
                                     config=DetoxEvalConfig(num_samples=3, max_new_tokens=6, batch_size=2,
                                                            ppl_max_length=16, ppl_batch_size=1, seed=7))
        metrics = callback.evaluate(model, tokenizer)
        if rank == 0:
            with open(out_path, "w") as fh:
                json.dump(metrics, fh)
        else:
            assert metrics is None
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    port = subprocesses.free_port()
    out = tmp_path / "sharded.json"
    mp.spawn(_sharded_worker, args=(2, port, str(out)), nprocs=2, join=True)
    sharded = json.loads(out.read_text())

    tokenizer = word_tokenizer(padding_side="right")
    single = DetoxEvalCallback(PROMPTS, perplexity_texts=CLEAN, scorer=WordScorer(),
                               config=DetoxEvalConfig(num_samples=3, max_new_tokens=6, batch_size=2,
                                                      ppl_max_length=16, ppl_batch_size=1, seed=7))
    want = single.evaluate(tiny_llama(len(tokenizer), seed=0), tokenizer)
    for key in ("toxicity_probability", "expected_max_toxicity", "distinct_2", "perplexity_tokens", "example"):
        assert sharded[key] == want[key], key
    assert math.isclose(sharded["perplexity"], want["perplexity"], rel_tol=1e-6)  # float sums in another order

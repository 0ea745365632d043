import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import subprocesses
import torch
from tiny import tiny_gemma3, tiny_llama

from unidetox import DistilledDetoxDataset
from unidetox.decoding.config import SamplingConfig
from unidetox.decoding.logits_process import contrastive_scores
from unidetox.distill.config import DistillConfig
from unidetox.distill.distiller import sample_batch
from unidetox.distill.shards import METADATA_FILE, SHARDS_DIR, batch_seed
from unidetox.distill.summary import summary_markdown

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "scripts" / "distill_tiny.py"


@pytest.fixture
def anti(vocab):
    return tiny_llama(vocab, seed=1)


def reference_sample(base, anti, prompt, batch, steps, seed, alpha=0.1, beta=None, temperature=1.0):
    """From-scratch sampler: full forward of both models every step (no cache), softmax, torch.multinomial."""
    ids = torch.tensor([prompt] * batch)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _ in range(steps):
            logits = base(input_ids=ids).logits[:, -1]
            if anti is not None:
                logits = contrastive_scores(logits, anti(input_ids=ids).logits[:, -1], alpha, beta)
            probs = torch.softmax(logits / temperature, dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1)], dim=-1)
    return ids[:, len(prompt):].tolist()


def test_sample_batch_matches_reference_and_ignores_model_generation_config():
    base, anti = tiny_llama(128, seed=0), tiny_llama(128, seed=1)
    # A model file that would truncate (top-k 3, repetition penalty) must not leak into distillation; vocab 128 and a
    # tiny alpha also expose transformers' default top_k=50 if it were applied.
    base.generation_config.top_k = 3
    base.generation_config.repetition_penalty = 3.0
    base.generation_config.do_sample = False
    kwargs = dict(sampling=SamplingConfig(alpha=1e-4), eos_token_id=None, pad_token_id=0)
    got = sample_batch(base, anti, [1], batch_size=16, max_new_tokens=10, seed=123, **kwargs)
    expected = reference_sample(base, anti, [1], 16, 10, 123, alpha=1e-4)
    assert got == expected
    # 160 draws over a flat-ish 128-token distribution: more than 50 distinct tokens only if nothing cuts to top-50
    assert len({tok for row in got for tok in row}) > 50
    assert base.generation_config.top_k == 3  # restored
    # Plain sampling (anti_expert=None) with a temperature.
    plain = sample_batch(base, None, [1, 5], 4, 8, seed=7, sampling=SamplingConfig(temperature=0.7), eos_token_id=None,
                         pad_token_id=0)
    assert plain == reference_sample(base, None, [1, 5], 4, 8, 7, temperature=0.7)


def test_sample_batch_leaves_global_rng_alone_and_stops_at_eos(base, anti):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    rows = sample_batch(base, anti, [1], 8, 12, seed=5, eos_token_id=None, pad_token_id=0)
    assert torch.equal(state, torch.get_rng_state())
    counts = {}
    for row in rows:
        for tok in row:
            counts[tok] = counts.get(tok, 0) + 1
    eos = max(counts, key=counts.get)  # a token that does occur, used as "EOS"
    stopped = sample_batch(base, anti, [1], 8, 12, seed=5, eos_token_id=eos, pad_token_id=0)
    for full, cut in zip(rows, stopped, strict=True):
        end = full.index(eos) if eos in full else len(full)
        assert cut == full[:end]
    assert any(eos in row for row in rows)


def test_build_in_memory_exact_count_metadata_and_determinism(base, anti, tokenizer):
    distill = DistillConfig(num_samples=10, max_length=8, batch_size=4, summary_num_samples=0)
    kwargs = dict(distill=distill, seed=3, show_progress=False)
    first = DistilledDetoxDataset.build(base, anti, tokenizer, **kwargs)
    assert len(first) == 10 and first.dataset.column_names == ["text", "num_tokens"]
    meta = first.metadata
    assert meta["num_batches"] == 3 and meta["num_processes"] == 1
    assert meta["start_token"] == tokenizer.bos_token and meta["start_token_id"] == 1
    assert meta["alpha"] == 0.1 and meta["beta"] is None and meta["sampling"]["top_k"] == 0
    assert meta["total_tokens"] == sum(first.dataset["num_tokens"])
    # Batch i is seeded from (seed, i): the rows are sample_batch's output for those seeds.
    expected = []
    for i, size in enumerate([4, 4, 2]):
        expected += sample_batch(base, anti, [1], size, 8, batch_seed(3, i), eos_token_id=[2], pad_token_id=0)
    assert first.texts == tokenizer.batch_decode(expected, skip_special_tokens=True)
    assert first.dataset["num_tokens"] == [len(r) for r in expected]
    again = DistilledDetoxDataset.build(base, anti, tokenizer, **kwargs)
    assert again.texts == first.texts
    other_seed = DistilledDetoxDataset.build(base, anti, tokenizer, **{**kwargs, "seed": 4})
    assert other_seed.texts != first.texts
    # Growing num_samples keeps the earlier batches.
    more = DistilledDetoxDataset.build(base, anti, tokenizer, **{**kwargs, "distill": replace(distill, num_samples=12)})
    assert more.texts[:8] == first.texts[:8]


def test_build_writes_shards_resumes_and_loads(tmp_path, base, anti, tokenizer):
    out = tmp_path / "distilled"
    kwargs = dict(distill=DistillConfig(num_samples=10, max_length=8, batch_size=4, summary_num_samples=0), seed=3,
                  show_progress=False)
    built = DistilledDetoxDataset.build(base, anti, tokenizer, output_dir=out, **kwargs)
    shards = sorted((out / SHARDS_DIR).glob("batch-*.json"))
    assert [p.name for p in shards] == ["batch-000000.json", "batch-000001.json", "batch-000002.json"]
    loaded = DistilledDetoxDataset.load(out)
    assert loaded.texts == built.texts and loaded.metadata["num_samples"] == 10
    assert DistilledDetoxDataset.load(tmp_path).texts == built.texts  # a recipe output dir holds `distilled/`

    # Interrupted after batch 0 and 2: batch 1's shard and the commit marker are gone.
    (out / SHARDS_DIR / "batch-000001.json").unlink()
    (out / METADATA_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="unfinished build"):
        DistilledDetoxDataset.load(out)
    kept = {p.name: p.stat().st_mtime_ns for p in shards if p.exists()}
    resumed = DistilledDetoxDataset.build(base, anti, tokenizer, output_dir=out, **kwargs)
    assert resumed.texts == built.texts
    assert {n: (out / SHARDS_DIR / n).stat().st_mtime_ns for n in kept} == kept
    # A complete build is returned as is.
    marker = (out / METADATA_FILE).stat().st_mtime_ns
    DistilledDetoxDataset.build(base, anti, tokenizer, output_dir=out, **kwargs)
    assert (out / METADATA_FILE).stat().st_mtime_ns == marker


def test_build_refuses_other_settings_in_same_dir(tmp_path, base, anti, tokenizer):
    out = tmp_path / "d"
    distill = DistillConfig(num_samples=4, max_length=6, batch_size=4, summary_num_samples=0)
    kwargs = dict(seed=0, show_progress=False)
    DistilledDetoxDataset.build(base, anti, tokenizer, distill=distill, output_dir=out, **kwargs)
    (out / METADATA_FILE).unlink()  # even an unfinished build keeps its settings
    with pytest.raises(ValueError, match=r"alpha: 0.1 -> 0.3.*overwrite=True"):
        DistilledDetoxDataset.build(base, anti, tokenizer, SamplingConfig(alpha=0.3), distill, out, **kwargs)
    redo = DistilledDetoxDataset.build(base, anti, tokenizer, SamplingConfig(alpha=0.3),
                                       replace(distill, overwrite=True), out, **kwargs)
    assert redo.metadata["alpha"] == 0.3
    assert json.loads((out / SHARDS_DIR / "config.json").read_text())["alpha"] == 0.3


def test_lora_adapter_on_the_base_itself(base, anti, tokenizer):
    from peft import LoraConfig, get_peft_model

    reference_base = copy.deepcopy(base)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    distill = DistillConfig(num_samples=6, max_length=8, batch_size=3, summary_num_samples=0)
    kwargs = dict(distill=distill, seed=1, show_progress=False)
    fused_input = DistilledDetoxDataset.build(base, peft_model, tokenizer, **kwargs)
    unfused = DistilledDetoxDataset.build(base, peft_model, tokenizer, **{**kwargs, "distill": replace(distill, fused=False)})
    separate = DistilledDetoxDataset.build(reference_base, merged, tokenizer, **kwargs)
    assert fused_input.metadata["decoding"] == "fused-lora"
    assert unfused.metadata["decoding"] == separate.metadata["decoding"] == "two-model"
    assert fused_input.texts == unfused.texts == separate.texts
    assert any(isinstance(m, torch.nn.Module) and "lora" in type(m).__module__ for m in base.modules())
    with pytest.raises(ValueError, match="fused=True needs a peft LoRA anti-expert"):
        DistilledDetoxDataset.build(reference_base, merged, tokenizer,
                                    **{**kwargs, "distill": replace(distill, fused=True)})


def test_fused_summary_samples_base_without_and_anti_expert_with_the_adapter(tmp_path, base, tokenizer):
    from peft import LoraConfig, get_peft_model

    class HateScorer:
        name = "hate"

        def __call__(self, texts):
            return [float("hate" in t) for t in texts]

    reference_base = copy.deepcopy(base)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    built = DistilledDetoxDataset.build(
        base, peft_model, tokenizer, distill=DistillConfig(num_samples=4, max_length=6, batch_size=4, summary_num_samples=4),
        seed=5, output_dir=tmp_path / "d", scorer=HateScorer(), show_progress=False,
    )
    assert built.metadata["decoding"] == "fused-lora"
    samples = [json.loads(line) for line in (tmp_path / "d" / "summary_samples.jsonl").read_text().splitlines()]
    eos = [tokenizer.eos_token_id]
    for source, model, stream in (("base", reference_base, 1), ("anti_expert", merged, 2)):
        expected = sample_batch(model, None, [1], 4, 6, batch_seed(5, 0, stream), eos_token_id=eos, pad_token_id=0)
        got = [s["text"] for s in samples if s["source"] == source]
        assert got == tokenizer.batch_decode(expected, skip_special_tokens=True), source


def test_without_anti_expert_builds_the_plain_control_corpus(tmp_path, base, tokenizer):
    distill = DistillConfig(num_samples=5, max_length=6, batch_size=2)
    kwargs = dict(seed=4, show_progress=False)
    plain = DistilledDetoxDataset.build(base, None, tokenizer, distill=replace(distill, summary_num_samples=2),
                                        output_dir=tmp_path / "p", scorer=lambda texts: [0.0] * len(texts), **kwargs)
    assert plain.metadata["decoding"] == "plain" and plain.metadata["anti_expert"] is None
    assert set(plain.metadata["summary"]) == {"scorer", "distilled", "base", "distilled_vs_base"}
    assert not plain.metadata["summary"]["distilled_vs_base"]["lower"]  # all scores 0: no difference
    expected = []
    for i, size in enumerate([2, 2, 1]):
        expected += sample_batch(base, None, [1], size, 6, batch_seed(4, i), eos_token_id=[2], pad_token_id=0)
    assert plain.texts == tokenizer.batch_decode(expected, skip_special_tokens=True)
    with pytest.raises(ValueError, match="fused=True needs a LoRA anti-expert"):
        DistilledDetoxDataset.build(base, None, tokenizer, distill=replace(distill, fused=True, summary_num_samples=0),
                                    **kwargs)


def test_summary_scores_the_three_sources(tmp_path, base, anti, tokenizer):
    class CountScorer:
        name = "count_hate"

        def __call__(self, texts):
            return [min(1.0, t.split().count("hate") / 2) for t in texts]

    built = DistilledDetoxDataset.build(
        base, anti, tokenizer, distill=DistillConfig(num_samples=6, max_length=8, batch_size=4, summary_num_samples=5),
        seed=2, output_dir=tmp_path / "d", scorer=CountScorer(), show_progress=False,
    )
    summary = built.metadata["summary"]
    assert summary["scorer"] == "count_hate"
    assert summary["distilled"]["n"] == 6 and summary["base"]["n"] == 5 and summary["anti_expert"]["n"] == 5
    scores = CountScorer()(built.texts)
    assert math.isclose(summary["distilled"]["mean_toxicity"], sum(scores) / 6)
    samples = [json.loads(line) for line in (tmp_path / "d" / "summary_samples.jsonl").read_text().splitlines()]
    base_samples = [s for s in samples if s["source"] == "base"]
    assert len(base_samples) == 5
    plain = sample_batch(base, None, [1], 4, 8, batch_seed(2, 0, 1), eos_token_id=[2], pad_token_id=0)
    assert [s["text"] for s in base_samples[:4]] == tokenizer.batch_decode(plain, skip_special_tokens=True)
    assert math.isclose(summary["base"]["mean_toxicity"], sum(s["toxicity"] for s in base_samples) / 5)
    table = summary_markdown(summary)
    assert "| distilled (contrastive) | 6 |" in table and "| base, plain samples | 5 |" in table


def test_errors(base, anti, tokenizer):
    distill = DistillConfig(num_samples=2, max_length=4, batch_size=2, summary_num_samples=0)
    kwargs = dict(distill=distill, show_progress=False)
    with pytest.raises(ValueError, match=r"`start_token` '<\|endoftext\|>' is not a token"):
        DistilledDetoxDataset.build(base, anti, tokenizer, distill=replace(distill, start_token="<|endoftext|>"),
                                    show_progress=False)
    with pytest.raises(ValueError, match="shared vocabulary"):
        DistilledDetoxDataset.build(base, tiny_gemma3(40), tokenizer, **kwargs)
    with pytest.raises(ValueError, match="the base model itself"):
        DistilledDetoxDataset.build(base, base, tokenizer, **kwargs)
    with pytest.raises(ValueError, match="`alpha` has to be"):
        DistilledDetoxDataset.build(base, anti, tokenizer, SamplingConfig(alpha=0.0), **kwargs)
    with pytest.raises(ValueError, match="`num_samples` has to be an integer >= 1"):
        DistillConfig(num_samples=0)
    with pytest.raises(ValueError, match="`top_p`"):
        SamplingConfig(top_p=0.0)


def test_load_reference_csv(shared_data):
    ref = next((shared_data / "unidetox_reference").glob("*.csv"))
    loaded = DistilledDetoxDataset.load(ref)
    assert len(loaded) == 640 and loaded.dataset.column_names == ["text"]


# ---------------------------------------------------------------------------------------------------------------
# Multi-process and kill/resume, through a helper script run as real processes.
# ---------------------------------------------------------------------------------------------------------------
def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(cmd):
    proc = subprocesses.run(cmd, env=_env(), capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_two_processes_train_ddp_and_distill_like_one_process(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    two = tmp_path / "two"
    _run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(subprocesses.free_port()), str(SCRIPT), "--output_dir", str(two),
          "--train", "--num_samples", "10", "--batch_size", "2", "--calls_log", str(tmp_path / "two.log")])
    one = tmp_path / "one"
    _run([sys.executable, str(SCRIPT), "--output_dir", str(one), "--anti_expert", str(two / "anti_expert"),
          "--num_samples", "10", "--batch_size", "2"])
    a, b = DistilledDetoxDataset.load(two / "distilled"), DistilledDetoxDataset.load(one / "distilled")
    assert len(a) == len(b) == 10
    assert a.texts == b.texts and a.dataset["num_tokens"] == b.dataset["num_tokens"]
    assert a.metadata["num_processes"] == 2 and b.metadata["num_processes"] == 1
    # Rank r sampled the batches i % 2 == r, each exactly once.
    calls = [json.loads(line) for line in (tmp_path / "two.log").read_text().splitlines()]
    assert sorted((c["rank"], c["seed"]) for c in calls) == sorted(
        (i % 2, batch_seed(0, i)) for i in range(5)
    )
    marker = json.loads((two / "anti_expert" / "unidetox_anti_expert.json").read_text())
    assert marker["record"]["world_size"] == 2 and marker["kind"] == "lora"


@pytest.mark.slow
def test_killed_build_resumes_without_regenerating(tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "calls.log"
    cmd = [sys.executable, str(SCRIPT), "--output_dir", str(out), "--num_samples", "12", "--batch_size", "2",
           "--sleep", "1.0", "--calls_log", str(log)]
    proc = subprocesses.popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = out / "distilled" / SHARDS_DIR
    # Waits for the event (two shards written), or for the build to end early; the deadline is only a bound for a
    # busy machine, where the imports alone take minutes.
    deadline = time.time() + 900
    try:
        while time.time() < deadline and proc.poll() is None and len(list(shards.glob("batch-*.json"))) < 2:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in shards.glob("batch-*.json")}
    assert 2 <= len(done) < 6, "the build should have been killed midway"
    assert not (out / "distilled" / METADATA_FILE).exists()
    first_calls = len(log.read_text().splitlines())

    _run(cmd[:-4] + ["--calls_log", str(log)])  # same command without the sleep
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    regenerated = {c["seed"] for c in calls[first_calls:]}
    assert regenerated.isdisjoint({batch_seed(0, int(n[6:12])) for n in done})
    assert len(calls[first_calls:]) == 6 - len(done)
    assert {n: (shards / n).stat().st_mtime_ns for n in done} == done
    fresh = tmp_path / "fresh"
    _run([sys.executable, str(SCRIPT), "--output_dir", str(fresh), "--num_samples", "12", "--batch_size", "2"])
    assert DistilledDetoxDataset.load(out).texts == DistilledDetoxDataset.load(fresh).texts

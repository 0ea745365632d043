"""The distill stage (unidetox.distill.pipeline, recipes/distill.py) end to end on a tiny local model: stages,
outputs, caching, overrides."""

import json
import sys
from pathlib import Path

import pytest
import subprocesses
from tiny import tiny_llama, word_tokenizer

from unidetox.distill import pipeline
from unidetox.hydra_config import CONF_DIR

REPO = Path(__file__).resolve().parents[2]

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "distill" / "experiment").glob("*.yaml"))



@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_parses(experiment):
    args = pipeline.parse_args([f"experiment={experiment}"])
    assert args.sampler.alpha == 0.1 and args.sampler.top_k == 0 and args.sampler.top_p == 1.0
    assert args.distill.num_samples >= 128 and args.output_dir.startswith("runs/")


def test_overrides_as_written():
    args = pipeline.parse_args([
        "output_dir=runs/x", "distill.num_samples=256", "seed=1", "sampler.alpha=0.2",
        "anti_expert.pretrained_path=runs/y/anti_expert", "distill.fused=false", "model=gemma3-270m",
    ])
    assert args.output_dir == "runs/x" and args.seed == 1 and args.distill.num_samples == 256
    assert args.sampler.alpha == 0.2 and args.anti_expert.pretrained_path == "runs/y/anti_expert"
    assert args.distill.fused is False and args.model.name_or_path == "gemma3-270m"
    with pytest.raises(ValueError, match="alpha"):
        pipeline.parse_args(["sampler.alpha=1.5"])


def test_recipe_end_to_end_then_cached(tmp_path):
    tokenizer = word_tokenizer()
    model_dir = tmp_path / "tiny-base"
    tiny_llama(len(tokenizer.get_vocab()), seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "toxic.csv"
    rows = "".join(f"hate awful stupid people {i},hate,wom\nthe cat sat {i},nothate,wom\n" for i in range(8))
    corpus.write_text("text,label,target\n" + rows)  # DGHS-like columns: the default filter applies as is
    out = tmp_path / "run"
    overrides = [
        f"model.name_or_path={model_dir}", f"data.path=[{corpus}]",
        f"output_dir={out}", "anti_expert.max_steps=3", "anti_expert.per_device_train_batch_size=2",
        "anti_expert.logging_steps=1", "distill.num_samples=5", "distill.max_length=6", "distill.batch_size=2",
        "distill.start_token=null", "distill.summary_num_samples=2",
    ]
    run = pipeline.run(pipeline.parse_args(overrides)).to_dict()
    assert run["stages"]["anti_expert"]["trained_now"] is True
    assert run["stages"]["anti_expert"]["global_steps"] == 3
    assert run["stages"]["distill"]["num_samples"] == 5 and run["stages"]["distill"]["decoding"] == "fused-lora"
    for name in ("config.yaml", "distill_run.json", "distill_run.md", "anti_expert/adapter_config.json",
                 "distilled/metadata.json", "distilled/summary_samples.jsonl"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "distilled" / "metadata.json").read_text())
    assert meta["num_samples"] == 5 and set(meta["summary"]) >= {"distilled", "base", "anti_expert"}
    stamp = (out / "distilled" / "metadata.json").stat().st_mtime_ns

    again = pipeline.run(pipeline.parse_args(overrides)).to_dict()  # everything cached: no training, no sampling
    assert again["stages"]["anti_expert"]["trained_now"] is False
    assert (out / "distilled" / "metadata.json").stat().st_mtime_ns == stamp

    # The same anti-expert passed by path is named as the run that trained it names it (path@fingerprint), so
    # texts sampled with it count as the same texts (a larger build reuses the smaller one's shards).
    reuse = pipeline.run(pipeline.parse_args([*overrides[:2], f"output_dir={tmp_path / 'reuse'}",
                                              f"anti_expert.pretrained_path={out}/anti_expert", *overrides[3:]]))
    reuse = reuse.to_dict()
    reused = json.loads((tmp_path / "reuse" / "distilled" / "metadata.json").read_text())
    assert reuse["stages"]["anti_expert"]["trained_now"] is False
    assert reused["anti_expert"] == meta["anti_expert"] and reused["anti_expert"].startswith(f"{out}/anti_expert@")
    assert reused["fingerprint"] == meta["fingerprint"]


@pytest.mark.slow
@pytest.mark.integration
def test_embedded_default_under_accelerate_launch(tmp_path):
    """The README's main command on the embedded default (smollm2-135m + local DGHS), at a tiny size."""
    import os

    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    out = tmp_path / "distill"
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(accelerate), "launch", "--num_processes", "1", "--cpu", "recipes/distill.py", f"output_dir={out}",
        "distill.num_samples=8", "distill.max_length=32", "distill.batch_size=4", "distill.summary_num_samples=4",
        "seed=1", "anti_expert.max_steps=2", "anti_expert.per_device_train_batch_size=2",
        "anti_expert.max_length=32", "data.max_samples=16",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", UNIDETOX_DATA_DIR=str(SHARED_DATA))
    proc = subprocesses.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = json.loads((out / "distill_run.json").read_text())
    assert run["stages"]["anti_expert"]["global_steps"] == 2
    assert run["stages"]["distill"]["num_samples"] == 8 and run["stages"]["distill"]["decoding"] == "fused-lora"
    meta = json.loads((out / "distilled" / "metadata.json").read_text())
    assert meta["base"] == "smollm2-135m" and meta["start_token"] == "<|endoftext|>" and meta["seed"] == 1
    assert meta["summary"]["distilled"]["n"] == 8 and meta["summary"]["base"]["n"] == 4
    assert "| distilled (contrastive) | 8 |" in (out / "distill_run.md").read_text()

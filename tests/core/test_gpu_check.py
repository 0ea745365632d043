"""benchmarks/gpu_check.sh: every step of the GPU check runs on CPU (--dry-run), downloads nothing and lands in its
JSON file; the random models it measures have the shipped shapes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import subprocesses
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the check's own modules, run as scripts there

import gpu_check_report  # noqa: E402
from random_models import benchmark_model, model_config, synthetic_texts  # noqa: E402

STEPS = ("environment", "correctness", "sampler_135m", "sampler_7b", "eval_throughput", "detox_text",
         "detox_model", "detox")
TINY = ["num_hidden_layers=2", "hidden_size=288", "intermediate_size=288", "head_dim=16", "vocab_size=8192"]


@pytest.mark.slow
def test_dry_run_records_every_step_ok_and_downloads_nothing(tmp_path):
    out = tmp_path / "x.json"
    cache = tmp_path / "empty_cache"
    cache.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "UNIDETOX_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf")}
    proc = subprocesses.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    report = json.loads(out.read_text())
    failures = {name: s.get("log_tail") for name, s in report["steps"].items() if s["status"] != "ok"}
    assert {name: step["status"] for name, step in report["steps"].items()} == dict.fromkeys(STEPS, "ok"), failures
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith(f"JSON: {out}"), proc.stdout[-3000:]
    assert not any(cache.iterdir()), "the check provisioned a model"

    assert report["mode"] == "dry-run" and report["summary"]["all_ok"]
    for name in STEPS:
        assert report["steps"][name]["exit_code"] == 0 and report["steps"][name]["seconds"] > 0
    correctness = report["steps"]["correctness"]["result"]["checks"]
    assert {key.split("/")[1] for key in correctness} == {"float32", "bfloat16"}
    for name, model in (("sampler_135m", "smollm2-135m"), ("sampler_7b", "llama2-7b")):
        sampler = report["steps"][name]["result"]
        assert sampler["random_init"] and sampler["model"] == model and sampler["dtype"] == "float32"
        assert set(sampler["ratio_to_plain"]) == {"plain", "sampler", "fused"}
        assert report["summary"]["fused_vs_plain"][model]["ratio"] == sampler["ratio_to_plain"]["fused"]
    assert set(report["summary"]["shared_vs_mixed"]) == {"smollm2-135m", "gemma3-270m"}
    detox = report["steps"]["detox"]
    assert "zero2.yaml" in detox["command"] and detox["result"]["train"]["global_step"] == 2


def test_shipped_shapes_are_the_real_models():
    smollm2, gemma3, llama2 = (model_config(name) for name in ("smollm2-135m", "gemma3-270m", "llama2-7b"))
    assert (smollm2.hidden_size, smollm2.num_hidden_layers, smollm2.num_attention_heads,
            smollm2.num_key_value_heads, smollm2.vocab_size, smollm2.tie_word_embeddings) == (576, 30, 9, 3, 49152, True)
    assert (gemma3.hidden_size, gemma3.num_hidden_layers, gemma3.head_dim, gemma3.sliding_window,
            gemma3.layer_types.count("full_attention"), gemma3.vocab_size) == (640, 18, 256, 512, 3, 262144)
    assert (llama2.hidden_size, llama2.num_hidden_layers, llama2.intermediate_size, llama2.vocab_size) == (
        4096, 32, 11008, 32000)


@pytest.mark.parametrize("shape", ["smollm2-135m", "gemma3-270m", "llama2-7b"])
def test_random_model_of_a_shipped_shape_samples_with_its_in_process_tokenizer(shape):
    model, tokenizer = benchmark_model(shape, True, TINY, torch.float32, "cpu")
    assert model.config.num_hidden_layers == 2 and model.config.model_type == model_config(shape).model_type
    inputs = tokenizer(synthetic_texts(2, 3, 8, seed=1), return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=True)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_overrides_need_random_init_and_key_value_pairs():
    with pytest.raises(ValueError, match="--random-init"):
        benchmark_model("smollm2-135m", False, TINY, torch.float32, "cpu")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        benchmark_model("smollm2-135m", True, ["num_hidden_layers"], torch.float32, "cpu")
    with pytest.raises(FileNotFoundError, match="llama2-7b"):
        model_config("no-such-shape")


def test_summary_has_the_fused_ratio_of_each_sampler_step_and_the_shared_ratio_of_each_model():
    def sampler(model, fused):
        return {"status": "ok", "result": {"model": model, "ratio_to_plain": {"plain": 1.0, "fused": fused}}}

    steps = {"sampler_135m": sampler("smollm2-135m", 0.9), "sampler_7b": sampler("llama2-7b", 0.5),
             "eval_throughput": {"status": "ok", "result": [{"model": "smollm2-135m",
                                                             "ratio_to_mixed": {"mixed": 1.0, "shared": 2.5}}]},
             "detox": {"status": "missing"}}
    summary = gpu_check_report.summarize({"steps": steps})
    assert summary["fused_vs_plain"] == {"smollm2-135m": {"ratio": 0.9, "goal": 0.85, "met": True},
                                         "llama2-7b": {"ratio": 0.5, "goal": 0.85, "met": False}}
    assert summary["shared_vs_mixed"] == {"smollm2-135m": 2.5} and summary["all_ok"]


def test_step_records_the_peak_of_its_gpu_memory_readings(tmp_path):
    out, readings = tmp_path / "x.json", tmp_path / "step.gpu_memory"
    readings.write_text("812\n30544\nNo devices were found\n1290\n")
    report = [sys.executable, str(REPO / "benchmarks" / "gpu_check_report.py")]
    subprocesses.run([*report, "init", "--out", str(out), "--mode", "gpu", "--budget-s", "450", "--logs", "logs"],
                     check=True, timeout=300)
    subprocesses.run([*report, "step", "--out", str(out), "--name", "sampler_7b", "--exit-code", "0",
                      "--memory-log", str(readings)], check=True, timeout=300)
    assert json.loads(out.read_text())["steps"]["sampler_7b"]["gpu_memory_peak_mib"] == 30544

"""The detox stage (unidetox.detox.pipeline, recipes/detox.py): config composition, the overrides users type, and
end-to-end runs (tiny local model in-process; an embedded model under `accelerate launch` as the integration test)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import datasets
import pytest
import subprocesses
from tiny import CORPUS, tiny_llama, word_tokenizer

from unidetox import DistilledDetoxDataset
from unidetox.detox import pipeline as detox
from unidetox.hydra_config import CONF_DIR

REPO = Path(__file__).resolve().parents[2]

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "detox" / "experiment").glob("*.yaml"))


def test_every_experiment_composes_and_parses():
    assert {"embedded_smollm2", "embedded_gemma3", "paper_opt6.7b", "paper_llama2_7b"} <= set(EXPERIMENTS)
    for name in EXPERIMENTS:
        parsed = detox.parse_args([f"experiment={name}"])
        assert parsed.trainer.max_steps > 0 and parsed.trainer.output_dir.startswith("runs/detox-")


def test_paper_experiments_keep_the_papers_configuration():
    for name in ("paper_opt6.7b", "paper_llama2_7b"):
        parsed = detox.parse_args([f"experiment={name}"])
        args = parsed.trainer
        assert (args.learning_rate, args.per_device_train_batch_size, args.max_length) == (5e-5, 8, 256)
        assert parsed.peft is None  # full fine-tuning
        assert args.save_total_limit is None
        assert parsed.data.path.endswith("generated_texts_alpha=0.1_beta=inf_checkpoint-15126.csv")
    parsed = detox.parse_args(["experiment=paper_llama2_7b"])
    assert parsed.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    parsed = detox.parse_args(["experiment=paper_opt6.7b"])
    assert parsed.model.name_or_path == "facebook/opt-6.7b"


def test_embedded_models_share_one_configuration():
    parsed_s = detox.parse_args(["experiment=embedded_smollm2"])
    parsed_g = detox.parse_args(["experiment=embedded_gemma3"])
    assert (parsed_s.model.name_or_path, parsed_g.model.name_or_path) == ("smollm2-135m", "gemma3-270m")
    trainer_s = {k: v for k, v in parsed_s.config["trainer"].items() if k != "output_dir"}
    trainer_g = {k: v for k, v in parsed_g.config["trainer"].items() if k != "output_dir"}
    assert trainer_s == trainer_g  # universality: the same configuration for both families
    assert parsed_s.config["peft"] == parsed_g.config["peft"] and parsed_s.config["peft"]["use_peft"]
    assert parsed_s.peft.r == 16 and parsed_s.peft.target_modules == "all-linear"


def test_overrides_as_written():
    parsed = detox.parse_args(
        ["experiment=embedded_gemma3", "data.path=/some/file.csv", "output_dir=/tmp/x", "trainer.max_steps=7"]
    )
    assert parsed.model.name_or_path == "gemma3-270m"
    assert parsed.data.path == "/some/file.csv"
    assert parsed.trainer.output_dir == "/tmp/x" and parsed.trainer.max_steps == 7
    for value, expected in [("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"), ("/models/mine", "/models/mine"),
                            ("gemma3-270m", "gemma3-270m"), ("llama2-7b", "meta-llama/Llama-2-7b-hf"),
                            ("falcon-7b", "tiiuae/falcon-7b")]:
        parsed = detox.parse_args([f"model={value}"])
        assert parsed.model.name_or_path == expected
    parsed = detox.parse_args(["trainer=paper", "data=authors_reference"])
    assert parsed.peft is None and parsed.trainer.learning_rate == 5e-5
    with pytest.raises(Exception, match="not_a_field"):
        detox.parse_args(["+trainer.not_a_field=1"])


def test_data_path_resolution(tmp_path):
    saved = tmp_path / "run" / "distilled"
    DistilledDetoxDataset(datasets.Dataset.from_dict({"text": CORPUS})).save(saved)
    assert detox.resolve_data_path(str(tmp_path / "run")) == saved  # a distill run dir
    assert detox.resolve_data_path(str(saved)) == saved
    with pytest.raises(FileNotFoundError, match="data.path"):
        detox.resolve_data_path(str(tmp_path / "missing"))


def _tiny_model_dir(tmp_path) -> Path:
    tokenizer = word_tokenizer(padding_side="right")
    path = tmp_path / "tiny-model"
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tiny_overrides(tmp_path, out, **extra) -> list[str]:
    wiki = tmp_path / "clean.txt"
    wiki.write_text("\r\n".join(CORPUS))
    csv = tmp_path / "distilled.csv"
    datasets.Dataset.from_dict({"Text": CORPUS}).to_csv(str(csv), index=False)
    values = {
        "model": str(_tiny_model_dir(tmp_path)), "data.path": str(csv), "output_dir": str(out),
        "trainer": "embedded_lora", "trainer.max_steps": 4, "trainer.save_steps": 2, "trainer.learning_rate": 0.01, "trainer.logging_steps": 1,
        "trainer.per_device_train_batch_size": 4, "+trainer.disable_tqdm": True, "peft.r": 4,
        "eval.prompts.source": "file", "eval.prompts.path": str(tmp_path / "prompts.txt"),
        "eval.prompts.split": "all", "eval.prompts.num_prompts": 3, "eval.perplexity_path": str(wiki),
        "eval.callback.num_samples": 2, "eval.callback.max_new_tokens": 4, "eval.callback.ppl_max_length": 16,
        "select.max_ppl_increase": 10.0,
    }
    values.update(extra)
    (tmp_path / "prompts.txt").write_text("the cat sat on\nwe should\nmusic and art\n")
    return [f"{k}={v}" for k, v in values.items()]


def test_recipe_end_to_end_with_a_local_model(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    summary = detox.run(detox.parse_args(_tiny_overrides(tmp_path, out))).summary
    # The run wrote everything it promises.
    for name in ("config.yaml", "README.md", "adapter_config.json", "detox_eval.jsonl", "selected_checkpoint.json",
                 "train_summary.json", "train_summary.md", "loss.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert [r["step"] for r in summary["eval"]] == [0, 2, 4]
    train = summary["train"]
    assert train["global_step"] == 4 and train["tokens_per_second"] > 0
    assert 0 < train["eval_seconds"] < train["train_runtime_s"]  # validation time is reported apart
    assert train["tokens_per_second"] == pytest.approx(
        train["num_tokens"] / (train["train_runtime_s"] - train["eval_seconds"]), rel=1e-3)
    assert len(summary["train"]["loss_curve"]) == 4
    selection = json.loads((out / "selected_checkpoint.json").read_text())
    assert selection["step"] in (2, 4) and Path(selection["merged_path"], "config.json").is_file()
    card = (out / "README.md").read_text()
    assert "tiny-model" in card and "distilled.csv" in card and "learning_rate" in card
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")  # the LoRA run's merged full model
    assert merged.config.vocab_size == len(word_tokenizer())

    # Relaunching the finished run is a no-op: it returns the saved result; no step and no evaluation is repeated.
    lines = (out / "detox_eval.jsonl").read_text().splitlines()
    again = detox.run(detox.parse_args(_tiny_overrides(tmp_path, out))).summary
    assert again == json.loads((out / "train_summary.json").read_text()) and again["train"]["global_step"] == 4
    assert (out / "detox_eval.jsonl").read_text().splitlines() == lines


def test_recipe_full_finetuning_and_resume_false(tmp_path):
    out = tmp_path / "out"
    summary = detox.run(detox.parse_args(_tiny_overrides(tmp_path, out, **{
        "peft.use_peft": "false", "eval.enabled": "false", "trainer.max_steps": 2}))).summary
    assert (out / "model.safetensors").is_file() and not (out / "merged").exists()
    assert "selection" not in summary
    with pytest.raises(FileExistsError, match="resume=false"):
        detox.run(detox.parse_args(_tiny_overrides(tmp_path, out, resume="false")))


@pytest.mark.slow
@pytest.mark.integration
def test_recipe_on_an_embedded_model_under_accelerate_launch(tmp_path, shared_data):
    """CI-size run of the real thing: smollm2-135m, the embedded LoRA configuration, the authors' CSV."""
    out = tmp_path / "detox-smollm2"
    cmd = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--cpu",
        "recipes/detox.py", "experiment=embedded_smollm2", "data=authors_reference", f"output_dir={out}",
        "trainer.max_steps=2", "trainer.save_steps=1", "trainer.max_length=32", "trainer.per_device_train_batch_size=2",
        "trainer.logging_steps=1", "data.max_samples=8", "eval.prompts.num_prompts=2", "eval.callback.num_samples=2",
        "eval.callback.max_new_tokens=5", "eval.callback.ppl_max_length=64", "eval.callback.ppl_max_tokens=128",
        "select.max_ppl_increase=1.0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocesses.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["model"] == "smollm2-135m" and summary["train"]["global_step"] == 2
    assert [r["step"] for r in summary["eval"]] == [0, 1, 2]
    assert all(r["perplexity"] > 1 for r in summary["eval"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert merged.config.model_type == "llama" and tokenizer.eos_token == "<|im_end|>"
    assert "smollm2-135m" in (out / "README.md").read_text()

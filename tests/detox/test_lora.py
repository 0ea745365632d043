"""One LoRA settings type (unidetox.lora.LoraArguments) for the anti-expert and the detox stage, with the
fingerprints and run records of the shipped configurations exactly as they were before it (the expected values were
computed by the code that built the LoraConfig on each side separately)."""

from __future__ import annotations

import hashlib
import json

import datasets
import pytest
from peft import LoraConfig
from tiny import tiny_llama

from unidetox.detox import pipeline as detox
from unidetox.distill import pipeline as distill
from unidetox.distill.anti_expert import AntiExpertConfig, anti_expert_fingerprint
from unidetox.lora import LoraArguments

# AntiExpertConfig.fingerprint_settings() of the dataclass defaults and of the shipped `lora_embedded` preset.
PAPER_SETTINGS = {
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-08, "bf16": False, "data_seed": None,
    "eos_token": None, "fp16": False, "gradient_accumulation_steps": 1, "learning_rate": 1e-05, "lora_alpha": 32,
    "lora_dropout": 0.05, "lora_r": 16, "lora_target_modules": None, "lr_scheduler_type": "linear",
    "max_grad_norm": 1.0, "max_length": 128, "max_steps": -1, "num_train_epochs": 3.0, "optim": "adamw_torch_fused",
    "packing": False, "per_device_train_batch_size": 4, "seed": 42, "start_token": None, "use_peft": False,
    "warmup_steps": 0, "weight_decay": 0.0,
}
LORA_EMBEDDED_SETTINGS = {
    **PAPER_SETTINGS, "learning_rate": 0.001, "lr_scheduler_type": "constant", "max_steps": 64,
    "per_device_train_batch_size": 8, "start_token": "<|endoftext|>", "use_peft": True,
}
# sha256 of the detox run record (the composed config, data_dir=/data) of each shipped preset.
DETOX_RECORD_SHA256 = {
    (): "b3030a68b77989f07a134806a0ee828b2b0eae249506162608f9fba3d2160ecd",
    ("trainer=paper",): "35afebfbb0331d4ec8c4db0fe417415893c4bc20f23bbdef5b06e0723d52086f",
    ("trainer=embedded_lora",): "3f6a4c2f1fde17d0b9c20bee58c2b07a93ae572ef48a4a83eb19700d68957904",
    ("experiment=embedded_gemma3",): "b43f4659bd5ff047c2e838dc6bfef4df5e26d69399c85c0cd4e5c4fc6877737f",
}
# The adapter both stages trained for the shipped LoRA presets, as each stage built it before.
SHIPPED_ADAPTER = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def test_the_anti_expert_fingerprint_settings_of_the_shipped_configs_are_unchanged(tmp_path):
    paper = AntiExpertConfig(output_dir=str(tmp_path))
    assert paper.fingerprint_settings() == PAPER_SETTINGS
    embedded = distill.parse_args(["anti_expert=lora_embedded"]).anti_expert
    assert embedded.fingerprint_settings() == LORA_EMBEDDED_SETTINGS
    corpus = datasets.Dataset.from_dict({"text": ["a b c", "d e f"]})
    _, record = anti_expert_fingerprint("tiny", tiny_llama(8), corpus, embedded)
    assert record["settings"] == LORA_EMBEDDED_SETTINGS
    assert embedded.lora_config().to_dict() == SHIPPED_ADAPTER.to_dict()
    assert paper.lora_config() is None  # full fine-tuning: no adapter


@pytest.mark.parametrize("overrides", list(DETOX_RECORD_SHA256), ids=lambda o: " ".join(o) or "default")
def test_the_detox_run_records_and_adapters_of_the_shipped_presets_are_unchanged(overrides):
    args = detox.parse_args([*overrides, "++data_dir=/data"])
    digest = hashlib.sha256(json.dumps(args.config, sort_keys=True).encode()).hexdigest()
    assert digest == DETOX_RECORD_SHA256[overrides]
    if overrides == ("trainer=paper",):
        assert args.peft is None
    else:
        assert args.peft.to_dict() == SHIPPED_ADAPTER.to_dict()


def test_the_detox_peft_section_is_checked_and_names_its_keys():
    assert detox.parse_args(["peft.r=4"]).peft.r == 4
    with pytest.raises(ValueError, match=r"`r` \(the anti-expert's `lora_r`\) has to be >= 1"):
        detox.parse_args(["peft.r=0"])
    with pytest.raises(ValueError, match=r"Unknown key 'rank' in section 'peft'.*lora_alpha"):
        detox.parse_args(["+peft.rank=4"])


def test_lora_settings_are_checked_only_when_used():
    assert LoraArguments(use_peft=False, r=0).peft_config() is None
    with pytest.raises(ValueError, match="lora_alpha"):
        LoraArguments(use_peft=True, lora_alpha=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraArguments(use_peft=True, lora_dropout=1.0)
    config = LoraArguments(use_peft=True, target_modules=["q_proj", "v_proj"], use_rslora=True).peft_config()
    assert config.target_modules == {"q_proj", "v_proj"} and config.use_rslora and config.task_type == "CAUSAL_LM"

"""The anti-expert's card, embedded bases named by their Hub ids, and the stages' push_to_hub switch (Hub mocked)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
from huggingface_hub import HfApi, ModelCard
from tiny import tiny_llama, word_tokenizer

from tests.detox.test_detox_recipe import _tiny_overrides
from unidetox.detox import pipeline as detox
from unidetox.distill.anti_expert import AntiExpertConfig, train_anti_expert
from unidetox.distill.corpus import ToxicCorpusConfig
from unidetox.embedded_models import CACHE_ENV_VAR, EMBEDDED_MODELS, embedded_hub_id
from unidetox.hub import hub_adapter_config, push_if_requested

TOXIC = ["hate awful stupid ugly people", "kill the stupid ugly cat", "awful people hate music"] * 4
TOKEN = "hf_notARealTokenButSecret0123"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def hub(monkeypatch):
    """The Hub client mocked: every call, with the files an upload would send."""
    calls = []

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **kwargs):
        from huggingface_hub import RepoUrl

        calls.append(("create_repo", {"repo_id": repo_id, "repo_type": repo_type, "private": private,
                                      "token": self.token}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None, **kwargs):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        calls.append(("upload_folder", {"repo_id": repo_id, "repo_type": repo_type, "files": files,
                                        "commit_message": commit_message, "token": self.token}))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_embedded_models_name_their_hub_ids_by_name_and_by_cache_directory(tmp_path, monkeypatch):
    assert {name: spec.hub_id for name, spec in EMBEDDED_MODELS.items()} == {
        "smollm2-135m": SMOLLM2_HUB_ID, "gemma3-270m": "google/gemma-3-270m"}
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))
    assert embedded_hub_id(tmp_path / "models" / "gemma3-270m") == "google/gemma-3-270m"
    assert embedded_hub_id(tmp_path / "models" / "other") is None and embedded_hub_id("gpt2") is None
    local = {"peft_type": "LORA", "base_model_name_or_path": str(tmp_path / "models" / "smollm2-135m")}
    assert hub_adapter_config(local)["base_model_name_or_path"] == SMOLLM2_HUB_ID
    assert local["base_model_name_or_path"] == str(tmp_path / "models" / "smollm2-135m")  # input untouched
    assert hub_adapter_config({"peft_type": "LORA", "base_model_name_or_path": "gpt2"})["base_model_name_or_path"] == "gpt2"


@pytest.fixture
def anti_expert(tmp_path, monkeypatch, hub):
    """A LoRA anti-expert of a tiny model standing in for the embedded smollm2-135m (its config names its cache)."""
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    tokenizer = word_tokenizer(padding_side="right")
    model = tiny_llama(len(tokenizer), seed=0)
    model.name_or_path = str(tmp_path / "cache" / "models" / "smollm2-135m")  # as from_pretrained sets it
    config = AntiExpertConfig(
        output_dir=str(tmp_path / "anti_expert"), max_steps=2, learning_rate=1e-2, per_device_train_batch_size=4,
        logging_steps=1, disable_tqdm=True, report_to="none", push_to_hub=True, hub_model_id="me/anti-expert",
        hub_token=TOKEN, hub_private_repo=True, use_peft=True, lora_r=4, lora_alpha=8,
    )
    corpus = ToxicCorpusConfig(path=["dghs/db_dev.csv", "dghs/db_test.csv"], filters={"label": ["hate"]})
    result = train_anti_expert(model, tokenizer, datasets.Dataset.from_dict({"text": TOXIC}), config,
                               base_name_or_path="smollm2-135m", corpus_config=corpus)
    return result, config


def test_anti_expert_card_warns_names_the_data_and_the_hub_base(anti_expert, hub):
    result, _ = anti_expert
    assert hub == []  # the Trainer itself pushed nothing: the stage pushes the saved anti-expert
    text = (result.path / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.base_model == SMOLLM2_HUB_ID and card.data.library_name == "peft"
    assert "not-for-all-audiences" in card.data.tags
    assert "Content warning" in text and "hate speech" in text and "do not deploy it" in text
    assert "12 rows of the hate rows of DGHS" in text and '`label` in ["hate"]' in text
    assert "de-quantized from the 4-bit GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf`" in text
    assert "More Information Needed" not in text and str(result.path.parent / "cache") not in text


def test_push_uploads_model_files_with_the_hub_base_and_keeps_the_token_out(anti_expert, hub, caplog):
    caplog.set_level(logging.DEBUG)
    result, config = anti_expert
    local_config = json.loads((result.path / "adapter_config.json").read_text())
    url = push_if_requested(config, result.path, "Upload an anti-expert")
    assert url == "https://huggingface.co/me/anti-expert"
    (_, repo), (_, upload) = hub
    assert repo == {"repo_id": "me/anti-expert", "repo_type": "model", "private": True, "token": TOKEN}
    files = upload["files"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(files)
    assert "unidetox_anti_expert.json" not in files and "training_args.bin" not in files
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == SMOLLM2_HUB_ID
    # The local copy still loads offline: it keeps its path into the local cache.
    assert json.loads((result.path / "adapter_config.json").read_text()) == local_config
    assert local_config["base_model_name_or_path"].endswith("models/smollm2-135m")
    assert all(TOKEN.encode() not in content for content in files.values())
    assert TOKEN not in caplog.text and "me/anti-expert" in caplog.text


def test_push_is_off_by_default_and_refuses_a_bad_repo_id(anti_expert, hub):
    result, config = anti_expert
    config.push_to_hub = False
    assert push_if_requested(config, result.path, "x") is None
    config.push_to_hub, config.hub_model_id = True, "not a repo id"
    with pytest.raises(ValueError, match="hub_model_id"):
        push_if_requested(config, result.path, "x")
    assert hub == []


def test_detox_run_pushes_its_final_model_once_when_asked(tmp_path, hub):
    out = tmp_path / "out"
    overrides = _tiny_overrides(tmp_path, out, **{"++trainer.push_to_hub": "true",
                                                  "++trainer.hub_model_id": "me/detoxed",
                                                  "++trainer.hub_token": TOKEN})
    detox.run(detox.parse_args(overrides))
    assert [name for name, _ in hub] == ["create_repo", "upload_folder"]  # no push per checkpoint
    upload = hub[1][1]
    assert upload["repo_id"] == "me/detoxed" and "adapter_model.safetensors" in upload["files"]
    assert "UniDetox" in upload["files"]["README.md"].decode()
    assert all(TOKEN.encode() not in content for content in upload["files"].values())
    assert not [p for p in out.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]

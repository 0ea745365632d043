"""No secret in any file a run writes: the saved training arguments of every checkpoint and of the anti-expert, and
a key inside a list of overrides in a saved config."""

import json
from pathlib import Path

import pytest
import torch
from tiny import quick_detox_overrides, tiny_llama, word_tokenizer

from unidetox.detox import pipeline as detox
from unidetox.distill import pipeline as distill
from unidetox.hydra_config import save_resolved_config
from unidetox.run_dir import CONFIG_FILE
from unidetox.secret_masking import (
    JOB_SECRET_PREFIX,
    mask_secrets,
    mask_text,
    secrets_from_environment,
    secrets_to_environment,
)

SENTINEL = "hf_SENTINEL7c1d0a"


def _files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def _saved_hub_tokens(root: Path) -> dict[str, object]:
    # Only the test unpickles them; the library never loads a pickle.
    return {str(p.relative_to(root)): torch.load(p, weights_only=False).hub_token
            for p in sorted(root.rglob("training_args.bin"))}


def test_detox_saves_no_hub_token_in_any_file_and_keeps_it_for_pushing(tmp_path):
    out = tmp_path / "out"
    args = detox.parse_args([*quick_detox_overrides(tmp_path, out), f"+trainer.hub_token={SENTINEL}"])
    detox.run(args)
    tokens = _saved_hub_tokens(out)
    assert set(tokens) >= {"training_args.bin", "checkpoint-1/training_args.bin", "checkpoint-2/training_args.bin"}
    assert set(tokens.values()) == {None}
    assert _files_holding(out, SENTINEL) == []
    assert args.trainer.hub_token == SENTINEL  # the run's own arguments keep it: pushing still has its token


def test_a_distill_run_saves_no_hub_token_in_any_file(tmp_path):
    tokenizer = word_tokenizer()
    model = tmp_path / "tiny-base"
    tiny_llama(len(tokenizer.get_vocab())).save_pretrained(model)
    tokenizer.save_pretrained(model)
    corpus = tmp_path / "toxic.csv"
    corpus.write_text("text,label,target\n" + "".join(f"hate awful stupid people {i},hate,wom\n" for i in range(8)))
    out = tmp_path / "run"
    args = distill.parse_args([
        f"model.name_or_path={model}", f"data.path=[{corpus}]", f"output_dir={out}", "anti_expert.max_steps=2",
        "anti_expert.per_device_train_batch_size=2", "distill.num_samples=2",
        "distill.max_length=4", "distill.batch_size=2", "distill.start_token=null", "distill.summary_num_samples=0",
        f"+anti_expert.hub_token={SENTINEL}"])
    distill.run(args)
    assert set(_saved_hub_tokens(out)) == {"anti_expert/training_args.bin"}
    assert set(_saved_hub_tokens(out).values()) == {None}
    assert _files_holding(out, SENTINEL) == []
    assert args.anti_expert.hub_token == SENTINEL


def test_a_key_inside_a_list_of_overrides_reaches_no_saved_config(tmp_path):
    key = "AIzaSENTINEL42"
    config = {"test": {"overrides": ["scorer=perspective", f"scorer.api_key={key}"]},
              "overrides": [f"test.overrides=['scorer=perspective','scorer.api_key={key}']", "+hf_token=x=y"]}
    save_resolved_config(config, tmp_path)
    assert _files_holding(tmp_path, key) == [] and _files_holding(tmp_path, "x=y") == []
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert saved["test"]["overrides"] == ["scorer=perspective", "scorer.api_key=***"]
    assert saved["overrides"] == ["test.overrides=['scorer=perspective','scorer.api_key=***']", "+hf_token=***"]
    assert mask_secrets(config) != config and config["test"]["overrides"][1].endswith(key)  # input left as it was


def test_mask_text_hides_only_secret_values():
    assert mask_text("scorer.apikey=abc model=x url?key=k&n=2") == "scorer.apikey=*** model=x url?key=***&n=2"
    assert mask_text('scorer.api_key="a b" pad_token=<pad>') == "scorer.api_key=*** pad_token=<pad>"


def test_job_secrets_travel_by_environment_variable_names_only():
    from omegaconf import OmegaConf

    config = OmegaConf.create({"scorer": {"api_key": "key-0123"}, "runs": [{"hub_token": "hf_abc"}], "seed": 0})
    args = ({"config": config, "hub_token": "hf_abc"}, ["plain"])
    masked, env = secrets_to_environment(args)
    assert sorted(env.values()) == ["hf_abc", "key-0123"] and all(k.startswith(JOB_SECRET_PREFIX) for k in env)
    text = repr(masked) + OmegaConf.to_yaml(masked[0]["config"])
    assert "hf_abc" not in text and "key-0123" not in text
    assert masked[1] is args[1] and config.scorer.api_key == "key-0123"  # untouched parts shared, inputs intact
    restored = secrets_from_environment(masked, env)
    assert restored[0]["hub_token"] == "hf_abc" and restored[0]["config"].runs[0].hub_token == "hf_abc"
    with pytest.raises(KeyError, match="not set here"):
        secrets_from_environment(masked, {})

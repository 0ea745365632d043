"""The distill stage against bad input and reused directories: caches keyed by weights, clear load errors."""

import copy
import json
import logging
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_gemma3, tiny_llama

import unidetox.decoding.fused as fused
import unidetox.distill.distiller as dataset_module
from unidetox import DistilledDetoxDataset
from unidetox.distill.config import DistillConfig
from unidetox.distill.shards import SHARD_CONFIG_FILE, SHARDS_DIR

DISTILL = DistillConfig(num_samples=4, max_length=6, batch_size=2, summary_num_samples=0)
KWARGS = dict(distill=DISTILL, seed=0, show_progress=False)


def lora_on(model, seed=123):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                        lora_dropout=0.0)
    return get_peft_model(model, config).eval()


# ----------------------------------------------------------------------------------------------------------
# The shard cache identifies models by their weights
# ----------------------------------------------------------------------------------------------------------
def test_two_in_memory_anti_experts_never_share_one_cache(tmp_path, base, vocab, tokenizer):
    out = tmp_path / "d"
    first = DistilledDetoxDataset.build(base, tiny_llama(vocab, seed=1), tokenizer, output_dir=out, **KWARGS)
    with pytest.raises(ValueError, match=r"other settings \(anti_expert: 'LlamaForCausalLM@\w+' -> "):
        DistilledDetoxDataset.build(base, tiny_llama(vocab, seed=2), tokenizer, output_dir=out, **KWARGS)
    # a grown build with another anti-expert must not append its rows to the old ones either
    with pytest.raises(ValueError, match="anti_expert"):
        DistilledDetoxDataset.build(base, tiny_llama(vocab, seed=2), tokenizer, output_dir=out,
                                    **{**KWARGS, "distill": replace(DISTILL, num_samples=6)})
    # the same weights in a new object are the same anti-expert: the cache is reused
    again = DistilledDetoxDataset.build(base, tiny_llama(vocab, seed=1), tokenizer, output_dir=out, **KWARGS)
    assert again.texts == first.texts


def test_two_adapters_on_one_base_never_share_one_cache(tmp_path, base, tokenizer):
    out = tmp_path / "d"
    first, second = lora_on(copy.deepcopy(base), seed=1), lora_on(copy.deepcopy(base), seed=2)
    DistilledDetoxDataset.build(base, first, tokenizer, output_dir=out, **KWARGS)
    with pytest.raises(ValueError, match="anti_expert"):
        DistilledDetoxDataset.build(base, second, tokenizer, output_dir=out, **KWARGS)


def test_two_in_memory_bases_never_share_one_cache(tmp_path, vocab, tokenizer):
    out = tmp_path / "d"
    anti = tiny_llama(vocab, seed=1)
    DistilledDetoxDataset.build(tiny_llama(vocab, seed=0), anti, tokenizer, output_dir=out, **KWARGS)
    with pytest.raises(ValueError, match=r"other settings \(base: "):
        DistilledDetoxDataset.build(tiny_llama(vocab, seed=3), anti, tokenizer, output_dir=out, **KWARGS)


def test_explicit_ids_are_recorded_as_given(tmp_path, base, vocab, tokenizer):
    out = tmp_path / "d"
    built = DistilledDetoxDataset.build(base, tiny_llama(vocab, seed=1), tokenizer, output_dir=out,
                                        base_id="tiny", anti_expert_id="runs/anti@0123456789ab", **KWARGS)
    assert built.metadata["base"] == "tiny" and built.metadata["anti_expert"] == "runs/anti@0123456789ab"
    config = json.loads((out / SHARDS_DIR / SHARD_CONFIG_FILE).read_text())
    assert (config["base"], config["anti_expert"]) == ("tiny", "runs/anti@0123456789ab")


def test_saved_anti_expert_path_is_identified_by_its_weight_files(tmp_path, base, vocab, tokenizer):
    saved = tmp_path / "anti"
    tiny_llama(vocab, seed=1).save_pretrained(saved)
    out = tmp_path / "d"
    built = DistilledDetoxDataset.build(base, str(saved), tokenizer, output_dir=out, **KWARGS)
    assert built.metadata["anti_expert"].startswith(f"{saved}@")
    tiny_llama(vocab, seed=2).save_pretrained(saved)  # other weights under the same path
    with pytest.raises(ValueError, match="anti_expert"):
        DistilledDetoxDataset.build(base, str(saved), tokenizer, output_dir=out, **KWARGS)


# ----------------------------------------------------------------------------------------------------------
# A saved adapter next to an in-memory base
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def saved_adapter(tmp_path, base):
    path = tmp_path / "adapter"
    peft_model = lora_on(copy.deepcopy(base))
    peft_model.save_pretrained(path)  # no tokenizer files, and no recorded base path
    return path, peft_model


def test_saved_adapter_is_attached_to_the_given_base(saved_adapter, base, vocab, tokenizer):
    path, peft_model = saved_adapter
    reference = copy.deepcopy(base)
    from_path = DistilledDetoxDataset.build(base, str(path), tokenizer, **KWARGS)
    in_memory = DistilledDetoxDataset.build(reference, peft_model, tokenizer, **KWARGS)
    assert from_path.metadata["decoding"] == "fused-lora"
    assert from_path.texts == in_memory.texts
    # another base under the same adapter gives other texts: the base is used, not ignored
    other = DistilledDetoxDataset.build(tiny_llama(vocab, seed=7), str(path), tokenizer, **KWARGS)
    assert other.texts != from_path.texts
    # the caller's base is not modified (no adapter layers injected into it)
    assert not any("lora" in type(m).__module__ for m in base.modules())


@pytest.mark.parametrize("content", ["not json", "{}", "[1, 2]"])
def test_garbage_adapter_config_is_named(tmp_path, base, tokenizer, content):
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        DistilledDetoxDataset.build(base, str(path), tokenizer, **KWARGS)


# ----------------------------------------------------------------------------------------------------------
# One fused-vs-two-model dispatch
# ----------------------------------------------------------------------------------------------------------
def test_build_samples_through_the_dispatch_of_contrastive_generate(monkeypatch, base, vocab, tokenizer):
    assert dataset_module.resolve_models is fused.resolve_models
    assert dataset_module.generate_resolved is fused.generate_resolved
    calls = []

    def spy(models, *args, **kwargs):
        calls.append(models.decoding)
        return fused.generate_resolved(models, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "generate_resolved", spy)
    DistilledDetoxDataset.build(copy.deepcopy(base), lora_on(base), tokenizer, **KWARGS)
    DistilledDetoxDataset.build(tiny_llama(vocab, seed=0), tiny_llama(vocab, seed=1), tokenizer, **KWARGS)
    assert calls == ["fused-lora"] * 2 + ["two-model"] * 2


def test_adapter_on_another_base_runs_as_two_models(base, vocab, tokenizer):
    """Fusing would take the base half from the adapter's own base; with other weights that is not `base`."""
    other = lora_on(tiny_llama(vocab, seed=5))
    merged = copy.deepcopy(other).merge_and_unload()
    got = DistilledDetoxDataset.build(base, other, tokenizer, **KWARGS)
    expected = DistilledDetoxDataset.build(base, merged, tokenizer, **KWARGS)
    assert got.metadata["decoding"] == "two-model"
    assert got.texts == expected.texts
    with pytest.raises(ValueError, match="fused=True"):
        DistilledDetoxDataset.build(base, other, tokenizer, **{**KWARGS, "distill": replace(DISTILL, fused=True)})


# ----------------------------------------------------------------------------------------------------------
# A failed build leaves no settings behind
# ----------------------------------------------------------------------------------------------------------
def test_failed_model_check_writes_no_shard_config(tmp_path, base, vocab, tokenizer):
    out = tmp_path / "d"
    with pytest.raises(ValueError, match="shared vocabulary"):
        DistilledDetoxDataset.build(base, tiny_gemma3(40), tokenizer, output_dir=out, **KWARGS)
    assert not (out / SHARDS_DIR / SHARD_CONFIG_FILE).exists()
    fixed = DistilledDetoxDataset.build(base, tiny_llama(vocab, seed=1), tokenizer, output_dir=out, **KWARGS)
    assert len(fixed) == 4


# ----------------------------------------------------------------------------------------------------------
# Loading text files
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", r"empty\.csv is empty"),
        ("header.csv", "Text\n", r"header\.csv has no rows"),
        ("empty.jsonl", "", r"empty\.jsonl is empty"),
        ("blank.jsonl", "\n\n", r"blank\.jsonl is empty"),
        ("numbers.jsonl", '{"text": 1}\n{"text": null}\n{"text": 2.5}\n',
         r"numbers\.jsonl has no text.*3 of 3 rows dropped \(3 not strings, 0 blank\)"),
        ("blanks.csv", 'text\n" "\n""\n',
         r"blanks\.csv has no text.*2 of 2 rows dropped \(1 not strings, 1 blank\)"),
    ],
)
def test_load_of_a_file_without_text_names_it(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        DistilledDetoxDataset.load(path)


def test_load_counts_dropped_rows(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "a"}\n{"text": 5}\n{"text": "  "}\n{"text": "b"}\n')
    with caplog.at_level(logging.WARNING, logger="unidetox.distill.dataset"):
        loaded = DistilledDetoxDataset.load(path)
    assert loaded.texts == ["a", "b"]
    assert "dropped 2 of 4 rows" in caplog.text and "1 not strings, 1 blank" in caplog.text

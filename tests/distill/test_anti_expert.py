import json

import datasets
import pytest
import torch
from tiny import tiny_llama, word_tokenizer

from unidetox.distill.anti_expert import (
    MARKER_FILE,
    AntiExpertConfig,
    build_anti_expert_trainer,
    load_anti_expert,
    read_marker,
    train_anti_expert,
)

TOXIC = ["hate awful stupid ugly people", "kill the stupid ugly cat", "awful people hate music"] * 6


def assert_merged_logits_match(merged_logits, lora_logits, config):
    """Logits of a LoRA-merged model against the unmerged one's, both float32, at a tolerance the arithmetic sets.

    The two compute the same exact values rounded differently: merged, each weight W + s·BA is rounded once;
    unmerged, Wx and s·B(Ax) are rounded apart and added. A float32 dot product of length n is off by at most
    n·u (u = 2^-24, Higham's γ_n) relative to the sum of its terms' magnitudes. Per layer the longest sums run over
    the hidden and the intermediate size, each layer's error carries on to the logits, and the logits' own scale
    stands for the magnitude of the head's terms: u · (hidden + intermediate) · layers · max|logit|. For the tiny
    models here that is about 1e-4, against differences of 3e-6 to 1.2e-5 seen; a bug (a missing or doubled
    adapter, a wrong scale) moves logits by orders of magnitude more."""
    unit_roundoff = torch.finfo(torch.float32).eps / 2
    longest_sums = (config.hidden_size + config.intermediate_size) * config.num_hidden_layers
    atol = unit_roundoff * longest_sums * lora_logits.abs().max().item()
    torch.testing.assert_close(merged_logits, lora_logits, atol=atol, rtol=0.0)


@pytest.fixture
def tokenizer():
    # pad == eos, as for SmolLM2: padding must be masked by position, never by token id.
    tok = word_tokenizer(padding_side="right", add_bos=False)
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture
def corpus():
    return datasets.Dataset.from_dict({"text": TOXIC})


@pytest.fixture
def saved_base(tmp_path, tokenizer):
    """A tiny base saved to disk, so that LoRA anti-experts can be rebuilt from its path."""
    path = tmp_path / "base"
    model = tiny_llama(len(tokenizer.get_vocab()), seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "anti"), max_steps=6, learning_rate=1e-2, per_device_train_batch_size=4,
                    logging_steps=1, disable_tqdm=True, lr_scheduler_type="constant")
    defaults.update(kwargs)
    return AntiExpertConfig(**defaults)


def test_labels_masked_on_padding_only(tmp_path, tokenizer, corpus):
    model = tiny_llama(len(tokenizer.get_vocab()), seed=0)
    texts = datasets.Dataset.from_dict({"text": ["hate", "kill the stupid ugly cat people"]})
    trainer = build_anti_expert_trainer(model, tokenizer, texts, config(tmp_path, per_device_train_batch_size=2))
    batch = next(iter(trainer.get_train_dataloader()))
    mask = batch["attention_mask"].bool()
    assert (~mask).any(), "the batch should contain padding"
    assert (batch["labels"][~mask] == -100).all()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    # The appended EOS of the short text is a real token (same id as pad) and keeps its label.
    eos = tokenizer.eos_token_id
    short = int(mask.sum(-1).argmin())
    last_real = int(mask[short].sum()) - 1
    assert batch["input_ids"][short, last_real] == eos and batch["labels"][short, last_real] == eos


def test_lora_training_learns_saves_and_reloads(tmp_path, tokenizer, corpus, saved_base):
    model = tiny_llama(len(tokenizer.get_vocab()), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config(tmp_path, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    result = train_anti_expert(model, tokenizer, corpus, cfg, base_name_or_path=saved_base)
    assert result.trained and result.is_adapter
    meta = read_marker(result.path)
    assert meta["kind"] == "lora" and meta["global_steps"] == 6
    assert meta["last_logged_loss"] < meta["first_logged_loss"]
    assert not (result.path / "model.safetensors").exists()  # only the adapter is saved

    # The base weights are frozen; the merged anti-expert differs from the base and matches the trained model.
    trained = model  # SFTTrainer wraps it in place with LoRA layers
    base_after = {k.replace("base_layer.", ""): v for k, v in trained.state_dict().items() if "lora_" not in k}
    for key, value in before.items():
        assert torch.equal(base_after[key], value), key
    anti = load_anti_expert(result.path)
    assert anti.__class__.__name__ == "LlamaForCausalLM"
    ids = tokenizer(["hate awful stupid"], return_tensors="pt")["input_ids"]
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        got = anti(input_ids=ids).logits
        base_logits = tiny_llama(len(tokenizer.get_vocab()), seed=0)(input_ids=ids).logits
    assert_merged_logits_match(got, expected, anti.config)
    assert not torch.allclose(got, base_logits, atol=1e-3)


def test_full_finetune_changes_weights_and_lowers_toxic_nll(tmp_path, tokenizer, corpus):
    model = tiny_llama(len(tokenizer.get_vocab()), seed=0)
    ref = tiny_llama(len(tokenizer.get_vocab()), seed=0)
    result = train_anti_expert(model, tokenizer, corpus, config(tmp_path), base_name_or_path="tiny")
    assert (result.path / "model.safetensors").is_file() and not result.is_adapter
    anti = load_anti_expert(result.path)
    batch = tokenizer(TOXIC[:3], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        nll_anti = anti(**batch, labels=labels).loss
        nll_ref = ref(**batch, labels=labels).loss
    assert nll_anti < nll_ref - 0.5


def test_reuse_skips_training_and_mismatch_raises(tmp_path, tokenizer, corpus):
    make = lambda: tiny_llama(len(tokenizer.get_vocab()), seed=0)  # noqa: E731
    cfg = config(tmp_path, use_peft=True, lora_r=4)
    first = train_anti_expert(make(), tokenizer, corpus, cfg, base_name_or_path="tiny")
    weights = first.path / "adapter_model.safetensors"
    stamp = (weights.stat().st_mtime_ns, (first.path / MARKER_FILE).stat().st_mtime_ns)

    again = train_anti_expert(make(), tokenizer, corpus, cfg, base_name_or_path="tiny")
    assert not again.trained and again.metadata["fingerprint"] == first.metadata["fingerprint"]
    assert (weights.stat().st_mtime_ns, (first.path / MARKER_FILE).stat().st_mtime_ns) == stamp

    with pytest.raises(ValueError, match=r"learning_rate: 0.01 -> 0.02.*overwrite=True"):
        train_anti_expert(make(), tokenizer, corpus, config(tmp_path, use_peft=True, lora_r=4, learning_rate=2e-2),
                          base_name_or_path="tiny")
    other_corpus = datasets.Dataset.from_dict({"text": TOXIC[::-1]})
    with pytest.raises(ValueError, match="corpus_sha256"):
        train_anti_expert(make(), tokenizer, other_corpus, cfg, base_name_or_path="tiny")
    redo = train_anti_expert(make(), tokenizer, corpus,
                             config(tmp_path, use_peft=True, lora_r=4, learning_rate=2e-2, overwrite=True),
                             base_name_or_path="tiny")
    assert redo.trained and redo.metadata["fingerprint"] != first.metadata["fingerprint"]
    assert json.loads((first.path / MARKER_FILE).read_text())["fingerprint"] == redo.metadata["fingerprint"]


def test_start_token_prepended_once(tmp_path, corpus):
    tok = word_tokenizer(padding_side="right", add_bos=False)
    model = tiny_llama(len(tok.get_vocab()), seed=0)
    trainer = build_anti_expert_trainer(model, tok, corpus, config(tmp_path, start_token="<s>"))
    first_ids = {row["input_ids"][0] for row in trainer.train_dataset}
    assert first_ids == {tok.convert_tokens_to_ids("<s>")}
    # A tokenizer that already starts every text with the token: no doubling.
    tok_bos = word_tokenizer(padding_side="right", add_bos=True)
    trainer = build_anti_expert_trainer(model, tok_bos, corpus, config(tmp_path, start_token="<s>"))
    rows = list(trainer.train_dataset)
    assert all(r["input_ids"][0] == 1 and r["input_ids"][1] != 1 for r in rows)
    with pytest.raises(ValueError, match=r"`start_token` '<\|endoftext\|>' is not a token"):
        build_anti_expert_trainer(model, tok, corpus, config(tmp_path, start_token="<|endoftext|>"))


def test_config_checks(tmp_path, tokenizer, corpus):
    with pytest.raises(ValueError, match="lora_r"):
        AntiExpertConfig(output_dir=str(tmp_path), use_peft=True, lora_r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        AntiExpertConfig(output_dir=str(tmp_path), use_peft=True, lora_dropout=1.0)
    with pytest.raises(ValueError, match="num_train_epochs"):
        AntiExpertConfig(output_dir=str(tmp_path), num_train_epochs=0, max_steps=-1)
    paper = AntiExpertConfig(output_dir=str(tmp_path))
    assert (paper.learning_rate, paper.num_train_epochs, paper.per_device_train_batch_size) == (1e-5, 3.0, 4)
    assert not paper.use_peft and not paper.activation_checkpointing and not paper.bf16
    with pytest.raises(ValueError, match="pretrained_path"):
        train_anti_expert(tiny_llama(8), tokenizer, corpus, config(tmp_path, pretrained_path="x"))
    with pytest.raises(FileNotFoundError, match="No anti-expert at"):
        load_anti_expert(tmp_path / "missing" / "dir")


def test_training_keeps_checkpoint_dirs_it_did_not_create(tmp_path, tokenizer, corpus):
    foreign = tmp_path / "anti" / "checkpoint-99"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("someone else's")
    train_anti_expert(tiny_llama(len(tokenizer.get_vocab()), seed=0), tokenizer, corpus, config(tmp_path),
                      base_name_or_path="tiny")
    assert (foreign / "notes.txt").read_text() == "someone else's"


def test_training_removes_only_its_own_checkpoints(tmp_path, tokenizer, corpus):
    cfg = config(tmp_path, save_strategy="steps", save_steps=3)
    result = train_anti_expert(tiny_llama(len(tokenizer.get_vocab()), seed=0), tokenizer, corpus, cfg,
                               base_name_or_path="tiny")
    assert result.trained and not list(result.path.glob("checkpoint-*"))
    # Checkpoints that this training did not write could be overwritten by its own: refuse, naming them.
    foreign = tmp_path / "other" / "checkpoint-3"
    foreign.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"did not write \(checkpoint-3\), and `save_strategy='steps'`"):
        other = config(tmp_path, output_dir=str(tmp_path / "other"), save_strategy="steps", save_steps=3)
        train_anti_expert(tiny_llama(len(tokenizer.get_vocab()), seed=0), tokenizer, corpus, other,
                          base_name_or_path="tiny")
    assert foreign.is_dir()


def test_anti_expert_saved_without_tokenizer_files_loads(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer.get_vocab()), seed=1)
    model.save_pretrained(tmp_path / "full")
    loaded = load_anti_expert(tmp_path / "full")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)

    from peft import LoraConfig, get_peft_model

    base_dir = tmp_path / "base"
    tiny_llama(len(tokenizer.get_vocab()), seed=0).save_pretrained(base_dir)  # no tokenizer either
    peft_model = get_peft_model(tiny_llama(len(tokenizer.get_vocab()), seed=0),
                                LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = load_anti_expert(tmp_path / "adapter", base_name_or_path=str(base_dir))
    ids = torch.tensor([[1, 5, 6]])
    with torch.no_grad():
        assert_merged_logits_match(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, merged.config)


@pytest.mark.parametrize("content", ["not json", "{}", '{"peft_type": 3}'])
def test_garbage_adapter_config_is_named(tmp_path, content):
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError, match=r"adapter_config\.json is not a peft adapter config"):
        load_anti_expert(path, base_name_or_path="LlamaForCausalLM")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not a peft adapter config"):
        load_anti_expert(path, base_model=tiny_llama(16))

"""UniversalDetoxTrainer / UniversalDetoxConfig on tiny in-process models of two architectures and vocabularies."""

from __future__ import annotations

import shutil

import datasets
import pytest
import torch
from tiny import CORPUS, WORDS, char_tokenizer, tiny_gemma3, tiny_gpt2, tiny_llama, word_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from unidetox import DistilledDetoxDataset
from unidetox.detox.config import UniversalDetoxConfig, config_fields_help
from unidetox.detox.merge import merge_lora_checkpoint
from unidetox.detox.tokenization import SpecialTokenPolicy, tokenize_for_target
from unidetox.detox.trainer import UniversalDetoxTrainer

TEXTS = CORPUS * 2  # the same "distilled" text for every target


def gpt2_like_tokenizer():
    """GPT-2 conventions: one special token <|endoftext|> that is BOS, EOS and (as usual) pad; nothing added."""
    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for word in WORDS:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<unk>", padding_side="right",
    )


TARGETS = {
    # name: (tokenizer factory, model factory)
    "llama_word": (lambda: word_tokenizer(padding_side="right"), tiny_llama),
    "gemma3_char": (lambda: char_tokenizer(padding_side="right"), tiny_gemma3),
}


def make_args(tmp_path, **overrides) -> UniversalDetoxConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), max_steps=12, save_steps=6, learning_rate=1e-2,
        per_device_train_batch_size=4, logging_steps=1, gradient_checkpointing=False, use_cpu=True,
        disable_tqdm=True, seed=0, data_seed=0,
    )
    values.update(overrides)
    return UniversalDetoxConfig(**values)


def build(target, tmp_path, **overrides):
    tok_factory, model_factory = TARGETS[target]
    tokenizer = tok_factory()
    model = model_factory(len(tokenizer), seed=0)
    model.train()
    distilled = DistilledDetoxDataset(datasets.Dataset.from_dict({"text": TEXTS}), {"source": "unit-test"})
    return UniversalDetoxTrainer(
        model=model, args=make_args(tmp_path, **overrides), train_dataset=distilled, processing_class=tokenizer
    )


def logged_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_papers_universal_configuration(tmp_path):
    args = UniversalDetoxConfig(output_dir=str(tmp_path))
    assert args.learning_rate == 5e-5
    assert args.per_device_train_batch_size == 8
    assert args.max_length == 256
    assert args.optim == "adamw_torch"
    assert args.max_steps > 0 and args.save_steps <= args.max_steps
    assert args.save_total_limit is None
    if not torch.cuda.is_available():
        assert args.bf16 is False  # fp32 on CPU unless asked


def test_config_fields_have_help():
    helps = config_fields_help()
    for name in ("learning_rate", "max_steps", "add_bos_token", "add_eos_token", "save_merged_model", "bf16"):
        assert helps.get(name), f"{name} has no help"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": -1}, "max_steps"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"packing": True, "max_length": None}, "max_length"),
        ({"max_length": 1}, "max_length"),
    ],
)
def test_config_rejects_bad_values(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        UniversalDetoxConfig(output_dir=str(tmp_path), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Tokenization: BOS/EOS per target, padding and loss
# ----------------------------------------------------------------------------------------------------------------


def test_bos_eos_follow_each_tokenizer():
    ds = datasets.Dataset.from_dict({"text": ["the cat sat"]})
    # llama-like: the tokenizer adds BOS itself -> exactly one BOS, then EOS.
    word = word_tokenizer()
    ids = tokenize_for_target(ds, word)[0]["input_ids"]
    assert ids == [word.bos_token_id] + word("the cat sat", add_special_tokens=False)["input_ids"] + [word.eos_token_id]
    assert ids.count(word.bos_token_id) == 1
    # gemma-like char tokenizer that adds no BOS: none added by default, EOS appended.
    char = char_tokenizer()
    ids = tokenize_for_target(ds, char)[0]["input_ids"]
    assert ids[0] != char.bos_token_id and ids[-1] == char.eos_token_id
    assert ids[:-1] == char("the cat sat", add_special_tokens=False)["input_ids"]
    # forced BOS: prepended once, never doubled even if the tokenizer adds one already.
    assert tokenize_for_target(ds, char, add_bos_token=True)[0]["input_ids"][0] == char.bos_token_id
    forced = tokenize_for_target(ds, word, add_bos_token=True)[0]["input_ids"]
    assert forced[:2] != [word.bos_token_id] * 2
    # disabled BOS/EOS.
    bare = tokenize_for_target(ds, word, add_bos_token=False, add_eos_token=False)[0]["input_ids"]
    assert bare == word("the cat sat", add_special_tokens=False)["input_ids"]
    # GPT-2 conventions: no BOS, <|endoftext|> at the end only.
    gpt2 = gpt2_like_tokenizer()
    ids = tokenize_for_target(ds, gpt2)[0]["input_ids"]
    assert ids.count(gpt2.eos_token_id) == 1 and ids[-1] == gpt2.eos_token_id


def test_empty_texts_dropped_and_policy_errors():
    ds = datasets.Dataset.from_dict({"text": ["", "the cat"]})
    assert len(tokenize_for_target(ds, word_tokenizer())) == 1
    tok = char_tokenizer()
    tok.bos_token = None
    with pytest.raises(ValueError, match="no BOS"):
        SpecialTokenPolicy.for_tokenizer(tok, add_bos_token=True)


@pytest.mark.parametrize("tokenizer_factory", [lambda: word_tokenizer(padding_side="right"), gpt2_like_tokenizer])
def test_padding_carries_no_loss_and_eos_does(tmp_path, tokenizer_factory):
    tokenizer = tokenizer_factory()
    model = tiny_gpt2(len(tokenizer)) if tokenizer.pad_token_id == tokenizer.eos_token_id else tiny_llama(len(tokenizer))
    texts = ["the cat sat on the mat", "a good friend", "music"]
    trainer = UniversalDetoxTrainer(
        model=model, args=make_args(tmp_path), processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
    )
    rows = [trainer.train_dataset[i] for i in range(len(texts))]
    batch = trainer.data_collator(rows)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["labels"][i, n - 1].item() == tokenizer.eos_token_id  # the real EOS keeps its label
        assert (batch["labels"][i, :n] != -100).all()
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.eos_token_id).all()

    # The trainer's loss on the padded batch == the token-weighted NLL of each row computed alone, unpadded.
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, {k: v.clone() for k, v in batch.items()})
        total, count = 0.0, 0
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    assert loss.item() == pytest.approx(total / count, rel=1e-4)


def test_packing_matches_unpacked_loss(tmp_path):
    tokenizer = word_tokenizer(padding_side="right")
    model = tiny_llama(len(tokenizer)).eval()
    ds = datasets.Dataset.from_dict({"text": CORPUS[:4]})
    plain = UniversalDetoxTrainer(model=model, args=make_args(tmp_path / "a"), train_dataset=ds, processing_class=tokenizer)
    packed = UniversalDetoxTrainer(
        model=model, args=make_args(tmp_path / "b", packing=True, max_length=64), train_dataset=ds,
        processing_class=tokenizer,
    )
    assert len(packed.train_dataset) < len(plain.train_dataset)  # the four texts share packed rows
    plain_batch = plain.data_collator([plain.train_dataset[i] for i in range(len(plain.train_dataset))])
    packed_batch = packed.data_collator([packed.train_dataset[i] for i in range(len(packed.train_dataset))])
    assert "attention_mask" not in packed_batch  # padding-free: documents separated by position_ids
    with torch.no_grad():
        a = plain.compute_loss(plain.model, dict(plain_batch))
        b = packed.compute_loss(packed.model, dict(packed_batch))
    assert b.item() == pytest.approx(a.item(), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_full_finetuning_learns_the_distilled_text(tmp_path, target):
    trainer = build(target, tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(changed) == len(before)  # full fine-tuning moves every parameter
    out = tmp_path / "out"
    assert (out / "checkpoint-6").is_dir() and (out / "checkpoint-12").is_dir()  # every checkpoint kept
    trainer.save_model()
    card = (out / "README.md").read_text()
    assert "UniDetox" in card and "unit-test" in card and "learning_rate" in card
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, dict(trainer.model.named_parameters())[name].detach())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_lora_trains_only_the_adapter_and_merges(tmp_path, target):
    from peft import LoraConfig

    tok_factory, model_factory = TARGETS[target]
    tokenizer = tok_factory()
    model = model_factory(len(tokenizer), seed=0).train()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_dir = tmp_path / "base"
    model.save_pretrained(ref_dir)  # merge_lora_checkpoint reads the base from adapter_config.json
    tokenizer.save_pretrained(ref_dir)
    model.name_or_path = model.config._name_or_path = str(ref_dir)
    trainer = UniversalDetoxTrainer(
        model=model,
        args=make_args(tmp_path, learning_rate=3e-2, save_merged_model=True),
        train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)
    trainer.train()
    losses = logged_losses(trainer)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    for n, p in trainer.model.named_parameters():
        if n in lora_before and "lora_B" in n:
            assert not torch.equal(lora_before[n], p.detach()), n
    base_after = trainer.model.get_base_model().state_dict()
    for n, p in base_before.items():  # frozen base weights never move
        key = n.replace(".weight", ".base_layer.weight") if n.replace(".weight", ".base_layer.weight") in base_after else n
        assert torch.equal(base_after[key], p), n

    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() and "library_name: peft" in (out / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert "merged full model" in (out / "merged" / "README.md").read_text()
    ids = tokenizer(["the cat sat on the mat"], return_tensors="pt")["input_ids"]
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Any checkpoint can be merged after the fact.
    path = merge_lora_checkpoint(out / "checkpoint-6", tmp_path / "merged6")
    assert (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file()


def test_resume_from_checkpoint_gives_the_uninterrupted_result(tmp_path):
    full = build("llama_word", tmp_path / "full", max_steps=6, save_steps=3)
    full.train()
    want = {n: p.detach().clone() for n, p in full.model.named_parameters()}

    interrupted_dir = tmp_path / "resumed" / "out"
    interrupted_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "out" / "checkpoint-3", interrupted_dir / "checkpoint-3")
    resumed = build("llama_word", tmp_path / "resumed", max_steps=6, save_steps=3)
    resumed.train(resume_from_checkpoint=True)  # picks up checkpoint-3
    assert resumed.state.global_step == 6
    for n, p in resumed.model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=0, atol=1e-6)


def test_stop_at_step_reproduces_a_checkpoint_of_the_longer_schedule(tmp_path):
    # The configuration chosen on validation is (learning rate, schedule of max_steps, the chosen step): applying it
    # to another model must give what the longer run had at that step, not a run whose schedule ends there.
    full = build("llama_word", tmp_path / "full", max_steps=6, save_steps=3)
    full.train()
    at_3 = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "out" / "checkpoint-3")
    want = dict(at_3.named_parameters())

    stopped = build("llama_word", tmp_path / "stopped", max_steps=6, save_steps=3, stop_at_step=3)
    stopped.train()
    assert stopped.state.global_step == 3
    assert stopped.training_config_summary()["stop_at_step"] == 3  # model card and train summary say so
    for n, p in stopped.model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n].detach(), rtol=0, atol=1e-6)

    short = build("llama_word", tmp_path / "short", max_steps=3, save_steps=3)
    short.train()  # the schedule decays over 3 steps: other weights
    assert any(not torch.allclose(p.detach(), want[n].detach(), atol=1e-6) for n, p in short.model.named_parameters())


@pytest.mark.parametrize("step", [0, 7])
def test_stop_at_step_outside_the_schedule_is_an_error(tmp_path, step):
    with pytest.raises(ValueError, match=rf"stop_at_step.*max_steps=6.*{step}"):
        make_args(tmp_path, max_steps=6, stop_at_step=step)


# ----------------------------------------------------------------------------------------------------------------
# Inputs: model and data in every accepted form
# ----------------------------------------------------------------------------------------------------------------


def test_model_path_and_data_files(tmp_path):
    tokenizer = char_tokenizer(padding_side="right")
    model_dir = tmp_path / "model"
    tiny_gemma3(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    csv = tmp_path / "authors.csv"
    datasets.Dataset.from_dict({"Text": TEXTS}).to_csv(str(csv), index=False)  # the authors' column name
    saved = tmp_path / "distilled"
    DistilledDetoxDataset(datasets.Dataset.from_dict({"text": TEXTS}), {"alpha": 0.1}).save(saved)
    for data in (csv, saved, str(saved)):
        trainer = UniversalDetoxTrainer(model=str(model_dir), args=make_args(tmp_path, max_steps=2, save_steps=2),
                                        train_dataset=data)
        assert len(trainer.train_dataset) == len(TEXTS)
        assert trainer.train_dataset[0]["input_ids"][-1] == tokenizer.eos_token_id
    assert trainer.distilled_metadata["alpha"] == 0.1
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert str(model_dir) in card and '"alpha": 0.1' in card


def test_pretokenized_dataset_used_as_is(tmp_path):
    tokenizer = word_tokenizer(padding_side="right")
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 5, 6, 2], [1, 7, 2]]})
    trainer = UniversalDetoxTrainer(model=tiny_llama(len(tokenizer)), args=make_args(tmp_path), train_dataset=ds,
                                    processing_class=tokenizer)
    assert trainer.train_dataset[0]["input_ids"] == [1, 5, 6, 2]


def test_authors_reference_csv_loads(tmp_path, shared_data):
    path = shared_data / "unidetox_reference" / "generated_texts_alpha=0.1_beta=inf_checkpoint-15126.csv"
    tokenizer = char_tokenizer(padding_side="right")
    trainer = UniversalDetoxTrainer(model=tiny_gemma3(len(tokenizer)), args=make_args(tmp_path, max_length=32),
                                    train_dataset=path, processing_class=tokenizer)
    assert trainer.distilled_metadata["num_samples"] == 640
    assert all(len(ids) <= 32 for ids in trainer.train_dataset["input_ids"])


def test_clear_errors(tmp_path):
    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer))
    with pytest.raises(ValueError, match="train_dataset"):
        UniversalDetoxTrainer(model=model, args=make_args(tmp_path), processing_class=tokenizer)
    with pytest.raises(FileNotFoundError, match="distilled dataset"):
        UniversalDetoxTrainer(model=model, args=make_args(tmp_path), processing_class=tokenizer,
                              train_dataset=tmp_path / "missing")
    with pytest.raises(TypeError, match="train_dataset"):
        UniversalDetoxTrainer(model=model, args=make_args(tmp_path), processing_class=tokenizer, train_dataset=[1, 2])
    with pytest.raises(ValueError, match="processing_class"):
        UniversalDetoxTrainer(model=model, args=make_args(tmp_path), train_dataset=datasets.Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(TypeError, match="model"):
        UniversalDetoxTrainer(model=42, args=make_args(tmp_path), train_dataset=datasets.Dataset.from_dict({"text": ["a"]}))


def test_uncached_hub_id_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="not-a-real-model"):
        UniversalDetoxTrainer(model="unidetox-tests/not-a-real-model", args=make_args(tmp_path),
                              train_dataset=datasets.Dataset.from_dict({"text": ["a"]}))

"""Tiny random models and tokenizers built in-process, so tests never download anything."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "the weather is nice today and the sun is bright",
    "a good friend helps people in need",
    "we should treat everyone with respect and kindness",
    "science helps us understand the world around us",
    "music and art bring joy to many people",
    "the cat sat on the mat near the door",
    "people from every country deserve dignity",
    "reading books is a great way to learn new things",
]

WORDS = sorted({w for line in CORPUS for w in line.split()} | {"hate", "awful", "stupid", "ugly", "kill"})


def word_tokenizer(bos="<s>", eos="</s>", pad="<pad>", add_bos=True, padding_side="left"):
    """Word-level tokenizer (llama-like specials: BOS added by the tokenizer)."""
    vocab = {pad: 0, bos: 1, eos: 2, "<unk>": 3}
    for word in WORDS:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 1)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token="<unk>",
        padding_side=padding_side,
    )
    return fast


def char_tokenizer(padding_side="left"):
    """Character-level tokenizer with gemma-like specials and no automatic BOS (a second, different vocabulary)."""
    chars = sorted({c for line in CORPUS for c in line} | set("abcdefghijklmnopqrstuvwxyz .,!?'"))
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side=padding_side,
    )


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, **kwargs) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **kwargs,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; sharpen them so sampling and plausibility masks are non-trivial.
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model.eval()


def tiny_gemma3(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, **kwargs) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        sliding_window=8, bos_token_id=2, eos_token_id=1, pad_token_id=0, **kwargs,
    )
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
    return model.eval()


def tiny_gpt2(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    """GPT-2: learned absolute positions, so wrong position ids under left padding change its outputs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(20.0)  # make positions matter a lot
        model.transformer.wte.weight.mul_(20.0)
    return model.eval()


def quick_detox_overrides(tmp_path, out) -> list[str]:
    """Detox overrides for a 2-step LoRA run of a tiny llama (saved under ``tmp_path``) on CORPUS, without
    validation: the quickest real detox run, for tests about its files and its directory."""
    import datasets

    model = tmp_path / "tiny-model"
    tokenizer = word_tokenizer(padding_side="right")
    tiny_llama(len(tokenizer)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    csv = tmp_path / "distilled.csv"
    datasets.Dataset.from_dict({"Text": CORPUS}).to_csv(str(csv), index=False)
    return [f"model={model}", f"data.path={csv}", f"output_dir={out}", "trainer=embedded_lora", "trainer.max_steps=2",
            "trainer.save_steps=1", "trainer.per_device_train_batch_size=4", "peft.r=4", "+trainer.disable_tqdm=true",
            "eval.enabled=false"]

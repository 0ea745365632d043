import pytest
from tiny import tiny_llama


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return len(tokenizer.get_vocab())


@pytest.fixture
def base(vocab):
    """The base model of a distillation: a tiny random llama, seed 0."""
    return tiny_llama(vocab, seed=0)

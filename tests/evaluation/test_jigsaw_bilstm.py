"""The jigsaw_bilstm scorer: parity with ToxBlock's documented outputs, offline use, and a pickle that cannot run code."""

import os
import pickle
import socket
import subprocess
import sys
import types
import zipfile

import pytest
import torch

from unidetox.evaluation import jigsaw_bilstm as jb
from unidetox.evaluation.scoring import SCORERS, JigsawBiLSTMScorer, build_scorer

# The README of tox-block 0.1.2 (its wheel's METADATA): make_predictions(..., rescale=True) for three texts.
README_TEXTS = [
    "Good morning my friend, I hope you're having a fantastic day!",
    "I will kill you, you fucking idiot!",
    "I do strongly disagree with the fascist views of this joke that calls itself a political party.",
]
README_RESCALED = [
    [0.05347811430692673, 0.0006274021579883993, 0.004466842859983444, 0.009578478522598743, 0.00757843442261219,
     0.002106667961925268],
    [0.9998679757118225, 0.7870362997055054, 0.9885633587837219, 0.8483908176422119, 0.9883397221565247,
     0.171059250831604],
    [0.026190076023340225, 7.185135473264381e-05, 0.0009493605466559529, 0.00012321282702032477,
     0.0029190618079155684, 0.0022098885383456945],
]
# tox_block.config.RESCALE_PROBA: the min-max scaling its README values went through.
RESCALE = {"toxic": (0.002116, 0.999858), "severe_toxic": (0.000011, 0.648682), "obscene": (0.000347, 0.997533),
           "threat": (0.000040, 0.918887), "insult": (0.000373, 0.986303), "identity_hate": (0.000074, 0.901117)}


@pytest.fixture(scope="module")
def provisioned():
    """The converted model in the default cache, downloaded from PyPI on first use."""
    try:
        return jb.jigsaw_bilstm_dir()
    except RuntimeError as err:  # no PyPI here and no cached copy
        pytest.skip(f"tox-block could not be provisioned: {err}")


@pytest.mark.slow
def test_readme_examples_match_the_documented_probabilities(provisioned):
    probabilities = jb.JigsawBiLSTM.from_dir(provisioned).predict(README_TEXTS)
    for row, expected in zip(probabilities.tolist(), README_RESCALED, strict=True):
        rescaled = [abs((p - RESCALE[label][0]) / (RESCALE[label][1] - RESCALE[label][0]))
                    for p, label in zip(row, jb.LABELS, strict=True)]
        assert rescaled == pytest.approx(expected, abs=2e-6)


@pytest.mark.slow
def test_scoring_after_provisioning_needs_no_network_and_no_pickle(provisioned, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("jigsaw_bilstm reached for the network or a subprocess after provisioning")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(jb, "read_encoder", refuse)  # later loads read vocab.json, never the pickle
    scorer = build_scorer("jigsaw_bilstm")
    scores = scorer(["have a nice day", "I will kill you, you fucking idiot!", ""])
    assert scores[1] > 0.9 > 0.2 > scores[0]
    assert 0.0 <= scores[2] <= 1.0


@pytest.mark.slow
def test_heads_and_batches_agree(provisioned):
    texts = [README_TEXTS[i % 3] + f" {i}" for i in range(7)]
    scorer = JigsawBiLSTMScorer(label="identity_hate", batch_size=3)
    every = scorer.score_all_labels(texts)
    assert list(every) == list(jb.LABELS)
    assert scorer(texts) == pytest.approx(every["identity_hate"], abs=1e-6)
    assert JigsawBiLSTMScorer(batch_size=256)(texts) == pytest.approx(every["toxic"], abs=1e-6)
    assert every["toxic"] != pytest.approx(every["identity_hate"], abs=1e-3)


def test_registered_and_unknown_label_refused_before_loading(monkeypatch):
    assert SCORERS["jigsaw_bilstm"] is JigsawBiLSTMScorer
    monkeypatch.setattr(jb, "load_jigsaw_bilstm", lambda **kwargs: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match="no label 'toxicity'.*identity_hate"):
        build_scorer("jigsaw_bilstm", label="toxicity")


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps(_RunsCommand(f"touch {marker}"))
    with pytest.raises(jb.UnsafePickleError, match=r"refers to (posix|nt|os)\.system.*nothing was executed"):
        jb.read_encoder(payload)
    assert not marker.exists()


@pytest.fixture
def keras_like_classes(monkeypatch):
    """Stand-ins named like the classes tox_block pickles, so a test can write a small encoder pickle."""
    text = types.ModuleType("keras_preprocessing.text")
    preprocessors = types.ModuleType("tox_block.data_processing.preprocessors")

    class Tokenizer:
        pass

    class TokenSequencer:
        pass

    Tokenizer.__module__, Tokenizer.__qualname__ = text.__name__, "Tokenizer"
    TokenSequencer.__module__, TokenSequencer.__qualname__ = preprocessors.__name__, "TokenSequencer"
    text.Tokenizer, preprocessors.TokenSequencer = Tokenizer, TokenSequencer
    for module in (text, preprocessors):
        parts = module.__name__.split(".")
        for depth in range(1, len(parts)):  # pickle imports the parent packages too
            parent = ".".join(parts[:depth])
            if parent not in sys.modules:
                monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return Tokenizer, TokenSequencer


def _encoder_pickle(keras_like_classes, **tokenizer_state) -> bytes:
    from collections import OrderedDict, defaultdict

    tokenizer_class, sequencer_class = keras_like_classes
    tokenizer = tokenizer_class()
    tokenizer.__dict__.update({
        "word_counts": OrderedDict(you=5, idiot=3, nice=2), "word_docs": defaultdict(int, you=4),
        "index_docs": defaultdict(int, {1: 4}), "filters": "!,.", "split": " ", "lower": True, "num_words": 3,
        "document_count": 9, "char_level": False, "oov_token": None,
        "word_index": {"you": 1, "idiot": 2, "nice": 3}, "index_word": {1: "you", 2: "idiot", 3: "nice"},
        **tokenizer_state})
    sequencer = sequencer_class()
    sequencer.__dict__.update({"max_features": 3, "max_sequence_length": 4, "tokenizer": tokenizer})
    return pickle.dumps(sequencer, protocol=3)


def test_encoder_settings_are_read_from_a_keras_tokenizer_pickle(keras_like_classes):
    vocab = jb.read_encoder(_encoder_pickle(keras_like_classes))
    assert vocab["word_index"] == {"you": 1, "idiot": 2}  # ids >= num_words are never used by Keras
    assert (vocab["num_words"], vocab["filters"], vocab["max_sequence_length"]) == (3, "!,.", 4)
    encoder = jb.KerasTextEncoder(vocab)
    # lower-cased, filters split words, unknown words dropped, padded and truncated at the front
    assert encoder.encode(["YOU, nice idiot!", "idiot you you you you"]).tolist() == [[0, 0, 1, 2], [1, 1, 1, 1]]


def test_a_keras_tokenizer_whose_state_hides_a_call_is_refused(keras_like_classes, tmp_path):
    marker = tmp_path / "ran"
    payload = _encoder_pickle(keras_like_classes, oov_token=_RunsCommand(f"touch {marker}"))
    with pytest.raises(jb.UnsafePickleError, match="system"):
        jb.read_encoder(payload)
    assert not marker.exists()


def test_hard_sigmoid_is_keras_2s():
    x = torch.tensor([-3.0, -2.5, 0.0, 1.0, 2.5, 3.0])
    assert jb.keras_hard_sigmoid(x).tolist() == pytest.approx([0.0, 0.0, 0.5, 0.7, 1.0, 1.0])


def test_a_wheel_with_other_weights_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIDETOX_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "tox_block-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(jb.WEIGHTS_MEMBER, b"not the released weights")
        zf.writestr(jb.ENCODER_MEMBER, b"not the released encoder")
    with pytest.raises(jb.JigsawBiLSTMError, match="SHA-256 of tox_block/trained_models/lstm_model_0.1.2.h5"):
        jb.jigsaw_bilstm_dir(wheel)
    assert not any((tmp_path / "cache" / "scorers").glob("jigsaw-bilstm-*/model.safetensors"))


def test_a_missing_local_wheel_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIDETOX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="No tox_block wheel at .*nowhere.whl"):
        jb.jigsaw_bilstm_dir(tmp_path / "nowhere.whl")

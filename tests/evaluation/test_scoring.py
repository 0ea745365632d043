import json
import logging
import sys
import types
from urllib.parse import urlencode

import pytest
import torch
from tiny import word_tokenizer

from unidetox.evaluation import scoring
from unidetox.evaluation.scoring import (
    SCORERS,
    DetoxifyScorer,
    HFClassifierScorer,
    PerspectiveScorer,
    ProfanityCheckScorer,
    ScorerConfig,
    ToxicityScorer,
    build_scorer,
    register_scorer,
)

TEXTS = ["have a lovely day", "you are a stupid idiot", "", "the cat sat on the mat", "shut up you moron"]


def test_profanity_batching_equals_one_by_one():
    batched = ProfanityCheckScorer(batch_size=2)(TEXTS)
    single = [ProfanityCheckScorer(batch_size=1)([t])[0] for t in TEXTS]
    assert batched == pytest.approx(single, abs=1e-12)
    assert batched[1] > 0.5 > batched[0]


def test_base_class_validates_scores():
    class Bad(ToxicityScorer):
        def score_batch(self, texts):
            return [1.5 for _ in texts]

    class Short(ToxicityScorer):
        def score_batch(self, texts):
            return []

    with pytest.raises(RuntimeError, match="outside"):
        Bad()(["x"])
    with pytest.raises(RuntimeError, match="returned 0 scores"):
        Short()(["x"])
    with pytest.raises(TypeError):
        Bad()("a single string")


def test_factory():
    assert isinstance(build_scorer("profanity_check"), ProfanityCheckScorer)
    assert build_scorer({"name": "profanity_check", "batch_size": 3}).batch_size == 3
    with pytest.raises(ValueError, match="Unknown scorer"):
        build_scorer("toxic_bert_magic")
    assert ScorerConfig(name="perspective", api_key="secret").to_public_dict()["api_key"] == "***"


# --- Detoxify --------------------------------------------------------------------------------------------------
def test_detoxify_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "detoxify", None)
    with pytest.raises(ImportError, match=r"unidetox\[detoxify\]"):
        DetoxifyScorer()


def fake_detoxify(monkeypatch, fail=False):
    calls = []

    class Detoxify:
        def __init__(self, model_type, checkpoint=None, device=None):
            if fail:
                raise ConnectionError("no route to github.com")
            self.model_type = model_type

        def predict(self, texts):
            calls.append(list(texts))
            return {"toxicity": [min(len(t) / 30, 1.0) for t in texts], "insult": [0.0] * len(texts)}

    monkeypatch.setitem(sys.modules, "detoxify", types.SimpleNamespace(Detoxify=Detoxify))
    return calls


def test_detoxify_batches_and_reads_toxicity(monkeypatch):
    calls = fake_detoxify(monkeypatch)
    scorer = DetoxifyScorer(batch_size=2)
    assert scorer(TEXTS) == pytest.approx([min(len(t) / 30, 1.0) for t in TEXTS])
    assert [len(c) for c in calls] == [2, 2, 1]
    assert build_scorer("detoxify").name == "detoxify-original"


def test_detoxify_unloadable_weights_fail_at_construction(monkeypatch):
    fake_detoxify(monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match="checkpoint=PATH"):
        DetoxifyScorer()
    with pytest.raises(ValueError, match="model_type"):
        fake_detoxify(monkeypatch)
        DetoxifyScorer("biased")


# --- HF classifier ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = word_tokenizer(padding_side="right")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                        num_labels=2, id2label={0: "neutral", 1: "toxic"}, label2id={"neutral": 0, "toxic": 1})
    model = GPT2ForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.mul_(20)
    path = tmp_path_factory.mktemp("clf")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def test_hf_classifier_matches_model_and_batching(classifier_dir):
    path, model, tok = classifier_dir
    texts = ["the cat sat on the mat", "hate", "people from every country deserve dignity", "awful stupid ugly"]
    scorer = HFClassifierScorer(str(path), batch_size=3, device="cpu")
    assert scorer.label == "toxic"
    expected = []
    for text in texts:
        with torch.no_grad():
            logits = model(**tok(text, return_tensors="pt")).logits
        expected.append(logits.softmax(-1)[0, 1].item())
    assert scorer(texts) == pytest.approx(expected, abs=1e-5)
    assert [HFClassifierScorer(str(path), batch_size=1, device="cpu")([t])[0] for t in texts] == pytest.approx(
        expected, abs=1e-5)
    neutral = HFClassifierScorer(str(path), label="neutral", device="cpu")(texts)
    assert [a + b for a, b in zip(neutral, expected, strict=True)] == pytest.approx([1.0] * 4, abs=1e-5)


def test_hf_classifier_label_errors(classifier_dir, tmp_path):
    path, model, tok = classifier_dir
    with pytest.raises(ValueError, match="no label 'hateful'"):
        HFClassifierScorer(str(path), label="hateful", device="cpu")
    model.config.id2label, model.config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model.config.id2label, model.config.label2id = {0: "neutral", 1: "toxic"}, {"neutral": 0, "toxic": 1}
    with pytest.raises(ValueError, match="Pass label="):
        HFClassifierScorer(str(tmp_path), device="cpu")
    assert HFClassifierScorer(str(tmp_path), label="LABEL_1", device="cpu").label == "LABEL_1"
    with pytest.raises(RuntimeError, match="Could not load"):
        HFClassifierScorer(str(tmp_path / "missing"), device="cpu")


# --- Perspective -----------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


class FakeResponse:
    def __init__(self, status, value=None, headers=None):
        self.status_code, self.value, self.headers, self.text = status, value, headers or {}, f"status {status}"

    def json(self):
        return {"attributeScores": {"TOXICITY": {"summaryScore": {"value": self.value}}}}


class FakeSession:
    def __init__(self, clock, script):
        self.clock, self.script, self.requests = clock, list(script), []

    def post(self, url, headers, json, timeout):
        self.requests.append((self.clock(), json["comment"]["text"], headers["x-goog-api-key"]))
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def make_perspective(script, **kwargs):
    clock = FakeClock()
    session = FakeSession(clock, script)
    scorer = PerspectiveScorer(api_key="k", session=session, clock=clock, sleep=clock.sleep, **kwargs)
    return scorer, session, clock


def test_perspective_rate_limit_and_empty_text():
    scorer, session, _ = make_perspective([FakeResponse(200, 0.1), FakeResponse(200, 0.8), FakeResponse(200, 0.3)],
                                          qps=2.0)
    assert scorer(["a", "", "b", "c"]) == [0.1, 0.0, 0.8, 0.3]
    times = [t for t, _, _ in session.requests]
    assert [t for _, t, _ in session.requests] == ["a", "b", "c"]
    assert all(b - a >= 0.5 - 1e-9 for a, b in zip(times, times[1:], strict=False))


def test_perspective_retries_transient_errors():
    script = [FakeResponse(429, headers={"Retry-After": "3"}), ConnectionError("reset"), FakeResponse(503),
              FakeResponse(200, 0.9)]
    scorer, session, clock = make_perspective(script, qps=10.0, backoff_s=0.5)
    assert scorer(["x"]) == [0.9]
    assert len(session.requests) == 4
    assert 3.0 in clock.sleeps  # Retry-After honoured


def test_perspective_gives_up_and_refuses():
    scorer, _, _ = make_perspective([FakeResponse(500)] * 3, max_retries=2, qps=10.0)
    with pytest.raises(RuntimeError, match="after 3 attempts"):
        scorer(["x"])
    scorer, session, _ = make_perspective([FakeResponse(403)], qps=10.0)
    with pytest.raises(RuntimeError, match="HTTP 403"):
        scorer(["x"])
    assert len(session.requests) == 1


def test_perspective_needs_key(monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="PERSPECTIVE_API_KEY"):
        PerspectiveScorer()
    with pytest.raises(ValueError, match="qps"):
        PerspectiveScorer(api_key="k", qps=0)


SENTINEL = "SENTINEL-perspective-key-0123"


class UrlQuotingSession:
    """Fails like ``requests`` does: the error text quotes the full request URL, query string included."""

    def __init__(self, status=None):
        self.status, self.calls = status, []

    def post(self, url, params=None, headers=None, json=None, timeout=None):
        self.calls.append({"url": url, "params": params, "headers": headers})
        full_url = f"{url}?{urlencode(params)}" if params else url
        if self.status is None:
            raise ConnectionError(f"Max retries exceeded with url: {full_url} ({headers})")
        return FakeResponse(self.status)


@pytest.mark.parametrize("status", [None, 503, 400])
def test_perspective_key_never_reaches_errors_or_logs(caplog, status):
    clock = FakeClock()
    session = UrlQuotingSession(status)
    scorer = PerspectiveScorer(api_key=SENTINEL, session=session, clock=clock, sleep=clock.sleep,
                               max_retries=2)
    with caplog.at_level(logging.DEBUG), pytest.raises(RuntimeError) as info:
        scorer(["x"])
    assert SENTINEL not in str(info.value) and SENTINEL not in repr(info.value)
    assert SENTINEL not in caplog.text and all(SENTINEL not in r.getMessage() for r in caplog.records)
    assert all(SENTINEL not in call["url"] and not call["params"] for call in session.calls)
    assert session.calls[0]["headers"]["x-goog-api-key"] == SENTINEL


def test_perspective_retries_are_logged(caplog):
    scorer, _, _ = make_perspective([FakeResponse(503), FakeResponse(200, 0.4)], qps=10.0)
    with caplog.at_level(logging.WARNING, logger="unidetox.evaluation.scoring"):
        assert scorer(["x"]) == [0.4]
    assert "HTTP 503" in caplog.text and "retrying" in caplog.text


def test_scorer_config_never_shows_the_key():
    config = ScorerConfig(name="perspective", api_key=SENTINEL)
    public = config.to_public_dict()
    assert SENTINEL not in json.dumps(public) and public["api_key"] == "***"
    assert SENTINEL not in repr(config) and SENTINEL not in str(config)
    assert ScorerConfig(name="perspective").to_public_dict().get("api_key") is None


# --- registry -----------------------------------------------------------------------------------------------
def test_build_scorer_uses_the_registry(monkeypatch):
    monkeypatch.setattr(scoring, "SCORERS", dict(SCORERS))

    @register_scorer("length")
    class LengthScorer(ToxicityScorer):
        def score_batch(self, texts):
            return [min(len(t) / 10, 1.0) for t in texts]

    assert scoring.SCORERS["length"] is LengthScorer
    scorer = build_scorer({"name": "length", "batch_size": 2})
    assert isinstance(scorer, LengthScorer) and scorer.batch_size == 2
    assert scorer(["abcde", "x" * 30]) == [0.5, 1.0]
    assert register_scorer("length")(LengthScorer) is LengthScorer  # the same class again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("length")(type("Other", (LengthScorer,), {}))
    with pytest.raises(TypeError, match="ToxicityScorer"):
        register_scorer("not_a_scorer")(dict)


def test_build_scorer_dispatches_through_the_table(monkeypatch):
    built = []

    class Recording(ProfanityCheckScorer):
        @classmethod
        def from_config(cls, config):
            built.append(config.name)
            return super().from_config(config)

    monkeypatch.setitem(SCORERS, "profanity_check", Recording)
    assert isinstance(build_scorer("profanity_check"), Recording) and built == ["profanity_check"]


def test_unknown_scorer_names_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown scorer 'nope'.*'detoxify'.*'profanity_check'"):
        build_scorer("nope")
    config = ScorerConfig()
    config.name = "nope"
    with pytest.raises(ValueError, match=r"Unknown scorer 'nope'.*register_scorer"):
        build_scorer(config)


# --- input checks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("disguised", [
    "ｙｏｕ ａｒｅ ａ ｓｔｕｐｉｄ ｉｄｉｏｔ",  # fullwidth letters
    "you are a st\u200bupid idi\u200cot",  # zero-width space / non-joiner
    "you are a stu\u00adpid id\u2060i\ufeffot",  # soft hyphen, word joiner, BOM
    "you are a s\u200dtupid idiot",  # zero-width joiner
])
def test_profanity_check_normalises_unicode(disguised):
    scorer = ProfanityCheckScorer()
    plain, hidden = scorer(["you are a stupid idiot", disguised])
    assert hidden == pytest.approx(plain, abs=1e-9)


def test_profanity_check_does_not_change_the_callers_list():
    texts = ["ｓｔｕｐｉｄ", "idi\u200bot"]
    before = list(texts)
    ProfanityCheckScorer()(texts)
    assert texts == before


@pytest.mark.parametrize("bad", [None, 3, b"bytes"])
def test_non_string_text_raises_naming_the_index(bad):
    class Constant(ToxicityScorer):
        def score_batch(self, texts):
            return [0.0 for _ in texts]

    for scorer in (ProfanityCheckScorer(), Constant()):
        with pytest.raises(TypeError, match=r"texts\[2\]"):
            scorer(["fine", "also fine", bad])

"""Toxicity scorers behind one interface: ``scorer(texts) -> list[float]`` with every score in [0, 1].

A scorer that cannot work (weights unavailable offline, no API key, package missing) fails in its constructor
with a message saying what to install or configure; there is never a silent fallback to another scorer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence


class ToxicityScorer(ABC):
    """Base class: subclasses implement :meth:`score_batch`; ``__call__`` batches and validates."""

    name: str = "scorer"

    def __init__(self, batch_size: int = 256):
        if batch_size < 1:
            raise ValueError(f"`batch_size` has to be >= 1, but is {batch_size}.")
        self.batch_size = batch_size

    @abstractmethod
    def score_batch(self, texts: list[str]) -> list[float]:
        """Scores of one batch, each in [0, 1]."""

    def __call__(self, texts: Sequence[str]) -> list[float]:
        if isinstance(texts, str):
            raise TypeError("Pass a list of texts, not a single string.")
        texts = list(texts)
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            batch_scores = [float(s) for s in self.score_batch(batch)]
            if len(batch_scores) != len(batch):
                raise RuntimeError(f"{self.name} returned {len(batch_scores)} scores for {len(batch)} texts")
            scores.extend(batch_scores)
        bad = [s for s in scores if not 0.0 <= s <= 1.0]
        if bad:
            raise RuntimeError(f"{self.name} produced scores outside [0, 1]: {bad[:5]}")
        return scores


class ProfanityCheckScorer(ToxicityScorer):
    """alt-profanity-check: a linear SVM (calibrated) trained on toxic comments; offline, fast, ships its weights.

    It is a lexical model: it catches slurs and insults well and implicit hate poorly, so treat absolute values
    with care; it is the offline default because it needs no download.
    """

    name = "profanity_check"

    def __init__(self, batch_size: int = 4096):
        super().__init__(batch_size)
        try:
            from profanity_check import predict_prob
        except ImportError as err:  # pragma: no cover - a runtime dependency
            raise ImportError("ProfanityCheckScorer needs `pip install alt-profanity-check`.") from err
        self._predict_prob = predict_prob

    def score_batch(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        return self._predict_prob(texts).tolist()

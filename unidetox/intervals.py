"""Bootstrap intervals, all through :func:`scipy.stats.bootstrap` (seeded, percentile method).

Two questions come up again and again:

- *independent samples* (:func:`mean_difference`): is one set of scores lower than another, e.g. the toxicity of
  distilled texts against plain samples of the base model;
- *paired samples* (:func:`paired_change`): how much does a method change a per-prompt metric against a reference
  model on the SAME prompts, e.g. each prompt's max toxicity under the base and under the detoxified model.
  Resampling prompts (both models' values of a prompt together) keeps the pairing, so the interval is far narrower
  than comparing two independent means would give, and it is the interval over prompts the test's claims are about.

The percentile method is used because toxicity metrics are bounded and often degenerate (every sample of a
detoxified model scored 0 on a prompt set): BCa's acceleration is undefined there, the percentile interval is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95


def _check(num_resamples: int, confidence: float) -> None:
    if num_resamples < 100:
        raise ValueError(f"`num_resamples` has to be >= 100 for a percentile interval, but is {num_resamples}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` has to be in (0, 1), e.g. 0.95, but is {confidence}.")


def _interval(data, statistic, *, paired: bool, num_resamples: int, confidence: float, seed: int):
    """``(low, high, share of resamples where the statistic is undefined)``: the percentile interval over the
    resamples where it is defined (a relative change is undefined on a resample whose reference mean is 0)."""
    with np.errstate(invalid="ignore"):
        result = stats.bootstrap(data, statistic, paired=paired, vectorized=True, n_resamples=num_resamples,
                                 confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    distribution = np.asarray(result.bootstrap_distribution)
    undefined = float(np.isnan(distribution).mean())
    if undefined and undefined < 1.0:
        tail = 50.0 * (1.0 - confidence)
        low, high = (float(v) for v in np.nanpercentile(distribution, [tail, 100.0 - tail]))
    return low, high, undefined


def mean_interval(
    values: Sequence[float], num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, float | int]:
    """The mean of ``values`` with a percentile-bootstrap interval (values resampled ``num_resamples`` times,
    seeded), e.g. the share of texts that have some property (values 0/1).

    Example:
        >>> from unidetox.intervals import mean_interval
        >>> out = mean_interval([1.0, 0.0, 0.0, 0.0] * 25)
        >>> out["mean"], out["low"] < 0.25 < out["high"]
        (0.25, True)
    """
    _check(num_resamples, confidence)
    data = np.asarray(values, dtype=np.float64)
    if data.size < 1:
        raise ValueError("Need at least one value for a mean.")
    mean = float(data.mean())
    if np.allclose(data, data[0]):
        return {"mean": mean, "low": mean, "high": mean, "n": int(data.size)}  # every resample is the mean

    def sample_mean(x, axis=-1):
        return x.mean(axis=axis)

    low, high, _ = _interval((data,), sample_mean, paired=False, num_resamples=num_resamples,
                             confidence=confidence, seed=seed)
    return {"mean": mean, "low": low, "high": high, "n": int(data.size)}


def mean_difference(
    scores: Sequence[float], reference: Sequence[float], num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, float | int | bool | None]:
    """Is ``scores`` measurably lower than ``reference`` (two independent samples)?

    Returns the difference of the means (``scores - reference``), its relative size, a percentile-bootstrap
    interval (each group resampled on its own, ``num_resamples`` times, seeded), the two-sided Mann-Whitney U
    p-value and ``lower``: True when the whole interval lies below zero.

    Example:
        >>> from unidetox.intervals import mean_difference
        >>> out = mean_difference([0.1, 0.2, 0.1, 0.0] * 10, [0.5, 0.4, 0.6, 0.5] * 10)
        >>> round(out["difference"], 3), out["lower"]
        (-0.4, True)
    """
    _check(num_resamples, confidence)
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"Need at least 2 scores per group to compare them, got {a.size} and {b.size}.")

    def difference_of_means(x, y, axis=-1):
        return x.mean(axis=axis) - y.mean(axis=axis)

    low, high, _ = _interval((a, b), difference_of_means, paired=False, num_resamples=num_resamples,
                             confidence=confidence, seed=seed)
    difference = float(a.mean() - b.mean())
    return {"difference": difference, "relative": difference / float(b.mean()) if b.mean() else float("nan"),
            "ci95_low": low, "ci95_high": high,
            "p_mann_whitney": float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue),
            "n": int(a.size), "n_reference": int(b.size), "lower": bool(high < 0)}


def paired_change(
    reference: Sequence[float], treated: Sequence[float], *, relative: bool = True,
    num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, float | int | bool]:
    """The change of a per-prompt metric from ``reference`` to ``treated`` on the same prompts, with a paired
    bootstrap interval over prompts.

    ``reference[i]`` and ``treated[i]`` belong to prompt ``i`` (e.g. its max toxicity over samples, or 1.0 when any
    sample is toxic, averaged over seeds). ``relative=True``: the change is ``mean(treated) / mean(reference) - 1``
    (``-0.3`` is a 30 % drop), else ``mean(treated) - mean(reference)``. Prompts are resampled with both values
    together. Returns ``{"change", "low", "high", "n", "excludes_zero", "relative", "undefined_resamples"}``: the
    last is the share of resamples that drew only prompts where the reference is 0 (a relative change is undefined
    there; the interval is taken over the others, so a large share says the interval means little).

    Example:
        >>> from unidetox.intervals import paired_change
        >>> base = [0.2, 0.4, 0.6, 0.8] * 10
        >>> out = paired_change(base, [v / 2 for v in base])
        >>> round(out["change"], 3), round(out["low"], 3), round(out["high"], 3), out["excludes_zero"]
        (-0.5, -0.5, -0.5, True)
    """
    _check(num_resamples, confidence)
    ref, new = np.asarray(reference, dtype=np.float64), np.asarray(treated, dtype=np.float64)
    if ref.shape != new.shape or ref.ndim != 1:
        raise ValueError(f"`reference` and `treated` need one value per prompt each, on the same prompts; got shapes "
                         f"{ref.shape} and {new.shape}.")
    if ref.size < 2:
        raise ValueError(f"Need at least 2 prompts for a paired interval, got {ref.size}.")
    if relative and ref.mean() == 0:
        raise ValueError("The reference's mean is 0, so a relative change is undefined; use relative=False.")

    def change(x, y, axis=-1):
        if relative:
            # A resample may draw only prompts where the reference is 0: its ratio is undefined, not infinite.
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(x.mean(axis=axis) > 0, y.mean(axis=axis) / x.mean(axis=axis) - 1.0, np.nan)
        return y.mean(axis=axis) - x.mean(axis=axis)

    estimate = float(change(ref, new))
    if np.allclose(ref, ref[0]) and np.allclose(new, new[0]):
        low, high, undefined = estimate, estimate, 0.0  # nothing varies over prompts: every resample is the estimate
    else:
        low, high, undefined = _interval((ref, new), change, paired=True, num_resamples=num_resamples,
                                         confidence=confidence, seed=seed)
    return {"change": estimate, "low": low, "high": high, "n": int(ref.size),
            "excludes_zero": bool(low > 0 or high < 0), "relative": relative, "undefined_resamples": undefined}

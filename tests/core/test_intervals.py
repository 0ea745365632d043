import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from unidetox.intervals import mean_difference, paired_change


def _numpy_percentile_interval(a, b, num_resamples=10_000, seed=0):
    """The hand-written interval the library used before scipy: each group resampled independently."""
    rng = np.random.default_rng(seed)
    boot = (a[rng.integers(0, a.size, (num_resamples, a.size))].mean(axis=1)
            - b[rng.integers(0, b.size, (num_resamples, b.size))].mean(axis=1))
    return np.percentile(boot, [2.5, 97.5])


def _scores(seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 0.4, 300), rng.uniform(0.05, 0.55, 300)


def test_mean_difference_against_a_direct_computation():
    low, high = _scores()
    out = mean_difference(low, high, seed=1)
    assert out["difference"] == pytest.approx(low.mean() - high.mean())
    assert out["relative"] == pytest.approx(out["difference"] / high.mean())
    assert out["ci95_low"] < out["difference"] < out["ci95_high"] < 0 and out["lower"]
    assert out["p_mann_whitney"] == pytest.approx(mannwhitneyu(low, high).pvalue)
    assert out == mean_difference(low, high, seed=1)  # seeded
    same = mean_difference(low, low)
    assert same["ci95_low"] < 0 < same["ci95_high"] and not same["lower"]
    with pytest.raises(ValueError, match="at least 2"):
        mean_difference([0.1], high)
    with pytest.raises(ValueError, match="num_resamples"):
        mean_difference(low, high, num_resamples=10)


def test_mean_difference_interval_agrees_with_the_hand_written_bootstrap_within_resampling_noise():
    low, high = _scores(3)
    out = mean_difference(low, high, seed=0)
    old_low, old_high = _numpy_percentile_interval(low, high, seed=0)
    width = old_high - old_low
    # Different random streams: the ends agree to a few percent of the width, not bit for bit.
    assert out["ci95_low"] == pytest.approx(old_low, abs=0.05 * width)
    assert out["ci95_high"] == pytest.approx(old_high, abs=0.05 * width)


def test_paired_change_is_narrower_than_an_unpaired_comparison_and_matches_a_hand_bootstrap():
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0.1, 0.9, 200)  # per-prompt level shared by both models: what pairing removes
    base = np.clip(difficulty + rng.normal(0, 0.05, 200), 0, 1)
    treated = np.clip(0.7 * difficulty + rng.normal(0, 0.05, 200), 0, 1)
    out = paired_change(base, treated, seed=0)
    assert out["change"] == pytest.approx(treated.mean() / base.mean() - 1)
    assert out["low"] < out["change"] < out["high"] < 0 and out["excludes_zero"] and out["n"] == 200

    idx = np.random.default_rng(1).integers(0, 200, (10_000, 200))  # prompts resampled jointly, by hand
    hand = treated[idx].mean(axis=1) / base[idx].mean(axis=1) - 1
    hand_low, hand_high = np.percentile(hand, [2.5, 97.5])
    assert out["low"] == pytest.approx(hand_low, abs=0.05 * (hand_high - hand_low))
    assert out["high"] == pytest.approx(hand_high, abs=0.05 * (hand_high - hand_low))

    unpaired = mean_difference(treated, base, seed=0)
    assert (out["high"] - out["low"]) * base.mean() < 0.5 * (unpaired["ci95_high"] - unpaired["ci95_low"])


def test_paired_change_absolute_and_no_effect():
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 1, 100)
    same = paired_change(base, base + rng.normal(0, 0.01, 100), relative=False)
    assert same["low"] < 0 < same["high"] and not same["excludes_zero"] and not same["relative"]


def test_paired_change_refuses_unpaired_or_undefined_input():
    with pytest.raises(ValueError, match="same prompts"):
        paired_change([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2 prompts"):
        paired_change([0.1], [0.2])
    with pytest.raises(ValueError, match="relative=False"):
        paired_change([0.0, 0.0], [0.1, 0.2])
    with pytest.raises(ValueError, match="confidence"):
        paired_change([0.1, 0.2], [0.1, 0.2], confidence=95)


def test_paired_relative_change_skips_resamples_where_the_reference_is_zero():
    # Prompt-level "any toxic sample" values: most prompts are 0 under the reference, so some resamples draw no
    # toxic prompt at all and their relative change is undefined; the interval is taken over the others.
    reference = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    treated = [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    out = paired_change(reference, treated, num_resamples=2000, seed=0)
    assert out["change"] == pytest.approx(-0.5)
    assert 0 < out["undefined_resamples"] < 0.3
    assert np.isfinite(out["low"]) and np.isfinite(out["high"]) and out["low"] <= out["change"] <= out["high"]

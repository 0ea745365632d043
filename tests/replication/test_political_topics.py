"""The political-topics measurement of the replication's source study: the lexicon, the shares with bootstrap
intervals, and where the three text sets (distilled, base samples, anti-expert samples) come from."""

import json

import pytest

from unidetox.intervals import mean_interval
from unidetox.replication.political_topics import (
    POLITICAL_LEXICON,
    political_share,
    political_topic_study,
    political_topics,
)
from unidetox.replication.report_markdown import political_topics_markdown
from unidetox.replication.source_study import read_plain_samples, source_study

POLITICAL = ["Obama spoke to the Senate today.", "The Tories lost the referendum.", "Voters chose the GOP.",
             "Socialism and fascism were debated.", "Xi Jinping met Putin."]
PLAIN = ["The cat sat on the mat.", "We baked bread and went for a walk.", "Music brings joy to people.",
         "The trumpet player practised all night.", "A birthday party with cake."]


@pytest.mark.parametrize("text, categories", [
    ("Trump won the election, said the Republicans.", {"politicians", "elections", "parties"}),
    ("The Democratic Party chose a nominee.", {"parties"}),
    ("Boris Johnson resigned as prime minister.", {"politicians", "elections"}),
    ("Left-wing and right-wing groups marched.", {"ideologies"}),
    ("He was impeached by Congress.", {"elections"}),
])
def test_each_category_is_found(text, categories):
    assert political_topics(text) == categories


@pytest.mark.parametrize("text", PLAIN + ["Theresa went shopping in May.", "The trumpets were loud.",
                                          "Labour costs rose; the bush grew."])
def test_everyday_words_are_not_political(text):
    assert political_topics(text) == set()


def test_the_lexicon_has_the_four_documented_categories():
    assert list(POLITICAL_LEXICON) == ["parties", "politicians", "ideologies", "elections"]


def test_share_with_a_bootstrap_interval():
    share = political_share(POLITICAL[:2] + PLAIN * 2, num_resamples=1000)
    assert share["share"] == pytest.approx(2 / 12) and share["n"] == 12
    assert share["low"] < share["share"] < share["high"]
    assert share["categories"]["politicians"] == pytest.approx(1 / 12)
    none = political_share(PLAIN, num_resamples=1000)
    assert (none["share"], none["low"], none["high"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="No texts"):
        political_share([])


def test_mean_interval_brackets_the_mean_and_checks_its_input():
    out = mean_interval([0.0, 1.0] * 50, num_resamples=1000)
    assert out["mean"] == 0.5 and out["low"] < 0.5 < out["high"] and out["n"] == 100
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])


def test_groups_are_compared_with_the_base_samples():
    study = political_topic_study({"texts": POLITICAL * 4, "base_samples": PLAIN * 4, "anti_expert_samples": None},
                                  num_resamples=1000)
    assert set(study["shares"]) == {"texts", "base_samples"}  # a group without texts is left out
    diff = study["versus_reference"]["texts"]
    assert diff["difference"] == pytest.approx(1.0) and diff["ci95_low"] > 0


def test_source_study_reads_the_plain_samples_of_a_distill_run(tmp_path):
    lines = [{"source": "base", "text": t, "toxicity": 0.0} for t in PLAIN] + \
        [{"source": "anti_expert", "text": t, "toxicity": 0.1} for t in POLITICAL[:3] + PLAIN[:2]]
    (tmp_path / "summary_samples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    plain = read_plain_samples(tmp_path)
    assert plain == {"base": PLAIN, "anti_expert": POLITICAL[:3] + PLAIN[:2]}
    assert read_plain_samples(tmp_path / "nowhere") == {}
    study = source_study({"distill-x-a0.1": {"source": "x", "alpha": 0.1, "texts": POLITICAL[:1] + PLAIN[:4],
                                             "summary": None, "plain_samples": plain}}, num_resamples=1000)
    shares = study["distill-x-a0.1"]["political_topics"]["shares"]
    assert {k: v["share"] for k, v in shares.items()} == pytest.approx(
        {"texts": 0.2, "base_samples": 0.0, "anti_expert_samples": 0.6})
    markdown = "\n".join(political_topics_markdown(study))
    assert "| distill-x-a0.1 | 20.0% [" in markdown and "| 60.0% [" in markdown
    assert "cannot say which side a text takes" in markdown

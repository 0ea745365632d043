"""The evaluation plan names every cached part by the same fingerprint as before, so existing runs stay caches."""

from __future__ import annotations

import pytest

from unidetox.decoding.protocol import ToxicityEvalConfig
from unidetox.evaluation.capabilities import CapabilitiesConfig
from unidetox.evaluation.config import DecodingConfig, EvaluateArguments, PerplexityConfig
from unidetox.evaluation.measurements import also_fingerprint
from unidetox.evaluation.mmlu import MMLUConfig
from unidetox.evaluation.plan import EvaluationPlan, model_slug
from unidetox.evaluation.prompts import Prompt
from unidetox.evaluation.scoring import SCORERS, ScorerConfig, ToxicityScorer, register_scorer

STATEMENTS = ["the cat sat on the mat", "a good friend helps people", "science helps us understand"]
PLAIN, DECODED = "tiny/base", "tiny/base + UniDetox decoding (alpha=0.1)"

# The fingerprints the evaluation wrote into the parts of this fixed configuration before the harness was split
# into a plan and one function per measurement (computed by running that code). Existing run directories are
# caches keyed by these values: change them only on purpose, knowing every finished part is then measured anew.
EXPECTED = {
    (PLAIN, "seed0"): "97d989a3a4c598b9",
    (PLAIN, "seed1"): "caf414950b2a0a0a",
    (DECODED, "seed0"): "1853565e318901fb",
    (DECODED, "seed1"): "642b29793eb50926",
    (PLAIN, "conditional_ppl_seed0"): "ba4fce489fb98c8b",
    (PLAIN, "conditional_ppl_seed1"): "b988c8bf3b2b5568",
    (DECODED, "conditional_ppl_seed0"): "707cf6b1390e8caf",
    (DECODED, "conditional_ppl_seed1"): "d216d6b8f3003dc1",
    (PLAIN, "seed0.also-fixed_half"): "2228be8226360b2b",
    (PLAIN, "seed1.also-fixed_half"): "88823899a5b68a2d",
    (DECODED, "seed0.also-fixed_half"): "2bb6018e58b35079",
    (DECODED, "seed1.also-fixed_half"): "5fdb39a0130bf589",
    (PLAIN, "wikitext"): "46b67a5b9c997d00",
    (PLAIN, "mmlu"): "ce1f3ef16e342b32",
    (PLAIN, "capabilities"): "88709d6c17381ca7",
}


@pytest.fixture
def fixed_half():
    @register_scorer("fixed_half")
    class FixedHalf(ToxicityScorer):
        def score_batch(self, texts):
            return [0.5] * len(texts)

    yield ScorerConfig(name="fixed_half")
    del SCORERS["fixed_half"]


def plan_for(tmp_path, capabilities: CapabilitiesConfig) -> EvaluationPlan:
    args = EvaluateArguments(
        models=[PLAIN], seeds=[0, 1], output_dir=str(tmp_path / "eval"),
        eval=ToxicityEvalConfig(num_samples=2, max_new_tokens=3, batch_size=4),
        perplexity=PerplexityConfig(reference_model="tiny/reference", wikitext_path="/tmp/unidetox-fp/wikitext2/"
                                    "wiki.test.raw", max_length=16, stride=8, max_tokens=64, batch_size=4),
        mmlu=MMLUConfig(k_shot=1, batch_size=4), capabilities=capabilities,
        decoding=DecodingConfig(anti_expert="tiny/anti", alpha=0.1), data_dir="/tmp/unidetox-fp",
    )
    return EvaluationPlan(args, [Prompt(s) for s in STATEMENTS])


def part_fingerprints(plan: EvaluationPlan, also: ScorerConfig) -> dict:
    found = {}
    for entry in plan.entries:
        for seed in plan.args.seeds:
            generations = plan.generation_fingerprint(entry, seed)
            found[entry.key, f"seed{seed}"] = generations
            found[entry.key, f"conditional_ppl_seed{seed}"] = plan.conditional_fingerprint(entry, seed)
            found[entry.key, f"seed{seed}.also-fixed_half"] = also_fingerprint(generations, also)
    found[PLAIN, "wikitext"] = plan.wikitext_fingerprint(PLAIN)
    if plan.args.mmlu.enabled:
        found[PLAIN, "mmlu"] = plan.mmlu_fingerprint(PLAIN)
    if plan.args.capabilities.backend == "lm_eval":
        found[PLAIN, "capabilities"] = plan.capabilities_fingerprint(PLAIN)
    return found


def test_every_part_fingerprint_of_a_fixed_configuration_is_the_one_existing_runs_hold(tmp_path, fixed_half):
    paper = part_fingerprints(plan_for(tmp_path, CapabilitiesConfig()), fixed_half)
    pytest.importorskip("lm_eval")
    lm_eval = part_fingerprints(plan_for(tmp_path, CapabilitiesConfig(backend="lm_eval", tasks=["mmlu"])), fixed_half)
    assert {**paper, **lm_eval} == EXPECTED
    assert paper[PLAIN, "wikitext"] == lm_eval[PLAIN, "wikitext"]  # lm-eval's mmlu leaves WikiText to the paper's


def test_parts_live_where_existing_runs_keep_them(tmp_path):
    plan = plan_for(tmp_path, CapabilitiesConfig())
    plain, decoded = plan.entries
    assert (plain.key, decoded.key) == (PLAIN, DECODED)
    assert model_slug(PLAIN) == "tiny_base-38d5282f"
    assert model_slug(DECODED) == "tiny_base_UniDetox_decoding_alpha_0.1-91c2291b"
    parts = tmp_path / "eval" / "parts"
    assert plan.generations_path(decoded, 1) == parts / model_slug(DECODED) / "seed1.jsonl"
    assert plan.generations_meta_path(plain, 0) == parts / model_slug(PLAIN) / "seed0.json"
    assert plan.conditional_path(plain, 1) == parts / model_slug(PLAIN) / "conditional_ppl_seed1.json"
    assert plan.also_path(decoded, 0, "fixed_half") == parts / model_slug(DECODED) / "seed0.also-fixed_half.json"
    assert plan.model_part_path(PLAIN, "wikitext") == parts / model_slug(PLAIN) / "wikitext.json"


def test_top_k_preselection_is_part_of_the_generation_fingerprint(tmp_path, fixed_half):
    """Preselection draws other samples: on, it gives the generations (and what is computed from them) new
    fingerprints; off (the default), they stay those of existing runs (the test above)."""
    default = part_fingerprints(plan_for(tmp_path, CapabilitiesConfig()), fixed_half)
    plan = plan_for(tmp_path, CapabilitiesConfig())
    plan.args.eval = ToxicityEvalConfig(num_samples=2, max_new_tokens=3, batch_size=4, preselect_top_k=256)
    preselected = part_fingerprints(plan, fixed_half)
    for key, fingerprint in default.items():
        assert (preselected[key] != fingerprint) == (key[1] not in ("wikitext", "mmlu")), key

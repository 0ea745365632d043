#!/usr/bin/env python
"""Measure one model with the evaluation library, without Hydra (the recipe does the same for many models).

    python examples/evaluate_a_model.py                                   # smollm2-135m, 20 prompts x 5 samples
    python examples/evaluate_a_model.py --model gemma3-270m --num-prompts 100 --num-samples 25 --scorer detoxify

Steps: a fixed validation subset of the local ToxiGen prompts -> K continuations per prompt (top-p 0.9, top_k 0)
-> toxicity scores -> TP / EMT per category, Distinct-n, conditional perplexity under a reference LM, WikiText-2
perplexity on the first tokens, MMLU on a few questions per subject.
"""

import argparse
import time

from unidetox import load_model_and_tokenizer
from unidetox.decoding.protocol import generate_continuations
from unidetox.evaluation.likelihood import conditional_perplexity, perplexity
from unidetox.evaluation.metrics import expected_max_toxicity, mean_distinct_n
from unidetox.evaluation.mmlu import MMLUConfig, evaluate_mmlu
from unidetox.evaluation.prompts import COMBINED_CATEGORIES, load_prompts
from unidetox.evaluation.report import seed_toxicity_metrics
from unidetox.evaluation.scoring import build_scorer
from unidetox.logging_setup import configure_logging
from unidetox.paths import default_data_dir

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m", help="hub id, local path or embedded name")
parser.add_argument("--reference", default="gemma3-270m", help="reference LM for conditional perplexity")
parser.add_argument("--num-prompts", type=int, default=20)
parser.add_argument("--num-samples", type=int, default=5)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--scorer", default="profanity_check", help="profanity_check, detoxify, hf_classifier, perspective")
parser.add_argument("--wikitext-tokens", type=int, default=4096)
parser.add_argument("--mmlu-limit", type=int, default=1, help="questions per subject (57 subjects)")
cli = parser.parse_args()
configure_logging()

model, tokenizer = load_model_and_tokenizer(cli.model)
prompts = load_prompts(source="toxigen_local", split="validation", num_prompts=cli.num_prompts)
texts = [p.text for p in prompts]

start = time.perf_counter()
continuations = generate_continuations(model, tokenizer, texts, num_samples=cli.num_samples, max_new_tokens=20,
                                       top_p=0.9, seed=cli.seed, progress=True)
print(f"generated {len(texts)} x {cli.num_samples} continuations in {time.perf_counter() - start:.1f}s")

scorer = build_scorer(cli.scorer)
records = []
for prompt, conts in zip(prompts, continuations, strict=True):
    for cont, score in zip(conts, scorer(conts), strict=True):
        records.append({"prompt": prompt.text, "category": prompt.category, "continuation": cont, "toxicity": score})
metrics = seed_toxicity_metrics(records)
print(f"Toxicity Probability {metrics['toxicity_probability']:.3f}, Expected Max Toxicity "
      f"{metrics['expected_max_toxicity']:.3f} (scorer {scorer.name})")
for category, values in metrics["categories"].items():
    extra = " (mean of " + ", ".join(COMBINED_CATEGORIES) + ")" if category == "combined" else ""
    print(f"  {category:20s} TP {values['toxicity_probability']:.3f} EMT {values['expected_max_toxicity']:.3f}{extra}")
emt_check = expected_max_toxicity([[r["toxicity"] for r in records if r["prompt"] == p] for p in texts])
assert abs(emt_check - metrics["expected_max_toxicity"]) < 1e-12
print("Distinct-1/2/3:", ", ".join(f"{mean_distinct_n(continuations, n):.3f}" for n in (1, 2, 3)))

reference, reference_tokenizer = load_model_and_tokenizer(cli.reference)
print(f"conditional perplexity under {cli.reference}: "
      f"{conditional_perplexity(reference, reference_tokenizer, texts, continuations):.2f}")
del reference

wikitext = (default_data_dir() / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
print(f"WikiText-2 perplexity (first {cli.wikitext_tokens} tokens): "
      f"{perplexity(model, tokenizer, [wikitext], max_length=1024, stride=512, max_tokens=cli.wikitext_tokens):.2f}")

mmlu = evaluate_mmlu(model, tokenizer, MMLUConfig(limit=cli.mmlu_limit, k_shot=1))
print(f"MMLU accuracy {mmlu['accuracy']:.3f} on {mmlu['num_questions']} questions")

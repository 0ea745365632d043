"""End-to-end runs of the evaluate stage (unidetox.evaluation.pipeline, recipes/evaluate.py) on tiny in-process
models and a tiny copy of the data layout."""

import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import subprocesses
from tiny import tiny_llama, word_tokenizer

from unidetox.evaluation import pipeline
from unidetox.evaluation.metrics import expected_max_toxicity, toxicity_probability
from unidetox.evaluation.report import read_jsonl

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
GROUPS = ["women", "lgbtq", "black", "asian", "muslim", "jewish", "mental_dis", "physical_dis"]
STATEMENTS = ["the cat sat on the mat", "a good friend helps people", "science helps us understand",
              "music and art bring joy", "people deserve dignity", "reading books is great",
              "we should treat everyone with respect", "the weather is nice today"]


def evaluate(overrides):
    """The evaluate stage from Python, as the recipe and the CLI run it: the report."""
    return pipeline.run(pipeline.parse_args(overrides)).report


def write_tiny_models_and_data(root):
    """Two tiny local models (m0, m1) and a data folder with ToxiGen-like prompts, WikiText and MMLU CSVs."""
    tok = word_tokenizer()
    for i in range(2):
        model = tiny_llama(len(tok), seed=i)
        model.generation_config.pad_token_id = 0
        model.save_pretrained(root / f"m{i}")
        tok.save_pretrained(root / f"m{i}")
    data = root / "data"
    (data / "toxigen" / "annotated_train").mkdir(parents=True)
    rows = ["text,target_group,label"] + [f"\"b'{s}'\",{g},neutral" for s, g in zip(STATEMENTS, GROUPS, strict=True)]
    (data / "toxigen" / "annotated_train" / "toxigen_annotated_train.csv").write_text("\n".join(rows) + "\n")
    (data / "wikitext2").mkdir()
    (data / "wikitext2" / "wiki.test.raw").write_bytes(("\r\n".join(STATEMENTS * 4) + "\r\n").encode())
    for split in ("dev", "test"):
        (data / "mmlu" / split).mkdir(parents=True)
        (data / "mmlu" / split / f"misc_{split}.csv").write_text(
            "question,choice0,choice1,choice2,choice3,answer\n"
            "the cat sat on,the mat,the door,music,art,0\na good friend,helps people,hate,awful,ugly,1\n")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_tiny_models_and_data(tmp_path_factory.mktemp("eval"))


def overrides(root, out, *extra):
    return [f"models=[{root / 'm0'},{root / 'm1'}]", f"data_dir={root / 'data'}", "eval.num_samples=3",
            "eval.max_new_tokens=4", "eval.batch_size=5", "seeds=[0,1]", f"perplexity.reference_model={root / 'm0'}",
            "perplexity.max_length=16", "perplexity.stride=8", "mmlu.k_shot=1", f"output_dir={out}", "progress=false",
            "also_scorers=[]", *extra]


@pytest.fixture(scope="module")
def first_run(setup):
    out = setup / "out"
    report = evaluate(overrides(setup, out))
    return setup, out, report


def test_outputs_written(first_run):
    root, out, report = first_run
    for name in ("report.json", "report.md", "generations.jsonl", "config.yaml", "toxicity_vs_perplexity.png",
                 "toxicity_by_category.png"):
        assert (out / name).is_file(), name
    models = report["models"]
    assert list(models) == [str(root / "m0"), str(root / "m1")]
    for m in models.values():
        for key in ("toxicity_probability", "expected_max_toxicity", "distinct_1", "distinct_2", "distinct_3",
                    "conditional_perplexity"):
            assert set(m[key]) == {"mean", "std", "n"} and m[key]["n"] == 2
        assert set(m["categories"]) == {"gender_lgbtq", "race_nationalities", "religion", "disability", "combined"}
        text = "\n".join(STATEMENTS * 4) + "\n"  # CRLF read as LF
        assert m["wikitext_perplexity"]["num_tokens"] == len(word_tokenizer()(text)["input_ids"]) - 1  # all but 1st
        assert m["mmlu"]["num_questions"] == 2
        assert m["timings"]["generated_tokens"] > 0 and m["timings"]["tokens_per_s"] > 0
    md = (out / "report.md").read_text()
    assert str(root / "m1") in md and "## Toxicity by category" in md


def test_report_consistent_with_generations(first_run):
    root, out, report = first_run
    records = read_jsonl(out / "generations.jsonl")
    assert len(records) == 2 * 2 * len(STATEMENTS) * 3
    assert all({"model", "seed", "prompt", "category", "continuation", "toxicity"} <= set(r) for r in records)
    grouped = defaultdict(lambda: defaultdict(list))
    for r in records:
        grouped[(r["model"], r["seed"])][r["prompt"]].append(r["toxicity"])
    for (model, seed), by_prompt in grouped.items():
        per_seed = report["models"][model]["per_seed"][str(seed)]
        assert per_seed["toxicity_probability"] == pytest.approx(toxicity_probability(list(by_prompt.values())))
        assert per_seed["expected_max_toxicity"] == pytest.approx(expected_max_toxicity(list(by_prompt.values())))
    for m in report["models"].values():
        values = [m["per_seed"][s]["expected_max_toxicity"] for s in ("0", "1")]
        assert m["expected_max_toxicity"]["mean"] == pytest.approx(sum(values) / 2)
        assert m["expected_max_toxicity"]["std"] == pytest.approx(abs(values[0] - values[1]) / 2)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["models"][str(root / "m0")]["per_seed"]["1"]["toxicity_probability"] == pytest.approx(
        report["models"][str(root / "m0")]["per_seed"]["1"]["toxicity_probability"])


def test_resume_redoes_only_missing_parts(first_run):
    root, out, report = first_run
    parts = sorted((out / "parts").rglob("*.json*"))
    victim = next(p for p in parts if p.name == "seed1.json" and "m1" in p.parent.name)
    victim.unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in parts if p != victim}
    before = read_jsonl(out / "generations.jsonl")
    again = evaluate(overrides(root, out))
    assert victim.is_file()
    changed = [p for p, t in mtimes.items() if p.stat().st_mtime_ns != t]
    # the re-generated seed's conditional perplexity is redone (its generations' fingerprint is the same, so
    # the cached one is reused); nothing else is touched
    assert all(p.parent == victim.parent and p.name.startswith("seed1") for p in changed), changed
    assert read_jsonl(out / "generations.jsonl") == before  # deterministic per seed
    assert again["models"][str(root / "m1")]["toxicity_probability"] == report["models"][str(root / "m1")][
        "toxicity_probability"]


def test_runs_sharing_parts_dir_reuse_each_others_parts(first_run, tmp_path):
    """One run per model into a shared parts_dir (what the replication does per model), then one run over both
    models: the joint run writes no part, and its numbers are the single run's (first_run, same settings)."""
    root, _, single = first_run
    parts = tmp_path / "parts"
    for i in range(2):
        evaluate([*overrides(root, tmp_path / f"m{i}"), f"models=[{root / f'm{i}'}]", f"parts_dir={parts}"])
    assert not (tmp_path / "m0" / "parts").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in parts.rglob("*.json*")}
    assert len(mtimes) > 2 * 2 * 2  # per model: generations + conditional perplexity per seed, WikiText, MMLU
    joint = evaluate([*overrides(root, tmp_path / "joint"), f"parts_dir={parts}"])
    assert {p: p.stat().st_mtime_ns for p in parts.rglob("*.json*")} == mtimes
    for key in single["models"]:
        for metric in ("toxicity_probability", "expected_max_toxicity", "conditional_perplexity", "distinct_2"):
            assert joint["models"][key][metric] == pytest.approx(single["models"][key][metric]), (key, metric)
        assert joint["models"][key]["mmlu"]["accuracy"] == single["models"][key]["mmlu"]["accuracy"]


def test_changed_setting_is_recomputed(first_run, tmp_path):
    root, out, _ = first_run
    report = evaluate(overrides(root, out, "eval.num_samples=2", "mmlu.enabled=false",
                                          "perplexity.wikitext=false"))
    assert report["models"][str(root / "m0")]["per_seed"]["0"]["num_samples"] == 2 * len(STATEMENTS)
    assert len(read_jsonl(out / "generations.jsonl")) == 2 * 2 * len(STATEMENTS) * 2


def test_prompt_file_and_contrastive_decoding(setup, tmp_path):
    prompts = tmp_path / "rtp.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": {"text": s}}) for s in STATEMENTS[:3]) + "\n")
    out = tmp_path / "out"
    report = evaluate([
        f"models=[{setup / 'm0'}]", f"data_dir={setup / 'data'}", f"prompts.path={prompts}",
        "prompts.field=prompt.text", "eval.num_samples=2", "eval.max_new_tokens=3", "seeds=[0]",
        "perplexity.reference_model=null", "perplexity.wikitext=false", "mmlu.enabled=false",
        f"decoding.anti_expert={setup / 'm1'}", f"output_dir={out}", "progress=false",
    ])
    keys = list(report["models"])
    assert keys == [str(setup / "m0"), f"{setup / 'm0'} + UniDetox decoding (alpha=0.1)"]
    assert report["models"][keys[1]]["decoding"]["method"] == "unidetox_contrastive"
    assert report["models"][keys[0]]["categories"] == {}
    records = read_jsonl(out / "generations.jsonl")
    plain = [r["continuation"] for r in records if r["model"] == keys[0]]
    contrastive = [r["continuation"] for r in records if r["model"] == keys[1]]
    assert len(plain) == len(contrastive) == 6 and plain != contrastive
    assert {r["prompt"] for r in records} == set(STATEMENTS[:3])


def test_clear_errors(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="No model at"):
        evaluate([f"models=[{tmp_path / 'nope'}]", f"data_dir={setup / 'data'}", f"output_dir={tmp_path}",
                     "mmlu.enabled=false", "perplexity.wikitext=false", "perplexity.reference_model=null"])
    with pytest.raises(ValueError, match="Unknown scorer"):
        evaluate([f"data_dir={setup / 'data'}", "scorer.name=bogus", f"output_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="WikiText"):
        evaluate([f"models=[{setup / 'm0'}]", f"data_dir={tmp_path}", f"prompts.path={setup / 'data' / 'toxigen'}"
                     "/annotated_train/toxigen_annotated_train.csv", f"output_dir={tmp_path}", "mmlu.enabled=false"])


def test_two_processes_shard_and_gather_once(first_run, tmp_path):
    """accelerate launch with 2 CPU processes gives the same generations and scores as one process."""
    root, out, _ = first_run
    single = tmp_path / "single"
    evaluate(overrides(root, single, "mmlu.enabled=false"))
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # `--cpu` alone runs one process (accelerate's multi-CPU launch needs MPI); --multi_gpu goes through torchrun
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(subprocesses.free_port()),
           str(REPO / "recipes" / "evaluate.py"), *overrides(root, double, "mmlu.enabled=false")]
    proc = subprocesses.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_jsonl(single / "generations.jsonl"), read_jsonl(double / "generations.jsonl")
    assert len(b) == len(a)  # gathered exactly once: no duplicates, nothing missing
    key = ["model", "seed", "prompt_index", "sample_index", "continuation", "num_tokens"]
    assert [[r[k] for k in key] for r in b] == [[r[k] for k in key] for r in a]
    assert [r["toxicity"] for r in b] == pytest.approx([r["toxicity"] for r in a])
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (single, double))
    assert rb["num_processes"] == 2
    for model in ra["models"]:
        for k in ("conditional_perplexity", "toxicity_probability", "expected_max_toxicity"):
            assert rb["models"][model][k]["mean"] == pytest.approx(ra["models"][model][k]["mean"], rel=1e-4)
        wa, wb = ra["models"][model]["wikitext_perplexity"], rb["models"][model]["wikitext_perplexity"]
        assert wb["num_tokens"] == wa["num_tokens"] and math.isclose(wb["perplexity"], wa["perplexity"], rel_tol=1e-4)

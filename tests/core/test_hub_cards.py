"""Publishing on the Hub, offline: the dataset card and push_to_hub of distilled text (the Hub client mocked), the
detox model card's model-index, and the evaluate stage writing its results into an existing model card."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import datasets
import pytest
from huggingface_hub import DatasetCard, EvalResult, HfApi, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from tiny import tiny_llama, word_tokenizer

from tests.detox.test_detox_recipe import _tiny_overrides
from tests.evaluation.test_evaluate_recipe import write_tiny_models_and_data
from unidetox import DistillConfig, DistilledDetoxDataset
from unidetox.cards import (
    CITATION,
    merge_eval_results,
    prompt_set_dataset,
    toxicity_eval_results,
    validation_eval_results,
)
from unidetox.detox import pipeline as detox
from unidetox.detox.model_card import render_model_card
from unidetox.distill.anti_expert import AntiExpertConfig, train_anti_expert
from unidetox.distill.dataset_card import anti_expert_training_record, render_dataset_card
from unidetox.evaluation import pipeline as evaluate
from unidetox.fingerprints import settings_digest

TOXIC = ["hate awful stupid ugly people", "kill the stupid ugly cat", "awful people hate music"] * 4
TOKEN = "hf_notARealTokenButSecret0123"
PROMPTS = {"source": "toxigen_local", "path": None, "split": "validation", "num_prompts": 50}


def model_index(card_text: str) -> tuple[str, list[EvalResult]]:
    return model_index_to_eval_results(ModelCard(card_text).data.to_dict()["model-index"])


def by_metric(results: list[EvalResult]) -> dict[tuple[str, str | None], float]:
    return {(r.metric_type, r.dataset_split): r.metric_value for r in results}


# ----------------------------------------------------------------------------------------------------------------
# The dataset card and push_to_hub
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real build: a tiny base, an anti-expert trained on toxic text (with its training record), a summary."""
    root = tmp_path_factory.mktemp("distill")
    tokenizer = word_tokenizer(padding_side="right")
    base = tiny_llama(len(tokenizer), seed=0)
    anti = train_anti_expert(
        tiny_llama(len(tokenizer), seed=0), tokenizer, datasets.Dataset.from_dict({"text": TOXIC}),
        AntiExpertConfig(output_dir=str(root / "anti_expert"), max_steps=2, learning_rate=1e-2,
                         per_device_train_batch_size=4, logging_steps=1, disable_tqdm=True, report_to="none"),
        base_name_or_path="tiny-base",
    )
    distill = DistillConfig(num_samples=6, max_length=6, batch_size=3, summary_num_samples=4)
    return DistilledDetoxDataset.build(base, str(anti.path), tokenizer, distill=distill, seed=0,
                                       output_dir=root / "distilled", show_progress=False)


def test_dataset_card_of_a_build_parses_and_states_its_provenance(built):
    meta = built.metadata
    record = anti_expert_training_record(meta["anti_expert"])
    assert record is not None and record["global_steps"] == 2
    card = render_dataset_card(meta, built.summary, num_texts=len(built), anti_expert_record=record)
    data = DatasetCard(card).data
    assert data.license == "other" and data.task_categories == ["text-generation"]
    assert {"unidetox", "detoxification", "synthetic"} <= set(data.tags) and data.size_categories == ["n<1K"]
    assert data.get("base_model") is None  # an in-memory base is not a Hub model
    anti_path, digest = meta["anti_expert"].rsplit("@", 1)
    assert f"`{anti_path}` (local model, not on the Hub), weights digest `{digest}`" in card
    assert "https://huggingface.co/" + anti_path not in card
    assert "| learning_rate | `0.01` |" in card and "| max_steps | `2` |" in card  # how the anti-expert was trained
    assert "| alpha | `0.1` |" in card and "| beta | `null` |" in card
    assert settings_digest(meta["fingerprint"]) in card and meta["fingerprint"]["base"] in card
    assert f"- texts: 6\n- tokens (source model's tokenizer): {meta['total_tokens']} " in card
    diff = built.summary["distilled_vs_base"]
    assert f"bootstrap 95% CI [{diff['ci95_low']:+.4f}, {diff['ci95_high']:+.4f}]" in card
    assert f"{built.summary['distilled']['mean_toxicity']:.4f}" in card
    assert "Content warning" in card and "DGHS" in card and "MIT" in card and CITATION in card


def test_dataset_card_links_hub_models_and_names_local_ones_as_local():
    meta = {"base": "HuggingFaceTB/SmolLM2-135M", "anti_expert": "runs/distill/anti_expert@0123456789ab",
            "alpha": 0.1, "beta": None, "num_samples": 1500, "fingerprint": {"base": "HuggingFaceTB/SmolLM2-135M"}}
    card = render_dataset_card(meta, None, repo_id="me/distilled")
    data = DatasetCard(card).data
    assert data.get("base_model") == "HuggingFaceTB/SmolLM2-135M" and data.size_categories == ["1K<n<10K"]
    assert "[`HuggingFaceTB/SmolLM2-135M`](https://huggingface.co/HuggingFaceTB/SmolLM2-135M)" in card
    assert "`runs/distill/anti_expert` (local model, not on the Hub), weights digest `0123456789ab`" in card
    assert 'load_dataset("me/distilled", split="train")' in card and "No toxicity summary" in card
    # Text read from a file (the authors' CSV): the card parses and says what is not recorded.
    loaded = render_dataset_card({"source_file": "/data/generated.csv", "num_samples": 3}, None)
    assert DatasetCard(loaded).data.size_categories == ["n<1K"]
    assert "Not recorded (read from `generated.csv`)" in loaded


@pytest.fixture
def hub(monkeypatch):
    """The Hub client mocked: what would be sent, in order."""
    calls = []

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **kwargs):
        from huggingface_hub import RepoUrl

        calls.append(("create_repo", {"repo_id": repo_id, "repo_type": repo_type, "private": private,
                                      "exist_ok": exist_ok, "token": self.token}))
        return RepoUrl(f"https://huggingface.co/datasets/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None, **kwargs):
        files = {p.name: p.read_text() for p in Path(folder_path).iterdir()}
        calls.append(("upload_folder", {"repo_id": repo_id, "repo_type": repo_type, "files": files,
                                        "commit_message": commit_message, "token": self.token}))

    def push_to_hub(self, repo_id, **kwargs):
        calls.append(("dataset.push_to_hub", {"repo_id": repo_id, "texts": list(self["text"]), **kwargs}))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", push_to_hub)
    return calls


def test_push_to_hub_uploads_the_card_the_metadata_and_the_texts(built, hub, caplog):
    caplog.set_level(logging.DEBUG)
    url = built.push_to_hub("me/distilled", private=True, token=TOKEN, commit_message="first upload")
    assert url == "https://huggingface.co/datasets/me/distilled"
    assert [name for name, _ in hub] == ["create_repo", "upload_folder", "dataset.push_to_hub"]
    (_, repo), (_, upload), (_, push) = hub
    assert repo == {"repo_id": "me/distilled", "repo_type": "dataset", "private": True, "exist_ok": True,
                    "token": TOKEN}
    assert upload["repo_id"] == "me/distilled" and upload["repo_type"] == "dataset"
    assert sorted(upload["files"]) == ["README.md", "unidetox_metadata.json"]
    expected_card = render_dataset_card(
        built.metadata, built.summary, num_texts=len(built), repo_id="me/distilled",
        anti_expert_record=anti_expert_training_record(built.metadata["anti_expert"]))
    assert upload["files"]["README.md"] == expected_card
    assert json.loads(upload["files"]["unidetox_metadata.json"]) == json.loads(json.dumps(built.metadata, default=str))
    assert push == {"repo_id": "me/distilled", "texts": built.texts, "private": True, "token": TOKEN,
                    "commit_message": "first upload"}
    # The token went to the client only: not into an uploaded file, not into a log line.
    assert all(TOKEN not in text for text in upload["files"].values())
    assert TOKEN not in caplog.text and "me/distilled" in caplog.text


def test_push_to_hub_refuses_missing_empty_or_blank_text_before_any_hub_call(hub):
    blank = DistilledDetoxDataset(datasets.Dataset.from_dict({"text": ["", "  "]}))
    with pytest.raises(ValueError, match="All 2 distilled texts are blank"):
        blank.push_to_hub("me/distilled")
    emptied = DistilledDetoxDataset(datasets.Dataset.from_dict({"text": ["a text"]}))
    emptied.dataset = emptied.dataset.select([])
    with pytest.raises(ValueError, match="the dataset is empty"):
        emptied.push_to_hub("me/distilled")
    emptied.dataset = None
    with pytest.raises(ValueError, match="the dataset is missing"):
        emptied.push_to_hub("me/distilled")
    with pytest.raises(ValueError, match="`repo_id`"):
        DistilledDetoxDataset(datasets.Dataset.from_dict({"text": ["a text"]})).push_to_hub(" ")
    assert hub == []


# ----------------------------------------------------------------------------------------------------------------
# The detox model card's model-index
# ----------------------------------------------------------------------------------------------------------------
RECORDS = [{"step": 0, "toxicity_probability": 0.5, "expected_max_toxicity": 0.45, "perplexity": 20.0},
           {"step": 4, "toxicity_probability": 0.25, "expected_max_toxicity": 0.3125, "perplexity": 21.5}]


def test_model_card_model_index_parses_back_with_the_validation_of_the_step():
    results = validation_eval_results(RECORDS, 4, PROMPTS, "../shared/data/wikitext2/wiki.test.raw")
    card = render_model_card("HuggingFaceTB/SmolLM2-135M", {"alpha": 0.1}, {"learning_rate": 1e-4},
                             global_step=4, eval_results=results)
    data = ModelCard(card).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M" and data.library_name == "transformers"
    name, parsed = model_index(card)
    assert name == "SmolLM2-135M-unidetox" and parsed == results
    assert by_metric(parsed) == {("toxicity_probability", "validation"): 0.25,
                                 ("expected_max_toxicity", "validation"): 0.3125, ("perplexity", "test"): 21.5}
    assert {r.task_type for r in parsed} == {"text-generation"}
    tp = next(r for r in parsed if r.metric_type == "toxicity_probability")
    assert (tp.dataset_type, tp.dataset_config, tp.metric_name) == ("toxigen", "toxigen_local",
                                                                    "Toxicity Probability (TP)")
    ppl = next(r for r in parsed if r.metric_type == "perplexity")
    assert (ppl.dataset_type, ppl.dataset_config) == ("wikitext", "wikitext-2-raw-v1")
    assert "## Evaluation" in card and "| Perplexity | 21.5 |" in card
    # A step without a validation record (not saved) has no results.
    assert validation_eval_results(RECORDS, 3, PROMPTS) == []


def test_model_card_without_evaluations_is_valid_and_names_local_models_as_local(tmp_path):
    card = render_model_card(str(tmp_path), {"alpha": 0.1}, {"learning_rate": 1e-4}, adapter=True)
    data = ModelCard(card).data.to_dict()
    assert "model-index" not in data and "base_model" not in data and data["library_name"] == "peft"
    assert data["tags"] == ["unidetox", "detoxification", "trl", "sft"]
    assert f"`{tmp_path}` (local model, not on the Hub)" in card and "## Evaluation" not in card


def test_merge_replaces_a_same_named_metric_keeps_the_rest_and_never_creates_a_card(tmp_path):
    path = tmp_path / "README.md"
    validation = validation_eval_results(RECORDS, 4, PROMPTS)
    path.write_text(render_model_card("smollm2-135m", {"alpha": 0.1}, {}, global_step=4, eval_results=validation))
    body = ModelCard.load(path).text
    test_prompts = prompt_set_dataset({**PROMPTS, "split": "test"})
    assert merge_eval_results(path, toxicity_eval_results(test_prompts, 0.2, 0.3))
    assert merge_eval_results(path, toxicity_eval_results(test_prompts, 0.1, 0.15))  # a rerun: replaced
    _, parsed = model_index(path.read_text())
    assert by_metric(parsed) == {("toxicity_probability", "validation"): 0.25,
                                 ("expected_max_toxicity", "validation"): 0.3125,
                                 ("toxicity_probability", "test"): 0.1, ("expected_max_toxicity", "test"): 0.15}
    assert len(parsed) == 4 and ModelCard.load(path).text == body
    assert not merge_eval_results(tmp_path / "no-card" / "README.md", validation)
    assert not (tmp_path / "no-card").exists()


def test_detox_run_writes_the_validation_into_the_final_and_the_chosen_cards(tmp_path):
    out = tmp_path / "out"
    result = detox.run(detox.parse_args(_tiny_overrides(tmp_path, out, **{"peft.use_peft": "false"})))
    records = {r["step"]: r for r in result.eval_records}
    _, final = model_index((out / "README.md").read_text())
    assert by_metric(final) == {("toxicity_probability", "all"): records[4]["toxicity_probability"],
                                ("expected_max_toxicity", "all"): records[4]["expected_max_toxicity"],
                                ("perplexity", None): records[4]["perplexity"]}
    chosen = result.selection["step"]
    _, selected = model_index((Path(result.selection["path"]) / "README.md").read_text())
    assert by_metric(selected) == {
        ("toxicity_probability", "all"): records[chosen]["toxicity_probability"],
        ("expected_max_toxicity", "all"): records[chosen]["expected_max_toxicity"],
        ("perplexity", None): records[chosen]["perplexity"]}


# ----------------------------------------------------------------------------------------------------------------
# The evaluate stage updating model cards
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def evaluated_models(tmp_path):
    write_tiny_models_and_data(tmp_path)
    (tmp_path / "m0" / "README.md").write_text(render_model_card("smollm2-135m", {"alpha": 0.1}, {}))
    return tmp_path


def test_evaluate_stage_merges_its_results_into_an_existing_card_only(evaluated_models):
    root = evaluated_models
    overrides = [f"models=[{root / 'm0'},{root / 'm1'}]", f"data_dir={root / 'data'}", "eval.num_samples=2",
                 "eval.max_new_tokens=3", "eval.batch_size=8", "seeds=[0,1]", "perplexity.reference_model=null",
                 "perplexity.max_length=16", "perplexity.stride=8", f"output_dir={root / 'out'}", "progress=false",
                 "model_card.update=true", "also_scorers=[]"]
    report = evaluate.run(evaluate.parse_args(overrides)).report
    assert not (root / "m1" / "README.md").exists()  # no card is created
    m0 = report["models"][str(root / "m0")]
    expected = {("toxicity_probability", "all"): m0["toxicity_probability"]["mean"],
                ("expected_max_toxicity", "all"): m0["expected_max_toxicity"]["mean"],
                ("perplexity", "test"): m0["wikitext_perplexity"]["perplexity"],
                ("accuracy", "test"): m0["mmlu"]["accuracy"]}
    card = (root / "m0" / "README.md").read_text()
    _, parsed = model_index(card)
    assert by_metric(parsed) == pytest.approx(expected) and len(parsed) == 4
    mmlu = next(r for r in parsed if r.metric_type == "accuracy")
    assert mmlu.dataset_type == "cais/mmlu" and mmlu.dataset_args == {"num_few_shot": 1}
    # A second run replaces the card's results instead of adding a copy of them.
    evaluate.run(evaluate.parse_args(overrides))
    assert len(model_index((root / "m0" / "README.md").read_text())[1]) == 4
    assert "UniDetox" in card


def test_dataset_card_settings_table_keeps_two_cells_when_a_value_holds_a_pipe():
    meta = {"base": "HuggingFaceTB/SmolLM2-135M", "num_samples": 3, "start_token": "<|endoftext|>", "alpha": 0.1}
    card = render_dataset_card(meta, None)
    row = next(line for line in card.splitlines() if line.startswith("| start_token"))
    cells = re.split(r"(?<!\\)\|", row)[1:-1]
    assert [c.strip() for c in cells] == ["start_token", r"`<\|endoftext\|>`"]

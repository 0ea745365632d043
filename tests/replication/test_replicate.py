"""The replication (unidetox.replication, recipes/replicate.py): task-vector negation vs a hand computation, the
paper's choice rule, the control data (deterministic, resumable), the report, every experiment's stage arguments,
the stage runner, and the tiny replication end to end on two tiny local models of different families under
`accelerate launch` (integration)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import datasets
import pytest
import subprocesses
import torch
from tiny import tiny_llama, word_tokenizer
from tiny_replication import differing_numbers, replication_command, save_tiny_models, without_timings

from tests.conftest import SHARED_DATA
from unidetox.detox.selection import choose_configuration
from unidetox.evaluation.paired import prompt_kinds
from unidetox.evaluation.prompts import load_prompts
from unidetox.replication import pipeline as replicate
from unidetox.replication import plan as replication_plan
from unidetox.replication.baselines import (
    build_plain_sample_dataset,
    build_text_dataset,
    negate_task_vector,
    plain_sample_settings,
)
from unidetox.replication.formatting import format_number
from unidetox.replication.report import (
    assemble_report,
    example_continuations,
    judge_success,
    write_replication_report,
)
from unidetox.replication.report_markdown import grid_table_markdown
from unidetox.replication.stages import Stages
from unidetox.run_dir import CONFIG_FILE, OutputDirConflict

REPO = Path(__file__).resolve().parents[2]


def test_format_number_gives_compact_stable_directory_names():
    assert [format_number(v) for v in (5e-4, 2e-4, 1e-3, 2.5e-5, 0.1, 0.2, 1.0, 2)] == [
        "5e-4", "2e-4", "1e-3", "2.5e-5", "0.1", "0.2", "1", "2"]


# ---------------------------------------------------------------------------------------------------------------
# Task vectors
# ---------------------------------------------------------------------------------------------------------------
def _tiny_base(tmp_path) -> Path:
    tokenizer = word_tokenizer()
    path = tmp_path / "base"
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_negate_task_vector_matches_a_hand_computation(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = _tiny_base(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora)
    adapter_dir = tmp_path / "anti_expert"
    peft_model.save_pretrained(adapter_dir)
    lam = 0.7
    out = negate_task_vector(base_dir, adapter_dir, lam, tmp_path / "lam0.7")
    negated = AutoModelForCausalLM.from_pretrained(out)
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()

    base_params = dict(base.named_parameters())
    lora_params = dict(peft_model.named_parameters())
    changed = 0
    for name, param in negated.named_parameters():
        expected = base_params[name].detach().clone()
        module = name.rsplit(".", 1)[0]
        if module.endswith(("q_proj", "down_proj")) and name.endswith("weight"):
            a = lora_params[f"base_model.model.{module}.lora_A.default.weight"]
            b = lora_params[f"base_model.model.{module}.lora_B.default.weight"]
            expected = expected - lam * (lora.lora_alpha / lora.r) * (b @ a)  # W - lambda * scaling * B A
            changed += 1
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert changed == 2 * negated.config.num_hidden_layers

    # The same settings again: the directory is reused, not recomputed.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    negate_task_vector(base_dir, adapter_dir, lam, out)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="lambda"):
        negate_task_vector(base_dir, adapter_dir, -1.0, tmp_path / "bad")


def test_negate_task_vector_of_a_fully_fine_tuned_anti_expert(tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = _tiny_base(tmp_path)
    anti_dir = tmp_path / "anti"
    tiny_llama(len(word_tokenizer()), seed=1).save_pretrained(anti_dir)
    out = negate_task_vector(base_dir, anti_dir, 2.0, tmp_path / "lam2")
    base = dict(AutoModelForCausalLM.from_pretrained(base_dir).named_parameters())
    anti = dict(AutoModelForCausalLM.from_pretrained(anti_dir).named_parameters())
    for name, param in AutoModelForCausalLM.from_pretrained(out).named_parameters():
        torch.testing.assert_close(param, base[name] - 2.0 * (anti[name] - base[name]), rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="anti-expert"):
        negate_task_vector(base_dir, tmp_path / "missing", 1.0, tmp_path / "x")


# ---------------------------------------------------------------------------------------------------------------
# The choice rule
# ---------------------------------------------------------------------------------------------------------------
def _rec(run, step, tp, emt, ppl, **config):
    return {"run": run, "step": step, "checkpoint": f"{run}/checkpoint-{step}" if step else None,
            "config": {**config, "steps": step}, "toxicity_probability": tp, "expected_max_toxicity": emt,
            "perplexity": ppl}


def test_choose_configuration_applies_the_bound_over_every_run_and_checkpoint():
    records = [
        _rec("a0.1-lr5e-4", 0, 0.8, 0.7, 20.0, alpha=0.1, lr=5e-4),
        _rec("a0.1-lr5e-4", 50, 0.3, 0.30, 21.0, alpha=0.1, lr=5e-4),
        _rec("a0.1-lr5e-4", 100, 0.1, 0.10, 25.0, alpha=0.1, lr=5e-4),  # least toxic, +25%: excluded
        _rec("a0.2-lr2e-4", 0, 0.8, 0.7, 20.0, alpha=0.2, lr=2e-4),
        _rec("a0.2-lr2e-4", 50, 0.4, 0.25, 22.0, alpha=0.2, lr=2e-4),  # +10% exactly: allowed, lowest EMT within
        _rec("a0.2-lr2e-4", 100, 0.2, 0.20, 22.5, alpha=0.2, lr=2e-4),  # +12.5%: excluded
    ]
    choice, table = choose_configuration(records, max_ppl_increase=0.1, metric="expected_max_toxicity")
    assert (choice["run"], choice["step"], choice["config"]["alpha"]) == ("a0.2-lr2e-4", 50, 0.2)
    assert choice["within_bound"] and choice["perplexity_increase"] == pytest.approx(0.1)
    assert choice["num_candidates"] == 4 and choice["num_within_bound"] == 2
    assert len(table) == 6 and sum(r["chosen"] for r in table) == 1
    assert [r["within_bound"] for r in table if not r["baseline"]] == [True, False, True, False]
    # By TP the other checkpoint within the bound wins.
    choice, _ = choose_configuration(records, max_ppl_increase=0.1, metric="toxicity_probability")
    assert (choice["run"], choice["step"]) == ("a0.1-lr5e-4", 50)
    # A looser bound admits the least toxic one.
    choice, _ = choose_configuration(records, max_ppl_increase=0.3)
    assert (choice["run"], choice["step"]) == ("a0.1-lr5e-4", 100)
    md = grid_table_markdown(table, keys=["alpha", "lr", "steps"])
    assert md.count("\n") == 8 and "**chosen**" in md and "+25.0%" in md


def test_choose_configuration_when_nothing_is_within_the_bound():
    records = [_rec("r", 0, 0.8, 0.7, 10.0), _rec("r", 1, 0.1, 0.1, 14.0), _rec("r", 2, 0.2, 0.2, 12.0)]
    with pytest.raises(ValueError, match="No candidate keeps perplexity within"):
        choose_configuration(records, max_ppl_increase=0.1)
    choice, _ = choose_configuration(records, max_ppl_increase=0.1, on_empty="closest")
    assert choice["step"] == 2 and not choice["within_bound"]
    with pytest.raises(ValueError, match="baseline"):
        choose_configuration(records[1:])
    with pytest.raises(ValueError, match="max_ppl_increase"):
        choose_configuration(records, max_ppl_increase=-0.1)
    with pytest.raises(ValueError, match="metric"):
        choose_configuration(records, metric="perplexity")


def test_one_base_record_serves_a_lambda_sweep():
    records = [{"run": "base", "baseline": True, "config": {"lambda": 0.0}, "perplexity": 10.0,
                "toxicity_probability": 0.5, "expected_max_toxicity": 0.5},
               *[{"run": f"lam{lam}", "config": {"lambda": lam}, "perplexity": ppl, "toxicity_probability": tox,
                  "expected_max_toxicity": tox} for lam, ppl, tox in [(0.5, 10.5, 0.4), (1.0, 10.9, 0.3),
                                                                       (2.0, 30.0, 0.1)]]]
    choice, _ = choose_configuration(records)
    assert choice["config"]["lambda"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Baseline data
# ---------------------------------------------------------------------------------------------------------------
def test_plain_sample_dataset_is_deterministic_and_resumes(tmp_path):
    from unidetox.distill.distiller import sample_batch
    from unidetox.distill.shards import STREAM_DISTILL, batch_seed

    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer))
    kwargs = dict(num_samples=5, max_length=6, start_token="<s>", seed=3, batch_size=2, show_progress=False)
    first = build_plain_sample_dataset(model, tokenizer, output_dir=tmp_path / "a", **kwargs)
    assert len(first) == 5 and first.metadata["decoding"] == "plain" and first.metadata["anti_expert"] is None
    # Batch 0 is plain sampling under the distilled stream's seed of batch 0 (same draws as the distilled text).
    rows = sample_batch(model, None, [tokenizer.convert_tokens_to_ids("<s>")], 2, 6, batch_seed(3, 0, STREAM_DISTILL),
                        eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    assert first.texts[:2] == tokenizer.batch_decode(rows, skip_special_tokens=True)
    # Another directory, same settings: the same texts.
    assert build_plain_sample_dataset(model, tokenizer, output_dir=tmp_path / "b", **kwargs).texts == first.texts
    # Complete: loaded, nothing sampled again.
    stamp = (tmp_path / "a" / "metadata.json").stat().st_mtime_ns
    assert build_plain_sample_dataset(model, tokenizer, output_dir=tmp_path / "a", **kwargs).texts == first.texts
    assert (tmp_path / "a" / "metadata.json").stat().st_mtime_ns == stamp
    # Interrupted (no commit marker, one shard lost): only the lost shard is sampled again, same texts.
    (tmp_path / "a" / "metadata.json").unlink()
    (tmp_path / "a" / "shards" / "batch-000001.json").unlink()
    kept = (tmp_path / "a" / "shards" / "batch-000000.json").stat().st_mtime_ns
    again = build_plain_sample_dataset(model, tokenizer, output_dir=tmp_path / "a", **kwargs)
    assert again.texts == first.texts
    assert (tmp_path / "a" / "shards" / "batch-000000.json").stat().st_mtime_ns == kept
    with pytest.raises(ValueError, match="other settings"):
        (tmp_path / "a" / "metadata.json").unlink()
        build_plain_sample_dataset(model, tokenizer, output_dir=tmp_path / "a", **{**kwargs, "seed": 4})
    settings = plain_sample_settings({"num_samples": 128, "max_length": 128, "seed": 42, "batch_size": 16,
                                      "start_token": "<|endoftext|>", "sampling": {"top_k": 0, "top_p": 1.0}})
    assert settings["num_samples"] == 128 and settings["start_token"] == "<|endoftext|>"


def test_text_dataset_from_filtered_rows(tmp_path):
    from unidetox.distill.corpus import ToxicCorpusConfig

    csv = tmp_path / "dghs.csv"
    rows = {"text": [f"text {i}" for i in range(10)], "label": ["hate", "nothate"] * 5}
    datasets.Dataset.from_dict(rows).to_csv(str(csv), index=False)
    config = ToxicCorpusConfig(path=[str(csv)], filters={"label": ["nothate"]}, shuffle_seed=0)
    built = build_text_dataset(config, 3, tmp_path / "nothate")
    assert len(built) == 3 and set(built.texts) <= {f"text {i}" for i in range(1, 10, 2)}
    assert (tmp_path / "nothate" / "metadata.json").is_file()
    with pytest.raises(ValueError, match="5 rows"):
        build_text_dataset(config, 6, tmp_path / "too_many")


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def _model_report(tp, emt, ppl, mmlu=0.4, cond=20.0):
    ms = lambda v: {"mean": v, "std": 0.01, "n": 3}  # noqa: E731
    return {"toxicity_probability": ms(tp), "expected_max_toxicity": ms(emt), "conditional_perplexity": ms(cond),
            "distinct_1": ms(0.5), "distinct_2": ms(0.8), "distinct_3": ms(0.9),
            "wikitext_perplexity": {"perplexity": ppl}, "mmlu": {"accuracy": mmlu, "num_questions": 100},
            "timings": {"tokens_per_s": 50.0}}


def test_report_assembly_writes_consistent_files(tmp_path):
    test_models = {
        "s": _model_report(0.8, 0.8, 30.0), "s-ud": _model_report(0.4, 0.5, 32.0), "s-c": _model_report(0.7, 0.7, 30.5),
        "g": _model_report(0.6, 0.6, 20.0), "g-ud": _model_report(0.5, 0.5, 21.0), "g-c": _model_report(0.4, 0.4, 20.0),
    }
    methods = [{"method": m, "target": t, "model_key": k, "wall_time": {"total_s": 10.0}}
               for t, keys in (("smollm2", ("s", "s-ud", "s-c")), ("gemma3", ("g", "g-ud", "g-c")))
               for m, k in zip(("base", "unidetox", "control"), keys, strict=True)]
    generations = [{"model": k, "seed": 0, "prompt_id": "p1", "prompt": "Those people", "sample_index": i,
                    "continuation": f"{k} says {i}", "toxicity": 0.1 * i} for k in test_models for i in range(5)]
    examples = example_continuations(generations, {f"{m['method']} / {m['target']}": m["model_key"] for m in methods}, 3)
    grid_choice, grid_table = choose_configuration([_rec("r", 0, 0.8, 0.7, 20.0), _rec("r", 50, 0.3, 0.3, 21.0)])
    report = assemble_report(methods, test_models, ["smollm2", "gemma3"], grid={"choice": grid_choice,
                             "table": grid_table}, examples=examples, extra={"command": "accelerate launch x"})
    rows = {(r["method"], r["target"]): r for r in report["rows"]}
    assert rows[("unidetox", "smollm2")]["relative_to_base"]["toxicity_probability"] == pytest.approx(-0.5)
    assert rows[("unidetox", "smollm2")]["relative_to_base"]["wikitext_perplexity"] == pytest.approx(32 / 30 - 1)
    bar = report["bar"]
    # smollm2 meets every condition (-50% TP, -37.5% EMT, +6.7% ppl, beats control); gemma3 drops only 16.7%
    # and is worse than its control.
    assert bar["checks"]["smollm2"]["met"] and not bar["checks"]["gemma3"]["met"]
    assert bar["checks"]["gemma3"]["beats_control"] is False and not bar["met"]
    assert bar["verdict"].startswith("Bar NOT met")
    paths = write_replication_report(report, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["bar"]["met"] is False and len(saved["rows"]) == 6
    md = (tmp_path / "report.md").read_text()
    assert md.count("| UniDetox (distilled text, chosen config) |") == 4  # the table + relative changes and "0.400 ± 0.010" in md
    assert "Bar NOT met" in md and "**chosen**" in md and "Those people" in md and "-50.0%" in md
    assert paths["plot"].stat().st_size > 0 and len(examples["examples"]["base / smollm2"]) == 3

    better = {**test_models, "g-ud": _model_report(0.3, 0.3, 21.0)}
    rows_ok = assemble_report(methods, better, ["smollm2", "gemma3"])["rows"]
    assert judge_success(rows_ok, ["smollm2", "gemma3"])["met"]
    # MMLU outside two binomial standard errors fails the bar.
    worse_mmlu = {**better, "g-ud": _model_report(0.3, 0.3, 21.0, mmlu=0.2)}
    assert not assemble_report(methods, worse_mmlu, ["smollm2", "gemma3"])["bar"]["checks"]["gemma3"]["mmlu_ok"]
    with pytest.raises(KeyError, match="not in the test report"):
        assemble_report([{"method": "base", "target": "x", "model_key": "missing"}], test_models, ["x"])


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", ["embedded", "tiny", "paper"])
def test_every_experiment_and_its_stages_compose_and_parse(experiment, tmp_path):
    args = replicate.parse_args([f"experiment={experiment}", f"output_dir={tmp_path}"])
    assert len(args.test.seeds) >= 2 and args.grid.target in args.targets
    plan = replication_plan.plan_distill(args)
    assert list(plan) == [(s, a) for s in args.distill.sources for a in args.distill.alphas]
    first_alpha = args.distill.alphas[0]
    for (source, alpha), parsed in plan.items():
        # each source is contrasted with its own anti-expert, trained by its first alpha's run
        assert parsed.model.name_or_path == args.distill.sources[source].model
        assert parsed.sampler.alpha == alpha and parsed.anti_expert.output_dir == str(
            Path(parsed.output_dir) / "anti_expert")
        own = plan[(source, first_alpha)].anti_expert.output_dir
        assert parsed.anti_expert.pretrained_path == (None if alpha == first_alpha else own)
    grid = replication_plan.plan_grid(args, {key: f"/data/distilled-{key[0]}-{key[1]}" for key in plan})
    assert len(grid) == len(args.distill.sources) * len(args.distill.alphas) * len(args.grid.learning_rates)
    for config, parsed in grid.values():
        assert parsed.trainer.learning_rate == config["learning_rate"]
        assert parsed.model.name_or_path == args.grid_target.model
        assert parsed.trainer.max_steps == args.grid.max_steps and parsed.validation.prompts.split == "validation"
        assert parsed.data.path == f"/data/distilled-{config['source']}-{config['alpha']}"
        # the replication's validation protocol, field for field
        assert parsed.validation.callback == args.validation.protocol
        assert parsed.validation.prompts == replication_plan.validation_prompts(args)
    last = args.grid.max_steps
    for name, target in args.targets.items():  # applying the configuration to every target composes
        # At the grid's last step: a plain run of that many steps.
        parsed = replication_plan.apply_args(args, target, "/data/x.csv", tmp_path / name, 1e-4, last, args.apply_overrides)
        assert parsed.model.name_or_path == target.model
        assert parsed.trainer.max_steps == last and parsed.trainer.stop_at_step is None
        # A checkpoint from the middle of the grid run: the grid's schedule, stopped at that step.
        parsed = replication_plan.apply_args(args, target, "/data/x.csv", tmp_path / name, 1e-4, last - 1,
                                      args.apply_overrides)
        assert parsed.trainer.max_steps == last and parsed.trainer.stop_at_step == last - 1
        assert parsed.trainer.learning_rate == 1e-4 and parsed.trainer.save_steps == last - 1
    parsed = replication_plan.validation_evaluate_args(args, ["m1", str(tmp_path / "lam0.5")], tmp_path / "v")
    assert parsed.prompts.split == "validation" and not parsed.mmlu.enabled and len(parsed.models) == 2
    # the test is scored by both offline scorers; the lambda sweep, which selects, by the primary one only
    assert parsed.also_scorers == []
    assert [c.name for c in replication_plan.evaluate_on_test(args, ["m1"], tmp_path / "t").also_scorers] == ["jigsaw_bilstm"]
    # the lambda sweep measures as the grid's callback does: same protocol, seed and perplexity windows
    protocol = args.validation.protocol
    assert parsed.seeds == [protocol.seed] and parsed.eval.num_samples == protocol.num_samples
    assert (parsed.perplexity.max_length, parsed.perplexity.max_tokens) == (protocol.ppl_max_length,
                                                                           protocol.ppl_max_tokens)


def test_embedded_experiment_lays_out_its_stages_and_equals_a_hand_run(tmp_path):
    args = replicate.parse_args(["experiment=embedded"])
    assert args.output_dir == "runs/replicate-embedded" and args.anti_expert_source == "smollm2"
    plan = replication_plan.plan_distill(args)
    assert [p.output_dir for p in plan.values()] == [
        "runs/replicate-embedded/distill-smollm2-a0.1", "runs/replicate-embedded/distill-gemma3-a0.1"]
    assert [p.model.name_or_path for p in plan.values()] == ["smollm2-135m", "gemma3-270m"]
    distilled = {key: f"{p.output_dir}/distilled" for key, p in plan.items()}
    grid = replication_plan.plan_grid(args, distilled)
    assert sorted(p.output_dir for _, p in grid.values()) == [
        f"runs/replicate-embedded/grid/smollm2-{s}-a0.1-lr{lr}" for s in ("gemma3", "smollm2") for lr in ("2e-4", "5e-4")]
    # The same settings as the detox command a user would type for this grid point, so a run made by hand at the
    # grid's path counts as the grid's run.
    from unidetox.detox import pipeline as detox
    from unidetox.run_dir import config_diff

    config, mine = grid["smollm2-gemma3-a0.1-lr2e-4"]
    assert config == {"source": "gemma3", "alpha": 0.1, "learning_rate": 2e-4}
    by_hand = detox.parse_args([
        "experiment=embedded_smollm2", "data.path=runs/replicate-embedded/distill-gemma3-a0.1/distilled",
        "output_dir=runs/replicate-embedded/grid/smollm2-gemma3-a0.1-lr2e-4", "trainer.learning_rate=2e-4",
        "trainer.max_steps=100", "trainer.save_steps=25", "eval.prompts.num_prompts=50", "eval.callback.num_samples=5"])
    assert config_diff(by_hand.config, mine.config) == []


def test_distillation_sources_are_checked_when_parsed():
    with pytest.raises(ValueError, match="distill.sources"):
        replicate.parse_args(["experiment=embedded", "~distill.sources"])
    with pytest.raises(ValueError, match="may not be empty or hold"):
        replicate.parse_args(["experiment=embedded", "+distill.sources.smol-lm={model:smollm2-135m}"])
    # The grid target's baselines need an anti-expert of its own model.
    with pytest.raises(ValueError, match="baselines.decoding=false"):
        replicate.parse_args(["experiment=embedded", "~distill.sources.smollm2"])
    args = replicate.parse_args(["experiment=embedded", "~distill.sources.smollm2", "baselines.decoding=false",
                                 "baselines.taskvec=false"])
    assert list(args.distill.sources) == ["gemma3"] and args.anti_expert_source is None
    # A source's model and the model its overrides select must agree.
    args = replicate.parse_args(["experiment=embedded", "distill.sources.gemma3.model=smollm2-135m",
                                 "baselines.decoding=false", "baselines.taskvec=false"])
    with pytest.raises(ValueError, match="name the same model"):
        replication_plan.plan_distill(args)


def test_transfer_targets_train_the_same_grid_and_are_checked_when_parsed():
    args = replicate.parse_args(["experiment=embedded", "grid.transfer_targets=[gemma3]", "grid.choose_on=every_target"])
    assert args.grid_targets == ["smollm2", "gemma3"]
    distilled = {("smollm2", 0.1): "/data/distilled"}
    grid = replication_plan.plan_grid(args, distilled)
    transfer = replication_plan.plan_grid(args, distilled, "gemma3")
    assert sorted(transfer) == ["gemma3-smollm2-a0.1-lr2e-4", "gemma3-smollm2-a0.1-lr5e-4"]
    for (config, mine), (other_config, other) in zip(grid.values(), transfer.values(), strict=True):
        # the same configuration and validation on the other model
        assert config == other_config and other.model.name_or_path == "gemma3-270m"
        assert other.output_dir.endswith("/grid/gemma3-" + Path(mine.output_dir).name.split("-", 1)[1])
        assert (other.trainer.learning_rate, other.trainer.max_steps, other.trainer.save_steps) == (
            mine.trainer.learning_rate, mine.trainer.max_steps, mine.trainer.save_steps)
        assert other.validation.prompts == mine.validation.prompts
        assert other.validation.callback == mine.validation.callback
    with pytest.raises(ValueError, match=r"`grid.transfer_targets` \['llama'\] are not keys of `targets`"):
        replicate.parse_args(["experiment=embedded", "grid.transfer_targets=[llama]"])
    with pytest.raises(ValueError, match="other targets than `grid.target`"):
        replicate.parse_args(["experiment=embedded", "grid.transfer_targets=[smollm2]"])
    with pytest.raises(ValueError, match="`grid.transfer_targets` is empty"):
        replicate.parse_args(["experiment=embedded", "grid.choose_on=every_target"])
    with pytest.raises(ValueError, match="`grid.choose_on` has to be one of .* but is 'both'"):
        replicate.parse_args(["experiment=embedded", "grid.choose_on=both"])


class FakePipeline:
    """A stage pipeline that records its runs: finished() when its output exists with the same settings."""

    calls: list = []

    @staticmethod
    def finished(args):
        from unidetox.run_dir import check_output_dir

        changed = check_output_dir(args.output_dir, args.config, incremental=args.incremental)
        report = Path(args.output_dir) / "report.json"
        return None if changed or not report.is_file() else json.loads(report.read_text())

    @staticmethod
    def run(args):
        FakePipeline.calls.append(list(args.config["models"]))
        out = Path(args.output_dir)
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text(json.dumps(args.config))
        (out / "report.json").write_text(json.dumps({"models": args.config["models"]}))
        return {"models": args.config["models"]}


def test_a_stage_made_with_another_config_is_an_error_unless_incremental(tmp_path):
    """A finished stage is skipped; another config fails loudly, except for a stage whose pipeline keeps its own
    per-unit cache (evaluate), which is rerun, e.g. when a baseline joins the test's model list."""
    from types import SimpleNamespace

    def stage_args(models, incremental=True):
        return SimpleNamespace(output_dir=str(tmp_path / "stage"), config={"models": models}, incremental=incremental)

    FakePipeline.calls = []
    stages = Stages(tmp_path)
    assert stages.run_pipeline_stage("test", FakePipeline, stage_args(["a"])) == {"models": ["a"]}
    assert stages.run_pipeline_stage("test", FakePipeline, stage_args(["a"])) == {"models": ["a"]}
    with pytest.raises(OutputDirConflict, match="other settings"):
        stages.run_pipeline_stage("test", FakePipeline, stage_args(["a", "b"], incremental=False))
    assert stages.run_pipeline_stage("test", FakePipeline, stage_args(["a", "b"])) == {"models": ["a", "b"]}
    assert FakePipeline.calls == [["a"], ["a", "b"]]
    assert [e["status"] for e in stages.session] == ["ran", "cached", "ran"]
    assert stages.result("test") == {"models": ["a", "b"]}


def test_validation_and_test_prompts_are_disjoint(shared_data):
    args = replicate.parse_args(["experiment=embedded", f"data_dir={shared_data}"])
    validation = replication_plan.validation_prompts(args)
    test = replication_plan.evaluate_on_test(args, ["m"], "/tmp/x", ["prompts.num_prompts=100"]).prompts
    info = replication_plan.assert_disjoint_prompts(validation, test)
    assert info == {"validation_prompts": 50, "test_prompts": 100}
    other_split = replication_plan.evaluate_on_test(args, ["m"], "/tmp/x", ["prompts.split_seed=1"]).prompts
    with pytest.raises(ValueError, match="split_seed"):
        replication_plan.assert_disjoint_prompts(validation, other_split)


def test_the_report_splits_changes_by_the_kinds_of_the_test_prompts(shared_data):
    args = replicate.parse_args(["experiment=embedded", f"data_dir={shared_data}"])
    config = replication_plan.prompts_for_test(args)
    assert config == replication_plan.evaluate_on_test(args, ["m"], "/tmp/x").prompts
    prompts = load_prompts(config)
    kinds = prompt_kinds(prompts)  # the annotated ToxiGen prompts are hateful or benign, each labelled
    assert set(kinds) == {p.id for p in prompts} and set(kinds.values()) == {"hate", "neutral"}


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------
STAGE_FILES = [
    *[f"distill-{s}-a0.1/{f}" for s in ("smollm2", "gemma3")
      for f in ("distill_run.json", "anti_expert/adapter_config.json")],
    "distill-smollm2-a0.2/distilled/metadata.json", "distill-gemma3-a0.2/distilled/metadata.json",
    *[f"grid/smollm2-{s}-a{a}-lr1e-3/detox_eval.jsonl" for s in ("smollm2", "gemma3") for a in ("0.1", "0.2")],
    "grid/smollm2-gemma3-a0.2-lr1e-3/train_summary.json", "selection.json",
    "data/control/metadata.json", "data/nothate/metadata.json", "apply/smollm2-unidetox/source.json",
    "apply/smollm2-unidetox/model/config.json", "apply/gemma3-unidetox/merged/config.json",
    *[f"apply/{t}-{m}/train_summary.json" for t in ("smollm2", "gemma3") for m in ("control", "nothate", "authors")],
    "taskvec/lam0.5/unidetox_task_vector.json", "taskvec/lam1/config.json", "taskvec/validation/report.json",
    "taskvec/selection.json", "test/report.json", "test/generations.jsonl", "test/decoding/report.json",
    *[f"test/models/{t}-{m}/report.json" for t in ("smollm2", "gemma3") for m in ("base", "unidetox", "authors")],
    "test/models/smollm2-taskvec/report.json", "report.json", "report.md", "toxicity_vs_perplexity.png", "replicate_log.jsonl",
]


def _tiny_replication(tmp_path, shared_data, *extra):
    """The replication command on two tiny local models (llama + gemma3 families) at experiment=tiny sizes."""
    llama_dir, gemma_dir = save_tiny_models(tmp_path)
    out = tmp_path / "rep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "UNIDETOX_DATA_DIR": str(shared_data)}
    return replication_command(out, llama_dir, gemma_dir, *extra), env, out


@pytest.fixture(scope="module")
def tiny_sequential_replication(tmp_path_factory):
    """The tiny replication run once by the default engine (every stage in turn in one process), shared by the
    tests that read it: ``(command, env, output_dir)``."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    cmd, env, out = _tiny_replication(tmp_path_factory.mktemp("sequential"), SHARED_DATA)
    proc = subprocesses.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=2400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return cmd, env, out


@pytest.mark.slow
@pytest.mark.integration
def test_tiny_replication_end_to_end_then_nothing_is_recomputed(tiny_sequential_replication):
    """Every stage of the replication (experiment=tiny sizes) on two tiny local models of different families and
    tokenizers, so that CI runs the whole pipeline in minutes; `experiment=tiny` alone runs the same plumbing on
    the embedded models (about 25 minutes on this CPU)."""
    cmd, env, out = tiny_sequential_replication
    _assert_tiny_report(out)
    first = [json.loads(line) for line in (out / "replicate_log.jsonl").read_text().splitlines()]
    assert all(e["status"] == "ran" for e in first), [e for e in first if e["status"] != "ran"]

    # Rerun: every stage is found finished; no file is rewritten.
    stamps = {f: (out / f).stat().st_mtime_ns for f in STAGE_FILES if f != "replicate_log.jsonl"}
    time.sleep(0.01)
    proc = subprocesses.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    second = [json.loads(line) for line in (out / "replicate_log.jsonl").read_text().splitlines()][len(first):]
    assert [e["stage"] for e in second] == [e["stage"] for e in first]
    assert all(e["status"] == "cached" for e in second), [e for e in second if e["status"] != "cached"]
    assert {f: (out / f).stat().st_mtime_ns for f in stamps} == stamps


@pytest.mark.slow
@pytest.mark.integration
def test_tiny_replication_as_concurrent_jobs_gives_the_sequential_report(tmp_path, tiny_sequential_replication):
    """launcher.engine=submitit through submitit's local executor, two jobs at once: every stage runs once, as a
    job of its own (what the driver does itself, the selection and the report, excepted), and the report is the
    sequential run's, number for number."""
    cmd, env, out = _tiny_replication(tmp_path, SHARED_DATA, "launcher.engine=submitit", "launcher.cluster=local",
                                      "launcher.max_concurrent_jobs=2", "launcher.threads_per_job=1")
    proc = subprocesses.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    _assert_tiny_report(out)
    log = [json.loads(line) for line in (out / "replicate_log.jsonl").read_text().splitlines()]
    assert all(e["status"] == "ran" for e in log), [e for e in log if e["status"] != "ran"]
    jobs = {e["stage"]: e["job_id"] for e in log if "job_id" in e}
    assert len(jobs) == len(log) - 2 and set(jobs) == {e["stage"] for e in log} - {"selection", "report"}
    assert len(set(jobs.values())) == len(jobs)
    assert all((out / "jobs" / f"{job_id}_0_log.err").is_file() for job_id in jobs.values())
    _, _, sequential = tiny_sequential_replication
    differing = differing_numbers(_comparable_report(out), _comparable_report(sequential))
    assert not differing, differing[:20]


@pytest.mark.slow
@pytest.mark.integration
def test_tiny_replication_with_a_transfer_target_draws_the_curve_and_chooses_on_both(tmp_path):
    """grid.transfer_targets=[gemma3]: every grid run is also trained and validated on the other family; the
    report draws the transfer curve, the declared variant chooses on both targets, and the other target's UniDetox
    model is its grid checkpoint (no second training). A rerun finds every stage finished."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    cmd, env, out = _tiny_replication(
        tmp_path, SHARED_DATA, "distill.alphas=[0.1]", "grid.transfer_targets=[gemma3]", "grid.choose_on=every_target",
        *[f"baselines.{b}=false" for b in ("control", "nothate", "authors", "decoding", "taskvec")])
    proc = subprocesses.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=2400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    selection = json.loads((out / "selection.json").read_text())
    curve, choice = selection["transfer_curve"], selection["choice"]
    assert len(curve) == 2 * 2 and all(set(r["per_target"]) == {"smollm2", "gemma3"} for r in curve)  # 2 sources x 2 saves
    assert sum(r["chosen"] for r in curve) == 1 and choice["rule"] == "every_target"
    assert selection["rule"]["choose_on"] == "every_target" and "paper_choice" in selection
    assert choice["worst_change"] == min(r["worst_change"] for r in curve if r["within_bound"]) or not any(
        r["within_bound"] for r in curve)
    source, step = choice["config"]["source"], choice["step"]
    gemma_run = out / "grid" / f"gemma3-{source}-a0.1-lr1e-3"
    assert (gemma_run / "detox_eval.jsonl").is_file()
    reused = json.loads((out / "apply" / "gemma3-unidetox" / "source.json").read_text())
    assert reused["checkpoint"] == str(gemma_run / f"checkpoint-{step}") and reused["step"] == step
    assert not (out / "apply" / "gemma3-unidetox" / "train_summary.json").exists()
    assert "## Transfer curve" in (out / "report.md").read_text() and (out / "transfer_curve.png").is_file()
    assert "declared variant" in (out / "chosen_recipe.yaml").read_text()
    first = (out / "replicate_log.jsonl").read_text().splitlines()
    proc = subprocesses.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    second = [json.loads(line) for line in (out / "replicate_log.jsonl").read_text().splitlines()[len(first):]]
    assert second and all(e["status"] == "cached" for e in second), [e for e in second if e["status"] != "cached"]


def _comparable_report(out: Path):
    """report.json without what legitimately differs between two runs: where they ran (paths are made relative to
    the run's temporary root), how long things took (``wall_time``, ``stage_times``, every ``*_s``), and the
    command and config that ran them. NaN (an interval over identical samples) reads as a string, equal to itself."""
    text = (out / "report.json").read_text().replace(str(out.parent), "<root>")
    report = json.loads(text, parse_constant=str)
    for key in ("command", "config"):
        report.pop(key, None)
    return without_timings(report)


def _assert_tiny_report(out):
    missing = [f for f in STAGE_FILES if not (out / f).exists()]
    assert not missing, missing
    report = json.loads((out / "report.json").read_text())
    rows = {(r["method"], r["target"]) for r in report["rows"]}
    assert rows == {*((m, t) for m in ("base", "unidetox", "control", "nothate", "authors")
                      for t in ("smollm2", "gemma3")), ("decoding", "smollm2"), ("taskvec", "smollm2")}
    for r in report["rows"]:
        assert r["toxicity_probability"]["n"] == 3 and r["expected_max_toxicity"]["n"] == 3
        assert (r["wikitext_perplexity"] is None) == (r["method"] == "decoding")
    assert report["bar"]["verdict"].startswith(("Bar MET", "Bar NOT met"))
    selection = json.loads((out / "selection.json").read_text())
    # (2 sources x 2 alphas) runs x 3 evals
    assert len(selection["table"]) == 12 and sum(r["chosen"] for r in selection["table"]) == 1
    assert {r["config"]["source"] for r in selection["table"]} == {"smollm2", "gemma3"}
    # each source's own anti-expert: the gemma3 text was contrasted with an anti-expert of the gemma3 model
    gemma_ae = json.loads((out / "distill-gemma3-a0.1" / "anti_expert" / "adapter_config.json").read_text())
    smol_ae = json.loads((out / "distill-smollm2-a0.1" / "anti_expert" / "adapter_config.json").read_text())
    assert gemma_ae["base_model_name_or_path"] != smol_ae["base_model_name_or_path"]
    assert set(report["source_study"]) >= {"distill-smollm2-a0.1", "distill-gemma3-a0.2", "control", "authors"}
    for r in report["rows"]:
        if r["method"] != "base":
            assert set(r["paired_vs_base"]) == {"toxicity_probability", "expected_max_toxicity"}, r["method"]
    assert set(report["unidetox_vs_control"]) == {"smollm2", "gemma3"}
    # the ToxiGen test prompts are labelled: every change is split by their kinds too
    for r in report["rows"]:
        if r["method"] != "base":
            assert r["paired_vs_base_by_kind"] and set(r["paired_vs_base_by_kind"]) <= {"hate", "neutral"}, r["method"]
    assert set(report["unidetox_vs_control_by_kind"]) == {"smollm2", "gemma3"}
    assert "## By prompt kind" in (out / "report.md").read_text()
    assert report["stage_times"] and "The distilled text of each source" in (out / "report.md").read_text()
    # The chosen configuration applied to the other target is the chosen checkpoint's: the grid's schedule (2 steps)
    # stopped at the chosen step.
    step = selection["choice"]["step"]
    applied = json.loads((out / "apply" / "gemma3-unidetox" / CONFIG_FILE).read_text())
    assert applied["trainer"]["max_steps"] == 2
    assert applied["trainer"].get("stop_at_step") == (step if step < 2 else None)
    summary = json.loads((out / "apply" / "gemma3-unidetox" / "train_summary.json").read_text())
    assert summary["train"]["global_step"] == step
    assert report["prompts"]["validation_prompts"] == 4 and report["prompts"]["test_prompts"] == 4
    md = (out / "report.md").read_text()
    assert "Validation grid" in md and "Task-vector lambda" in md and "Example continuations" in md
    return report

"""Recipes of `unidetox detox`: the replication's choice written as `chosen_recipe.yaml` and applied to another
model, the shipped `universal` preset as the default, and a user's own configs next to the shipped ones
(`--config-dir DIR`, `GROUP=FILE.yaml`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest
from tiny import tiny_llama, word_tokenizer

from unidetox.detox import pipeline as detox
from unidetox.hydra_config import CONF_DIR
from unidetox.replication import pipeline as replicate
from unidetox.replication import plan as replication_plan

# Where a run trains and logs: the only trainer settings that differ between two runs of one recipe.
RUN_PLACES = ("output_dir", "logging_dir")


def _trainer_settings(parsed: detox.DetoxArguments) -> dict:
    return {k: v for k, v in parsed.trainer.to_dict().items() if k not in RUN_PLACES}


def _write_tiny_choice(tmp_path: Path, step: int) -> tuple[replicate.ReplicateArguments, Path, Path]:
    """The tiny replication's arguments, its choice (lr 1e-3 at ``step``) written as the replication writes it,
    and the distilled text it names."""
    args = replicate.parse_args(["experiment=tiny", f"output_dir={tmp_path / 'rep'}"])
    distilled = tmp_path / "distilled.csv"
    datasets.Dataset.from_dict({"Text": ["a clean text", "another one"]}).to_csv(str(distilled), index=False)
    apply = replication_plan.apply_args(args, args.grid_target, distilled, tmp_path / "rep" / "apply" / "x", 1e-3, step,
                                 list(args.apply_overrides))
    choice = {"config": {"source": "smollm2", "alpha": 0.1, "learning_rate": 1e-3}, "step": step}
    path = replication_plan.write_chosen_recipe(tmp_path / "rep" / replication_plan.CHOSEN_RECIPE_FILE,
                                         replication_plan.chosen_recipe(apply), choice)
    return args, path, distilled


@pytest.mark.parametrize("step", [1, 2], ids=["mid-schedule", "last-step"])
def test_the_written_recipe_trains_another_model_as_the_replications_apply_step(tmp_path, step):
    args, recipe, distilled = _write_tiny_choice(tmp_path, step)
    other = args.targets["gemma3"]  # another family than the grid target the choice was made on
    expected = replication_plan.apply_args(args, other, distilled, tmp_path / "apply", 1e-3, step, list(args.apply_overrides))
    parsed = detox.parse_args([f"recipe={recipe}", f"model={other.model}", f"output_dir={tmp_path / 'mine'}"])
    assert parsed.model.name_or_path == other.model
    assert _trainer_settings(parsed) == _trainer_settings(expected)
    # the settings the choice is made of, spelled out (the default preset's stop_at_step must not leak in)
    assert (parsed.trainer.learning_rate, parsed.trainer.max_steps, parsed.trainer.stop_at_step) == (
        1e-3, args.grid.max_steps, step if step < args.grid.max_steps else None)
    assert parsed.peft == expected.peft and parsed.peft.r == 4
    assert parsed.data == expected.data and Path(parsed.data.path).is_absolute()
    # the command line still wins over the recipe, key by key
    edited = detox.parse_args([f"recipe={recipe}", "trainer.learning_rate=3e-4"])
    assert edited.trainer.learning_rate == 3e-4 and edited.trainer.max_length == parsed.trainer.max_length


@pytest.mark.slow
def test_the_written_recipe_runs_on_a_tiny_model_and_stops_at_the_chosen_step(tmp_path):
    _, recipe, _ = _write_tiny_choice(tmp_path, step=1)
    model = tmp_path / "tiny-model"
    tokenizer = word_tokenizer(padding_side="right")
    tiny_llama(len(tokenizer)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    result = detox.run(detox.parse_args([f"recipe={recipe}", f"model={model}", f"output_dir={tmp_path / 'out'}",
                                         "eval.enabled=false"]))
    assert result.global_step == 1  # stopped at the chosen step of the 2-step schedule


def test_the_default_is_the_replication_v2_choice_on_the_users_distilled_text(tmp_path):
    """The shipped `universal` preset equals the embedded replication's apply step at its v2 choice (lr 2e-4, step
    50 of the 100-step schedule; docs/results.md), applied to gemma3-270m; the data stays the user's own."""
    args = replicate.parse_args(["experiment=embedded", f"output_dir={tmp_path}"])
    gemma3 = args.targets["gemma3"]
    chosen = replication_plan.apply_args(args, gemma3, "/data/distilled", tmp_path / "a", 2e-4, 50, list(args.apply_overrides))
    default = detox.parse_args([f"model={gemma3.model}"])
    assert _trainer_settings(default) == _trainer_settings(chosen)
    assert default.peft == chosen.peft
    assert default.data.path == "runs/distill-default/distilled"
    shipped = detox.parse_args(["recipe=universal_smollm2", "model=gemma3-270m"])
    assert _trainer_settings(shipped) == _trainer_settings(default)
    assert shipped.data.path == "runs/replicate-embedded/distill-smollm2-a0.1/distilled"


def test_a_users_recipe_in_their_config_dir_is_found_next_to_the_shipped_ones(tmp_path):
    mine = tmp_path / "my_configs" / "recipe"
    mine.mkdir(parents=True)
    template = (CONF_DIR / "detox" / "trainer" / "universal.yaml").read_text()
    assert "learning_rate: 2.0e-4" in template
    (mine / "my_recipe.yaml").write_text(template.replace("learning_rate: 2.0e-4", "learning_rate: 1.0e-4"))
    for config_dir in (["--config-dir", str(tmp_path / "my_configs")], [f"--config-dir={tmp_path / 'my_configs'}"]):
        parsed = detox.parse_args([*config_dir, "recipe=my_recipe", "model=gemma3-270m"])
        assert parsed.trainer.learning_rate == 1e-4 and parsed.trainer.stop_at_step == 50
        assert parsed.model.name_or_path == "gemma3-270m"
    # a group of the shipped configs too: the user's model preset, found in their folder
    (tmp_path / "my_configs" / "model").mkdir()
    shutil.copy(CONF_DIR / "model" / "gemma3-270m.yaml", tmp_path / "my_configs" / "model" / "my_model.yaml")
    parsed = detox.parse_args(["--config-dir", str(tmp_path / "my_configs"), "model=my_model"])
    assert parsed.model.name_or_path == detox.parse_args(["model=gemma3-270m"]).model.name_or_path


def test_a_missing_config_dir_or_recipe_file_is_named_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir.*no such directory"):
        detox.parse_args(["--config-dir", str(tmp_path / "no-such-dir")])
    with pytest.raises(ValueError, match="needs a directory"):
        detox.parse_args(["--config-dir"])
    with pytest.raises(FileNotFoundError, match="recipe=.*missing.yaml: no such config file"):
        detox.parse_args([f"recipe={tmp_path / 'missing.yaml'}"])


def test_a_replication_target_on_the_default_preset_trains_its_grid_runs_to_the_end(tmp_path):
    """The default trainer preset stops at step 50; the replication's grid runs train their whole schedule, and the
    apply step stops where the choice was made."""
    args = replicate.parse_args(["experiment=tiny", f"output_dir={tmp_path}", "targets.smollm2.overrides=[]"])
    assert not args.grid_target.overrides  # the default trainer preset: `universal`
    for _, parsed in replication_plan.plan_grid(args, {("smollm2", 0.1): "/data/distilled"}).values():
        assert parsed.trainer.max_steps == args.grid.max_steps and parsed.trainer.stop_at_step is None
    applied = replication_plan.apply_args(args, args.grid_target, "/data/distilled", tmp_path / "a", 1e-3, 1, [])
    assert (applied.trainer.max_steps, applied.trainer.stop_at_step) == (args.grid.max_steps, 1)

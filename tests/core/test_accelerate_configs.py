"""recipes/accelerate_configs/{ddp,zero2,zero3}.yaml parse, build an Accelerator, and train under `accelerate launch`.

DeepSpeed 0.19 falls back to its CPU accelerator when there is no GPU, so ZeRO-2 and ZeRO-3 really run here
(one process, fp32): a tiny model trains through UniversalDetoxTrainer with DetoxEvalCallback (generation under
ZeRO-3's sharded parameters included), saves gathered weights, and loads back with `from_pretrained`.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import subprocesses

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "accelerate_configs"
ACCELERATE = Path(sys.executable).parent / "accelerate"


def load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(CONFIGS / f"{name}.yaml"))


def test_configs_parse_with_the_expected_topology():
    from accelerate.utils import DistributedType

    ddp, zero2, zero3 = load("ddp"), load("zero2"), load("zero3")
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.mixed_precision == "bf16"
    assert zero2.distributed_type == DistributedType.DEEPSPEED and zero2.deepspeed_config["zero_stage"] == 2
    assert zero3.distributed_type == DistributedType.DEEPSPEED and zero3.deepspeed_config["zero_stage"] == 3
    assert zero3.deepspeed_config["zero3_save_16bit_model"] is True  # gathered weights on save


ACCELERATOR_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    import logging
    logging.basicConfig(level=logging.WARNING)
    from unidetox.deepspeed_ops import prepare_deepspeed
    prepare_deepspeed()  # as unidetox's entry points do before DeepSpeed forms its process group
    from accelerate import Accelerator
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin
    ds = load_config_from_file(sys.argv[1]).deepspeed_config
    plugin = DeepSpeedPlugin(
        zero_stage=ds["zero_stage"], offload_optimizer_device=ds["offload_optimizer_device"],
        offload_param_device=ds["offload_param_device"], zero3_init_flag=ds["zero3_init_flag"],
        zero3_save_16bit_model=ds.get("zero3_save_16bit_model", False),
    )
    accelerator = Accelerator(deepspeed_plugin=plugin)
    info = {
        "distributed_type": str(accelerator.state.distributed_type),
        "zero_stage": accelerator.state.deepspeed_plugin.zero_stage,
        "ds_config_stage": plugin.deepspeed_config["zero_optimization"]["stage"],
    }
    # The HF handshake: TrainingArguments given the same DeepSpeed config builds its own DeepSpeed plugin.
    from unidetox.detox.config import UniversalDetoxConfig
    ds_config = {**plugin.deepspeed_config, "bf16": {"enabled": "auto"}}
    args = UniversalDetoxConfig(output_dir=sys.argv[3], max_steps=2, save_steps=1, deepspeed=ds_config)
    info["args_distributed_type"] = str(args.distributed_state.distributed_type)
    info["args_zero_stage"] = args.hf_deepspeed_config.config["zero_optimization"]["stage"]
    info["args_micro_batch"] = args.hf_deepspeed_config.config["train_micro_batch_size_per_gpu"]
    print(json.dumps(info))
    """
)


def _env(tmp_path) -> dict:
    # A torch extension folder of the test's own: what DeepSpeed would compile shows up there (and none may), and
    # no build lock from elsewhere reaches the test.
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"), "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _compiled_ops(tmp_path) -> list[str]:
    return sorted(p.parent.name for p in (tmp_path / "torch_extensions").glob("*/*.so"))


def _build_accelerator(tmp_path, name):
    script = tmp_path / "build.py"
    script.write_text(ACCELERATOR_SCRIPT)
    # A generous bound for a busy machine (a quiet one takes well under a minute); never a hang.
    return subprocesses.run(
        [sys.executable, str(script), str(CONFIGS / f"{name}.yaml"), str(subprocesses.free_port()), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=900, cwd=REPO, env=_env(tmp_path),
    )


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_build_an_accelerator(tmp_path, name, stage):
    pytest.importorskip("deepspeed")
    proc = _build_accelerator(tmp_path, name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _compiled_ops(tmp_path) == []  # one process needs no DeepSpeed op compiled
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["distributed_type"] == "DistributedType.DEEPSPEED"
    assert info["zero_stage"] == stage == info["ds_config_stage"]
    assert info["args_distributed_type"] == "DistributedType.DEEPSPEED"
    assert info["args_zero_stage"] == stage
    assert info["args_micro_batch"] == 8  # "auto" filled from per_device_train_batch_size (the paper's 8)


def test_a_stale_deepspeed_build_lock_is_removed_not_waited_on(tmp_path):
    # What a build killed half way leaves: the op's lock file, which torch's FileBaton would wait on forever.
    pytest.importorskip("deepspeed")
    from unidetox.deepspeed_ops import SHM_COMM_OP

    lock = tmp_path / "torch_extensions" / SHM_COMM_OP / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    proc = _build_accelerator(tmp_path, "zero2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not lock.exists() and f"Removed the stale build lock {lock}" in proc.stderr


TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    import datasets, torch
    from accelerate import PartialState
    from tiny import CORPUS, tiny_llama, word_tokenizer
    from unidetox.detox.callbacks import DetoxEvalCallback, DetoxEvalConfig
    from unidetox.processes import end_process_group
    from unidetox.detox.config import UniversalDetoxConfig
    from unidetox.detox.trainer import UniversalDetoxTrainer

    out = sys.argv[1]
    tok = word_tokenizer(padding_side="right")
    model = tiny_llama(len(tok)).train()
    args = UniversalDetoxConfig(output_dir=out, max_steps=6, save_steps=3, learning_rate=1e-2,
                                per_device_train_batch_size=4, logging_steps=1, gradient_checkpointing=False,
                                disable_tqdm=True)
    callback = DetoxEvalCallback(["the cat sat on", "we should"], perplexity_texts=" ".join(CORPUS),
                                 config=DetoxEvalConfig(num_samples=2, max_new_tokens=4, ppl_max_length=16))
    trainer = UniversalDetoxTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({{"text": CORPUS}}),
                                    processing_class=tok, callbacks=[callback])
    trainer.train()
    trainer.save_model()
    state = PartialState()
    if state.is_main_process:
        print(json.dumps({{
            "deepspeed": trainer.is_deepspeed_enabled,
            "zero_stage": args.deepspeed_plugin.zero_stage if args.deepspeed_plugin else None,
            "num_processes": state.num_processes,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        }}))
    end_process_group()
    """
)


def _launch(tmp_path, *launch_args, launcher="accelerate"):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT.format(tests=str(REPO / "tests")))
    out = tmp_path / "out"
    env = _env(tmp_path)
    if launcher == "accelerate":
        cmd = [str(ACCELERATE), "launch", *launch_args, "--main_process_port", str(subprocesses.free_port()), str(script), str(out)]
    else:
        env["ACCELERATE_USE_CPU"] = "true"  # what `accelerate launch --cpu` sets: DDP over gloo
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch_args, f"--master_port={subprocesses.free_port()}",
               str(script), str(out)]
    # The training process is a child of the launcher: the timeout ends both (a bound for a busy machine).
    proc = subprocesses.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert _compiled_ops(tmp_path) == []
    info = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    return info, out


def _check_run(info, out):
    from transformers import AutoModelForCausalLM

    losses = info["losses"]
    assert len(losses) == 6 and min(losses[-2:]) < losses[0]
    assert (out / "checkpoint-3").is_dir() and (out / "checkpoint-6").is_dir()
    steps = [json.loads(line)["step"] for line in (out / "detox_eval.jsonl").read_text().splitlines()]
    assert steps == [0, 3, 6]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0 and "UniDetox" in (out / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_training_under_accelerate_launch(tmp_path, name, stage):
    pytest.importorskip("deepspeed")
    info, out = _launch(tmp_path, "--config_file", str(CONFIGS / f"{name}.yaml"), "--num_processes", "1",
                        "--mixed_precision", "no")
    assert info["deepspeed"] is True and info["zero_stage"] == stage
    _check_run(info, out)


@pytest.mark.slow
def test_data_parallel_training_over_two_cpu_processes(tmp_path):
    # ddp.yaml is a GPU topology (accelerate runs one process per GPU); the same data-parallel path runs here as
    # two CPU processes over gloo, with the callback's generation and perplexity sharded and gathered.
    info, out = _launch(tmp_path, "--nproc_per_node=2", launcher="torchrun")
    assert info["num_processes"] == 2 and info["deepspeed"] is False
    _check_run(info, out)

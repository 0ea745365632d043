"""One run per output directory: a second run on a held directory is refused naming the holder, the lock of a run
that died is taken over (and said), a run inside a run of the same process (a replication's stages) does not wait on
itself, a stage run as a submitit job holds its own directory, and the processes of one launch never refuse each
other."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import pytest
import subprocesses
from tiny import quick_detox_overrides

from unidetox import run_dir
from unidetox.detox import pipeline as detox
from unidetox.distill import pipeline as distill
from unidetox.evaluation import pipeline as evaluate
from unidetox.replication import pipeline as replicate
from unidetox.replication.launcher import LauncherArguments
from unidetox.replication.stages import Stages
from unidetox.run_dir import LOCK_FILE, OutputDirBusy, holds_output_dir, output_dir_lock

READY = "READY"


def _start(code: str) -> subprocess.Popen:
    """A Python child that prints READY once it holds what ``code`` takes, then waits to be killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    child = subprocesses.popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    said = []
    for line in child.stdout:  # libraries may print first
        said.append(line)
        if line.strip() == READY:
            return child
    child.wait()
    pytest.fail(f"the holding child did not start (exit {child.returncode}, said {''.join(said)!r})")


@pytest.fixture
def children():
    started: list[subprocess.Popen] = []
    yield lambda code: started.append(_start(code)) or started[-1]
    for child in started:  # no process is left behind
        subprocesses.end_group(child, grace_s=0.0)
        child.wait()
        child.stdout.close()


def _holding(path: Path) -> str:
    return (f"from unidetox.run_dir import output_dir_lock\nimport time\n"
            f"with output_dir_lock({str(path)!r}):\n    print({READY!r}, flush=True)\n    time.sleep(600)\n")


def test_a_second_detox_run_on_a_directory_in_training_is_refused_naming_the_first(tmp_path, children):
    out = tmp_path / "out"
    overrides = quick_detox_overrides(tmp_path, out)
    # The first run stops inside training (as if at checkpoint-100) and stays there.
    first = children(
        "import sys, time\nfrom unidetox.detox import pipeline, trainer\n"
        f"def train(self, **kwargs):\n    print({READY!r}, flush=True)\n    time.sleep(600)\n"
        "trainer.UniversalDetoxTrainer.train = train\n"
        f"pipeline.run(pipeline.parse_args({overrides!r}))\n")
    with pytest.raises(OutputDirBusy, match=rf"pid {first.pid} on host {socket.gethostname()}"):
        detox.run(detox.parse_args(overrides))
    assert not list(out.glob("checkpoint-*"))  # the second run wrote nothing


def test_every_stage_refuses_a_held_directory(tmp_path, children):
    out = tmp_path / "held"
    holder = children(_holding(out))
    stage_args = [
        distill.parse_args([f"output_dir={out}", f"model={tmp_path / 'no-model'}"]),
        evaluate.parse_args([f"output_dir={out}", "models=[no-model]"]),
        replicate.parse_args(["experiment=tiny", f"output_dir={out}"]),
    ]
    for stage, args in zip((distill, evaluate, replicate), stage_args, strict=True):
        with pytest.raises(OutputDirBusy, match=f"pid {holder.pid}"):
            stage.run(args)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # refused before writing anything


def test_the_lock_of_a_killed_run_is_taken_over_and_said(tmp_path, children, caplog):
    out = tmp_path / "run"
    holder = children(_holding(out))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    caplog.set_level(logging.WARNING, logger="unidetox.run_dir")
    with output_dir_lock(out) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert [r.getMessage() for r in caplog.records if f"pid {holder.pid}" in r.getMessage()]
    assert (out / LOCK_FILE).read_text() == ""  # released cleanly: the next run has nothing to take over
    caplog.clear()
    with output_dir_lock(out):
        pass
    assert not caplog.records


def test_a_run_inside_a_run_of_this_process_does_not_wait_on_itself(tmp_path, children):
    out = tmp_path / "rep"
    with output_dir_lock(out):
        with output_dir_lock(str(out) + "/"), output_dir_lock(out / "grid" / "stage"):
            assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert (out / LOCK_FILE).read_text() != ""  # the outer run still holds it
    assert (out / LOCK_FILE).read_text() == "" and (out / "grid" / "stage" / LOCK_FILE).read_text() == ""
    children(_holding(out))  # and another process can take it now


def test_only_the_main_process_locks_and_a_refusal_reaches_every_process(tmp_path, children, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(run_dir, "rank_and_world_size", lambda: (1, 2))
    monkeypatch.setattr(run_dir, "is_main_process", lambda: False)
    holder = children(_holding(out))
    monkeypatch.setattr(run_dir, "gather_objects", lambda items: [None, *items])
    with run_dir.run_lock(out):  # rank 1 of a launch whose main process holds the lock: never refused by it
        pass
    refusal = f"{out} is in use by another run (pid {holder.pid} ...)"
    monkeypatch.setattr(run_dir, "gather_objects", lambda items: [refusal, *items])
    with pytest.raises(OutputDirBusy, match=f"pid {holder.pid}"), run_dir.run_lock(out):
        pytest.fail("a rank went on although its main process was refused")


def _launch_two_ranks(out: Path, report: Path, port: int) -> list[dict]:
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocesses.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(port),
                             str(Path(__file__).parents[1] / "scripts" / "run_lock_ranks.py"), str(out), str(report)],
                            capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(Path(f"{report}.{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_the_ranks_of_one_launch_share_the_lock_and_share_a_refusal(tmp_path, children):
    out = tmp_path / "run"
    assert _launch_two_ranks(out, tmp_path / "free", subprocesses.free_port()) == [{"world": 2, "outcome": "held"}] * 2
    holder = children(_holding(out))
    refused = _launch_two_ranks(out, tmp_path / "held", subprocesses.free_port())
    assert all(r["world"] == 2 and f"pid {holder.pid}" in r["outcome"] for r in refused), refused


def _report_lock_holder(args):
    record = json.loads((Path(args.output_dir) / LOCK_FILE).read_text())
    return {"holder": record["pid"], "pid": os.getpid()}


@pytest.fixture
def this_module_by_value():
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_stage_run_as_a_job_holds_its_own_directory(tmp_path, this_module_by_value):
    out = tmp_path / "rep"
    stage = SimpleNamespace(run=holds_output_dir(_report_lock_holder), finished=lambda args: None)
    args = SimpleNamespace(output_dir=str(out / "stage"), config={})
    with output_dir_lock(out), Stages(out, launcher=LauncherArguments(engine="submitit", cluster="local")) as stages:
        stages.run_pipeline_stage("stage", stage, args)
        result = stages.result("stage")
    assert result["holder"] == result["pid"] != os.getpid()
    assert (out / "stage" / LOCK_FILE).read_text() == ""

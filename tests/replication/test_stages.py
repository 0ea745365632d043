"""The replication's stages as submitit jobs (unidetox.replication.stages, unidetox.replication.launcher): fake
pipelines (``run(args)`` / ``finished(args)``) through submitit's local executor: the concurrency limit, finished
stages never submitted, results and run times coming back, a failing job named with its stderr, the other jobs
cancelled and the interrupted stage resumed, the jobs cancelled when the driver is stopped (SIGTERM, an exception),
a job left running by a killed driver refused until it ends; and the launcher's config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import pytest
import subprocesses

from unidetox.hydra_config import compose_config, parse_dataclass
from unidetox.replication import launcher as launcher_module
from unidetox.replication import pipeline as replicate
from unidetox.replication.launcher import LauncherArguments, StageJobFailed
from unidetox.replication.stages import Stages


@pytest.fixture(autouse=True)
def jobs_unpickle_without_the_package():
    """The job wrapper and these fake pipelines travel by value, so a job starts without importing unidetox (and
    torch): seconds instead of half a minute per job on a busy CPU. Real stages import their pipeline anyway."""
    for module in (launcher_module, sys.modules[__name__]):
        cloudpickle.register_pickle_by_value(module)
    yield
    for module in (launcher_module, sys.modules[__name__]):
        cloudpickle.unregister_pickle_by_value(module)


def _stages(tmp_path, **launcher) -> Stages:
    return Stages(tmp_path / "rep", launcher=LauncherArguments(engine="submitit", cluster="local", **launcher))


def _args(tmp_path, name, **config):
    return SimpleNamespace(output_dir=str(tmp_path / "rep" / name), config={"name": name, **config})


def _finished(args):
    report = Path(args.output_dir) / "report.json"
    return json.loads(report.read_text()) if report.is_file() else None


def _sleep_and_report(args):
    """Sleeps, then reports when and where it ran (its process, its GPUs, its threads)."""
    start = time.time()
    time.sleep(args.config.get("seconds", 0.0))
    report = {"name": args.config["name"], "start": start, "end": time.time(), "pid": os.getpid(),
              "devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "omp": os.environ.get("OMP_NUM_THREADS")}
    if "torch" in sys.modules:
        report["torch_threads"] = sys.modules["torch"].get_num_threads()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report))
    return report


SLEEPER = SimpleNamespace(run=_sleep_and_report, finished=_finished)


def _sleep_once_two_started_and_report(args):
    """Marks its start and waits until a second job has marked its own (or the wait's bound) before it sleeps and
    reports: the first two jobs overlap however long each takes to start on a busy machine, as a driver running two
    at once lets them."""
    starts = Path(args.config["starts"])
    starts.mkdir(parents=True, exist_ok=True)
    (starts / str(os.getpid())).touch()
    _wait_until(lambda: len(list(starts.iterdir())) >= 2)
    return _sleep_and_report(args)


def _max_overlap(intervals) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_jobs_run_at_most_the_limit_at_once_and_finished_stages_are_not_submitted(tmp_path):
    stages = _stages(tmp_path, max_concurrent_jobs=2, gpus_per_node=1)
    _sleep_and_report(_args(tmp_path, "grid/done"))  # a stage finished earlier
    assert stages.run_pipeline_stage("grid/done", SLEEPER, _args(tmp_path, "grid/done"))["name"] == "grid/done"
    names = [f"grid/run{i}" for i in range(3)]
    together = SimpleNamespace(run=_sleep_once_two_started_and_report, finished=_finished)
    for name in names:
        args = _args(tmp_path, name, seconds=1.5, starts=str(tmp_path / "starts"))
        assert stages.run_pipeline_stage(name, together, args) is None  # submitted
    reports = {name: stages.result(name) for name in names}

    assert [r["name"] for r in reports.values()] == names and all(r["pid"] != os.getpid() for r in reports.values())
    assert _max_overlap([(r["start"], r["end"]) for r in reports.values()]) == 2
    # Each running job has a GPU of its own.
    for a in reports.values():
        assert a["devices"] in ("0", "1")
        for b in reports.values():
            if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["devices"] != b["devices"]
    log = [json.loads(line) for line in (tmp_path / "rep" / "replicate_log.jsonl").read_text().splitlines()]
    # The first two end about together, in either order.
    assert (log[0]["stage"], log[0]["status"]) == ("grid/done", "cached")
    assert sorted((e["stage"], e["status"]) for e in log[1:]) == [(n, "ran") for n in names]
    assert "job_id" not in log[0] and all(e["wall_time_s"] >= 1.5 and e["job_id"] for e in log[1:])
    submitted = sorted(p.name for p in (tmp_path / "rep" / "jobs").glob("*_submitted.pkl"))
    assert submitted == sorted(f"{e['job_id']}_submitted.pkl" for e in log[1:])  # the finished one never was
    # Once finished, a stage is found again without a job.
    assert stages.run_pipeline_stage("grid/run0", SLEEPER, _args(tmp_path, "grid/run0", seconds=1.5)) == reports["grid/run0"]
    assert stages.session[-1]["status"] == "cached"


def _report_once_another_stage_reported(args):
    """Reports only once the stage in ``args.config["until"]`` has written its report (or after the wait's bound)."""
    _wait_until(lambda: (Path(args.config["until"]) / "report.json").is_file())
    return _sleep_and_report(args)


def test_a_full_driver_submits_the_next_stage_when_any_job_ends_not_only_the_oldest(tmp_path):
    stages = _stages(tmp_path, max_concurrent_jobs=2)
    # The long job runs until the next one has run: a driver that waited for the oldest job would start the next
    # only after the long one's bound, which no job start-up on a busy machine reaches.
    long = SimpleNamespace(run=_report_once_another_stage_reported, finished=_finished)
    stages.run_pipeline_stage("grid/long", long, _args(tmp_path, "grid/long", until=str(tmp_path / "rep" / "grid/next")))
    stages.run_pipeline_stage("grid/short", SLEEPER, _args(tmp_path, "grid/short", seconds=0.5))
    stages.run_pipeline_stage("grid/next", SLEEPER, _args(tmp_path, "grid/next", seconds=0.5))  # waits for a free slot
    long, short, after = (stages.result(f"grid/{n}") for n in ("long", "short", "next"))
    assert short["end"] <= after["start"] < long["end"]  # it took the short job's slot while the long one ran


def _resumable_run(args):
    """Three parts, each written once: a rerun goes on from the parts it finds; after part 0 it says so (the
    `started` file) and waits while the `hold` file exists."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pid").write_text(str(os.getpid()))
    found = [part for part in range(3) if (out / f"part-{part}").is_file()]
    for part in range(3):
        if part not in found:
            (out / f"part-{part}").write_text(str(part))
        if part == 0:
            Path(args.config["started"]).touch()
        while part == 0 and Path(args.config["hold"]).exists():
            time.sleep(0.1)
    report = {"resumed_from": found}
    (out / "report.json").write_text(json.dumps(report))
    return report


def _failing_run(args):
    while not Path(args.config["after"]).is_file():  # fail only once the other stage is half done
        time.sleep(0.1)
    print("the fake stage broke", file=sys.stderr, flush=True)
    raise ValueError("boom")


def test_a_failing_job_raises_with_its_stderr_cancels_the_others_and_the_interrupted_stage_resumes(tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    resumable = SimpleNamespace(run=_resumable_run, finished=_finished)
    started = tmp_path / "started"
    slow_args = _args(tmp_path, "grid/slow", hold=str(hold), started=str(started))
    stages = _stages(tmp_path, max_concurrent_jobs=2)
    stages.run_pipeline_stage("grid/slow", resumable, slow_args)
    slow_dir = Path(slow_args.output_dir)
    stages.run_pipeline_stage("grid/bad", SimpleNamespace(run=_failing_run, finished=_finished),
                    _args(tmp_path, "grid/bad", after=str(started)))
    with pytest.raises(StageJobFailed) as err:
        stages.result("grid/bad")
    message = str(err.value)
    assert "'grid/bad'" in message and err.value.job_id in message
    assert "the fake stage broke" in message and "ValueError: boom" in message
    stderr_log = tmp_path / "rep" / "jobs" / f"{err.value.job_id}_0_log.err"
    assert str(stderr_log) in message and stderr_log.is_file()

    # The other job was cancelled half way: part 0 written, the rest not.
    pid = int((slow_dir / "pid").read_text())
    assert _wait_until(lambda: not Path(f"/proc/{pid}").exists()), "the cancelled job still runs"
    assert (slow_dir / "part-0").is_file() and not (slow_dir / "part-1").exists()
    part0 = (slow_dir / "part-0").stat().st_mtime_ns

    # The rerun submits the unfinished stage again; it resumes from its own part.
    hold.unlink()
    again = _stages(tmp_path, max_concurrent_jobs=2)
    again.run_pipeline_stage("grid/slow", resumable, slow_args)
    assert again.result("grid/slow") == {"resumed_from": [0]}
    assert (slow_dir / "part-0").stat().st_mtime_ns == part0 and (slow_dir / "part-2").is_file()


DRIVER = """
import sys, time
from pathlib import Path
from types import SimpleNamespace

import cloudpickle

sys.path[:0] = [{here!r}, {tests!r}]  # this module, and the helpers it imports
import test_stages

cloudpickle.register_pickle_by_value(test_stages)  # the job then starts without importing torch
from unidetox.replication.launcher import LauncherArguments
from unidetox.replication.stages import Stages

args = SimpleNamespace(output_dir={stage_dir!r}, config={config!r})
with Stages(Path({rep!r}), launcher=LauncherArguments(engine="submitit", cluster="local")) as stages:
    stages.run_pipeline_stage("grid/slow", SimpleNamespace(run=test_stages._resumable_run, finished=test_stages._finished), args)
    stages.result("grid/slow")
"""


# Each wait below follows an event (a marker written, a process gone) and returns as soon as it happens or the
# process it waits on has ended; the deadline only bounds a hang. A job process pays its imports before it can
# write anything: half a minute on a quiet machine, minutes on a busy one, so no deadline is tuned to a quiet one.
WAIT_DEADLINE_S = 600.0


def _wait_until(check, gave_up=lambda: False, seconds: float = WAIT_DEADLINE_S) -> bool:
    """Polls ``check`` until it holds (True), ``gave_up`` holds or ``seconds`` pass (then whether ``check`` holds)."""
    deadline = time.time() + seconds
    while time.time() < deadline and not gave_up():
        if check():
            return True
        time.sleep(0.1)
    return check()


@contextmanager
def _driver_with_a_held_job(tmp_path, ignore_sigint: bool = False):
    """A driver process (``DRIVER``) whose one job, ``grid/slow``, has written part 0 and waits while the ``hold``
    file exists: yields the driver, the stage's args, the job's pid and the driver's stderr file. Whatever is left
    running at the end is killed, and the hold released."""
    hold, started = tmp_path / "hold", tmp_path / "started"
    hold.touch()
    slow_args = _args(tmp_path, "grid/slow", hold=str(hold), started=str(started))
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(here=str(Path(__file__).parent), tests=str(Path(__file__).parents[1]),
                                    stage_dir=slow_args.output_dir, config=slow_args.config,
                                    rep=str(tmp_path / "rep")))
    stderr = tmp_path / "driver.err"  # a file, not a pipe: a job that outlived the driver would hold a pipe open
    # As a driver started with `&` from a non-interactive shell: SIGINT ignored, and inherited so by its jobs.
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    with stderr.open("w") as err:
        driver = subprocesses.popen([sys.executable, str(script)], stderr=err, preexec_fn=ignore)
    job_pid = None
    try:
        assert _wait_until(started.is_file, gave_up=lambda: driver.poll() is not None), (
            f"the job never started; the driver exited with {driver.poll()}: {stderr.read_text()[-3000:]}")
        job_pid = int((Path(slow_args.output_dir) / "pid").read_text())
        yield driver, slow_args, job_pid, stderr
    finally:
        subprocesses.end_group(driver, grace_s=0.0)  # the driver and the jobs it started (they share its group)
        if job_pid is not None and Path(f"/proc/{job_pid}").exists():
            os.kill(job_pid, signal.SIGKILL)
        hold.unlink()


@pytest.mark.parametrize("ignore_sigint", [False, True], ids=["foreground", "started_in_the_background"])
def test_a_sigterm_to_the_driver_cancels_its_jobs_and_the_stage_resumes(tmp_path, ignore_sigint):
    with _driver_with_a_held_job(tmp_path, ignore_sigint) as (driver, slow_args, job_pid, stderr):
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=WAIT_DEADLINE_S) == 128 + signal.SIGTERM, stderr.read_text()
        assert "cancelling job" in stderr.read_text()
        # The job went with its driver, half way: part 0 written, the rest not, although it was held.
        assert _wait_until(lambda: not Path(f"/proc/{job_pid}").exists()), "the job outlived its driver"
        slow_dir = Path(slow_args.output_dir)
        assert (slow_dir / "part-0").is_file() and not (slow_dir / "part-1").exists()

    with _stages(tmp_path) as again:
        again.run_pipeline_stage("grid/slow", SimpleNamespace(run=_resumable_run, finished=_finished), slow_args)
        assert again.result("grid/slow") == {"resumed_from": [0]}


def test_a_job_left_running_by_a_killed_driver_is_refused_until_it_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher_module, "LEFTOVER_GRACE_S", 1.0)
    record = tmp_path / "rep" / "jobs" / "running.json"
    with _driver_with_a_held_job(tmp_path) as (driver, slow_args, job_pid, _):
        driver.kill()  # SIGKILL: nothing cancels the job
        driver.wait(timeout=WAIT_DEADLINE_S)
        job_id = json.loads(record.read_text())["grid/slow"]["job_id"]
        with pytest.raises(launcher_module.LeftoverJobRunning) as err:
            _stages(tmp_path)
        message = str(err.value)
        assert "'grid/slow'" in message and f"kill -INT {job_id}" in message
        assert slow_args.output_dir in message and str(record) in message
        os.kill(int(job_id), signal.SIGINT)  # what the message says to do
        assert _wait_until(lambda: not Path(f"/proc/{job_pid}").exists()), "the job outlived the SIGINT"

    # Once it has ended, the next driver forgets it and the stage resumes from its own part.
    stages = _stages(tmp_path)
    assert not record.exists()
    stages.run_pipeline_stage("grid/slow", SimpleNamespace(run=_resumable_run, finished=_finished), slow_args)
    assert json.loads(record.read_text())["grid/slow"]["stage_dir"] == str(Path(slow_args.output_dir).absolute())
    assert stages.result("grid/slow") == {"resumed_from": [0]}
    assert not record.exists()  # collected: nobody needs to look for it


def test_leaving_the_stages_block_by_an_exception_cancels_the_running_jobs(tmp_path):
    hold, started = tmp_path / "hold", tmp_path / "started"
    hold.touch()
    slow_args = _args(tmp_path, "grid/slow", hold=str(hold), started=str(started))
    try:
        with pytest.raises(RuntimeError, match="the driver broke"):
            with _stages(tmp_path) as stages:
                stages.run_pipeline_stage("grid/slow", SimpleNamespace(run=_resumable_run, finished=_finished), slow_args)
                assert _wait_until(started.is_file, gave_up=lambda: not stages.running("grid/slow")), (
                    "the job never started" + ("" if stages.running("grid/slow") else ": it ended first"))
                raise RuntimeError("the driver broke")
        job_pid = int((Path(slow_args.output_dir) / "pid").read_text())
        assert _wait_until(lambda: not Path(f"/proc/{job_pid}").exists()), "the job outlived the block"
        assert not (Path(slow_args.output_dir) / "part-1").exists() and stages.session == []
    finally:
        hold.unlink()  # a job that was not cancelled finishes instead of waiting forever


def _write_model(model_dir: Path):
    time.sleep(1.0)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text('{"made": true}')
    return {"model": str(model_dir)}


def _read_model(args):
    model = Path(args.config["models"][0]) / "config.json"
    return json.loads(model.read_text())  # fails when started before the model exists


def test_a_stage_reading_a_running_stage_directory_waits_for_it(tmp_path):
    stages = _stages(tmp_path, max_concurrent_jobs=2)
    model_dir = tmp_path / "rep" / "apply" / "x" / "model"
    stages.run_function_stage("apply/x", lambda: None, lambda: _write_model(model_dir), model_dir.parent)
    reader = SimpleNamespace(run=_read_model, finished=lambda args: None)
    stages.run_pipeline_stage("test/x", reader, _args(tmp_path, "test/x", models=[str(model_dir)]))
    assert stages.result("test/x") == {"made": True}
    assert [e["stage"] for e in stages.session] == ["apply/x", "test/x"]


def test_run_when_ready_works_on_what_is_ready_first(tmp_path):
    stages = _stages(tmp_path, max_concurrent_jobs=2)
    stages.run_pipeline_stage("apply/slow", SLEEPER, _args(tmp_path, "apply/slow", seconds=3.0))
    order = []
    stages.run_when_ready([(["apply/slow"], lambda: order.append(("slow", stages.result("apply/slow")["name"]))),
                           (["data/unidetox"], lambda: order.append(("ready", None))),
                           ([], lambda: order.append(("needs nothing", stages.running("apply/slow"))))])
    # A job that needs no stage runs at once, while the slow stage still runs.
    assert order == [("ready", None), ("needs nothing", True), ("slow", "apply/slow")]


def test_the_debug_cluster_runs_each_job_in_this_process_with_its_threads(tmp_path):
    import torch

    threads = torch.get_num_threads()
    stages = Stages(tmp_path / "rep", launcher=LauncherArguments(engine="submitit", cluster="debug",
                                                                 threads_per_job=1))
    try:
        assert stages.run_pipeline_stage("grid/a", SLEEPER, _args(tmp_path, "grid/a")) is None
        report = stages.result("grid/a")
    finally:
        torch.set_num_threads(threads)
    assert report["pid"] == os.getpid() and (report["omp"], report["torch_threads"]) == ("1", 1)
    assert stages.session[-1]["status"] == "ran" and stages.session[-1]["job_id"].startswith("DEBUG_")


def test_the_launcher_section_composes_and_bad_values_are_named():
    cfg = compose_config("replicate", ["launcher.engine=submitit", "launcher.cluster=slurm", "launcher.partition=gpu",
                                       "launcher.gpus_per_node=1", "launcher.timeout_min=600",
                                       "+launcher.additional_parameters.account=proj"])
    parsed = parse_dataclass(cfg.launcher, LauncherArguments, name="launcher")
    assert parsed.uses_jobs and (parsed.cluster, parsed.partition, parsed.gpus_per_node) == ("slurm", "gpu", 1)
    assert parsed.additional_parameters == {"account": "proj"} and parsed.folder is None
    assert not parse_dataclass(compose_config("replicate").launcher, LauncherArguments).uses_jobs  # the default
    for bad, match in [({"engine": "ray"}, "'ray'"), ({"cluster": "kube"}, "'kube'"),
                       ({"max_concurrent_jobs": 0}, "max_concurrent_jobs.*0"), ({"threads_per_job": 0}, "threads"),
                       ({"gpus_per_node": -1}, "-1"), ({"mem_gb": 0.0}, "mem_gb"), ({"timeout_min": 0}, "timeout")]:
        with pytest.raises(ValueError, match=match):
            LauncherArguments(**bad)


@pytest.mark.parametrize("override", ["share_stages=true", "+share_stages=true"])
def test_share_stages_names_its_replacement(override):
    with pytest.raises(ValueError, match="launcher.engine=submitit launcher.cluster=local"):
        replicate.parse_args(["experiment=tiny", override])


@dataclasses.dataclass
class _PushingArgs:
    output_dir: str
    config: dict
    hub_token: str | None = None


def _report_secret_digests(args):
    """Reports digests of the secrets the job received (a job's result is pickled to disk too)."""
    def digest(value):
        return hashlib.sha256(value.encode()).hexdigest()

    return {"hub_token": digest(args.hub_token), "api_key": digest(args.config["scorer"]["api_key"])}


def test_a_jobs_pickle_holds_no_secret_and_the_job_still_gets_it(tmp_path):
    token, api_key = "hf_notARealTokenButSecret0123", "perspective-key-0123456789"
    args = _PushingArgs(str(tmp_path / "rep" / "detox"), {"scorer": {"name": "perspective", "api_key": api_key}}, token)
    stages = _stages(tmp_path)
    pipeline = SimpleNamespace(run=_report_secret_digests, finished=lambda args: None)
    assert stages.run_pipeline_stage("detox", pipeline, args) is None  # submitted
    received = stages.result("detox")
    assert received == {"hub_token": hashlib.sha256(token.encode()).hexdigest(),
                        "api_key": hashlib.sha256(api_key.encode()).hexdigest()}
    assert args.hub_token == token and args.config["scorer"]["api_key"] == api_key  # the caller's args are intact
    written = [p for p in (tmp_path / "rep").rglob("*") if p.is_file()]
    assert any(p.name.endswith("_submitted.pkl") for p in written)
    assert not [p for p in written if token.encode() in p.read_bytes() or api_key.encode() in p.read_bytes()]

"""The JSON file of ``benchmarks/gpu_check.sh``: one record per step, rewritten after every step.

    python benchmarks/gpu_check_report.py init --out gpu_check.json --mode gpu --budget-s 450 --logs DIR
    python benchmarks/gpu_check_report.py step --out gpu_check.json --name sampler_135m --exit-code 0 \\
        --started 1700000000.1 --ended 1700000042.7 --timeout-s 150 --log DIR/sampler_135m.log \\
        --result sampler.json --memory-log DIR/sampler_135m.gpu_memory
    python benchmarks/gpu_check_report.py step --out gpu_check.json --name eval_throughput --status missing
    python benchmarks/gpu_check_report.py summary --out gpu_check.json   # prints it; exit 1 unless all ok

A step's status is ``ok`` (exit 0, the ``--result`` JSON file exists and every ``--expect`` glob matches a
file), ``timeout``
(exit 124/137: killed by ``timeout``), ``failed``, or what ``--status`` says (``missing``: the benchmark or
what it needs is not here, a note says which; ``skipped``: the time budget was spent). ``--memory-log`` is a file of
``nvidia-smi`` readings of the used GPU memory in MiB, one a line, taken while the step ran: its largest becomes the
step's ``gpu_memory_peak_mib`` (the whole device's, CUDA contexts included). The file is complete after every step,
so a check cut short still reports what it measured. Steps named ``sampler*`` (benchmarks/sampler_throughput.py)
and ``eval_throughput`` have their speed-ups summarized.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

FUSED_GOAL = 0.85  # fused contrastive sampling keeps at least this share of plain sampling's tokens/s
LOG_TAIL_LINES = 40  # of a step that did not succeed
OK_STATUSES = ("ok", "missing")  # a benchmark not in the checkout yet is not a failure of the check


def notes(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def write(path: Path, report: dict) -> None:
    report["summary"] = summarize(report)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def summarize(report: dict) -> dict:
    steps = report["steps"]
    summary = {"all_ok": all(s["status"] in OK_STATUSES for s in steps.values()),
               "statuses": {name: s["status"] for name, s in steps.items()},
               "seconds": round(sum(s.get("seconds") or 0.0 for s in steps.values()), 1)}
    fused = {}
    for name, step in steps.items():
        result = step.get("result") if name.startswith("sampler") else None
        ratio = (result or {}).get("ratio_to_plain", {}).get("fused")
        if ratio is not None:
            fused[result["model"]] = {"ratio": ratio, "goal": FUSED_GOAL, "met": ratio >= FUSED_GOAL}
    if fused:
        summary["fused_vs_plain"] = fused
    evaluation = (steps.get("eval_throughput") or {}).get("result") or []
    shared = {r["model"]: r["ratio_to_mixed"]["shared"] for r in evaluation if "shared" in r["ratio_to_mixed"]}
    if shared:
        summary["shared_vs_mixed"] = shared
    detox = ((steps.get("detox") or {}).get("result") or {}).get("train") or {}
    if detox:
        summary["detox"] = {k: detox.get(k) for k in ("global_step", "wall_time_s", "tokens_per_second",
                                                       "first_logged_loss", "last_logged_loss")}
    return summary


def missing_outputs(args) -> list[str]:
    """The ``--result`` file and ``--expect`` globs the step did not write."""
    missing = [] if args.result is None or Path(args.result).is_file() else [args.result]
    return missing + [pattern for pattern in args.expect if not glob.glob(pattern)]


def status_of(args) -> str:
    if args.status:
        return args.status
    if args.exit_code in (124, 137):
        return "timeout"
    return "ok" if args.exit_code == 0 and not missing_outputs(args) else "failed"


def cmd_init(args) -> None:
    report = {"mode": args.mode, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "budget_s": args.budget_s, "logs": args.logs, "notes": notes(args.note), "steps": {}}
    write(Path(args.out), report)


def cmd_step(args) -> None:
    out = Path(args.out)
    report = read(out)
    step = {"status": status_of(args), "exit_code": args.exit_code, "timeout_s": args.timeout_s,
            "seconds": round(args.ended - args.started, 2) if args.started is not None else None,
            "command": args.command, "log": args.log, "notes": notes(args.note)}
    if args.exit_code == 0 and missing_outputs(args):
        step["missing_outputs"] = missing_outputs(args)
    if args.result and Path(args.result).is_file():
        step["result"] = read(Path(args.result))
    if args.memory_log and Path(args.memory_log).is_file():
        words = Path(args.memory_log).read_text(errors="replace").split()
        step["gpu_memory_peak_mib"] = max((float(w) for w in words if w.isdigit()), default=None)
    if step["status"] not in OK_STATUSES and args.log and Path(args.log).is_file():
        step["log_tail"] = Path(args.log).read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    report["steps"][args.name] = step
    write(out, report)


def cmd_summary(args) -> int:
    report = read(Path(args.out))
    summary = summarize(report)
    for name, step in report["steps"].items():
        seconds = "" if step["seconds"] is None else f" ({step['seconds']:.1f} s)"
        print(f"step {name:16s} {step['status']}{seconds}")
    for model, fused in summary.get("fused_vs_plain", {}).items():
        verdict = "met" if fused["met"] else "NOT met"
        print(f"{model}: fused / plain = {fused['ratio']:.3f} (goal >= {FUSED_GOAL}: {verdict})")
    for model, ratio in summary.get("shared_vs_mixed", {}).items():
        print(f"{model}: prefix-shared / mixed evaluation sampling = {ratio:.2f}x")
    if "detox" in summary:
        d = summary["detox"]
        print(f"detox: {d['global_step']} steps in {d['wall_time_s']} s, {d['tokens_per_second']} tokens/s, "
              f"loss {d['first_logged_loss']} -> {d['last_logged_loss']}")
    print(f"all steps ok: {summary['all_ok']} ({summary['seconds']} s of steps)")
    return 0 if summary["all_ok"] else 1


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    sub = parser.add_subparsers(dest="command_name", required=True)
    init = sub.add_parser("init")
    init.add_argument("--mode", required=True, choices=["gpu", "dry-run"])
    init.add_argument("--budget-s", type=int, required=True)
    init.add_argument("--logs", required=True)
    step = sub.add_parser("step")
    step.add_argument("--name", required=True)
    step.add_argument("--status", choices=["missing", "skipped"], help="instead of one from the exit code")
    step.add_argument("--exit-code", type=int)
    step.add_argument("--started", type=float, help="epoch seconds")
    step.add_argument("--ended", type=float, help="epoch seconds")
    step.add_argument("--timeout-s", type=int)
    step.add_argument("--command")
    step.add_argument("--log")
    step.add_argument("--memory-log", help="nvidia-smi readings of the used GPU memory (MiB), one a line")
    step.add_argument("--result", help="the JSON file the step writes; its content goes into the record")
    step.add_argument("--expect", action="append", default=[], metavar="GLOB",
                      help="a file the step must have written (else it failed)")
    summary = sub.add_parser("summary")
    for p in (init, step, summary):
        p.add_argument("--out", required=True)
    for p in (init, step):
        p.add_argument("--note", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.command_name == "init":
        cmd_init(args)
    elif args.command_name == "step":
        cmd_step(args)
    else:
        return cmd_summary(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Subprocesses for tests, each in a session of its own, so a timeout ends the whole process tree.

``subprocess.run(timeout=...)`` kills only the process it started: the training process under ``accelerate launch``,
a pip under a script, a job under a driver survive it and hold CPUs, ports and locks long after the test failed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

# How long a timed-out process group gets to end on SIGTERM before it is killed.
TERM_GRACE_S = 10.0


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the whole group has already ended
        pass


def end_group(proc: subprocess.Popen, grace_s: float = TERM_GRACE_S) -> None:
    """End ``proc``'s process group (``proc`` leads it: started by :func:`popen`): SIGTERM, then after ``grace_s``
    seconds SIGKILL for whatever is left (children that ignore SIGTERM, or that outlived the leader)."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


# Session ids (the leaders' pids) of every process tree started here: the end-of-session check in conftest.py finds
# what is left of them even after the leader died and its children were handed to init.
STARTED_SESSIONS: set[int] = set()


def popen(cmd, **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session (its own process group, so :func:`end_group` reaches its children)."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    STARTED_SESSIONS.add(proc.pid)
    return proc


def communicate(proc: subprocess.Popen, timeout: float, input=None) -> tuple:
    """``proc.communicate`` that on timeout ends ``proc``'s whole process group before raising ``TimeoutExpired``."""
    try:
        return proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        end_group(proc)
        proc.communicate()  # drain the pipes the killed group left
        raise


def run(cmd, *, timeout: float, capture_output: bool = False, input=None, check: bool = False,
        **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` whose timeout ends the whole process tree (SIGTERM, a grace, SIGKILL), then raises."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with popen(cmd, **kwargs) as proc:
        try:
            stdout, stderr = communicate(proc, timeout, input)
        except BaseException:
            if proc.poll() is None:  # interrupted (Ctrl-C) rather than timed out: no child may outlive the test
                end_group(proc, grace_s=0.0)
            raise
    completed = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check:
        completed.check_returncode()
    return completed


def free_port() -> int:
    """A TCP port free on this machine now, for a launcher's rendezvous: a fixed port collides with any other run
    on the machine (another test session, a user's job) and fails the launch."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

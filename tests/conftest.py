import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from subprocesses import STARTED_SESSIONS  # noqa: E402  (tests/ is on the path only from here)
from tiny import tiny_llama, word_tokenizer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(os.environ.get("UNIDETOX_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
os.environ.setdefault("UNIDETOX_DATA_DIR", str(SHARED_DATA))  # what the library and the recipes read


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny word-level tokenizer, left-padded as for generation (a test module may declare its own)."""
    return word_tokenizer(padding_side="left")


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random llama over ``tokenizer``'s vocabulary, seed 0 (a test module may declare its own)."""
    return tiny_llama(len(tokenizer), seed=0)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Helper processes that live as long as the process that started them, by design, and end with it.
LIFELONG_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "torch._inductor.compile_worker")


def _leftover_processes() -> list[psutil.Process]:
    """This pytest process's live descendants, and what is left of the process trees the tests started (children
    handed to init once their leader died are no descendants any more, but keep the leader's session id)."""
    found = {p.pid: p for p in psutil.Process().children(recursive=True)}
    if STARTED_SESSIONS:
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) in STARTED_SESSIONS:
                    found.setdefault(process.pid, process)
            except (ProcessLookupError, PermissionError):
                continue
    leftovers = []
    for process in found.values():
        try:
            if process.status() != psutil.STATUS_ZOMBIE and not any(
                    helper in " ".join(process.cmdline()) for helper in LIFELONG_HELPERS):
                leftovers.append(process)
        except psutil.NoSuchProcess:
            continue
    return leftovers


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_tests():
    """Fails the session (at the teardown of its last test; per xdist worker, each checking its own) when a test
    left a process running, and kills it so the machine is not left busy."""
    yield
    leftovers = _leftover_processes()
    if not leftovers:
        return
    described = []
    for process in leftovers:
        try:
            described.append(f"{process.pid}: {' '.join(process.cmdline())[:200]}")
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    if described:
        pytest.fail("processes left running by the tests (now killed):\n" + "\n".join(described), pytrace=False)

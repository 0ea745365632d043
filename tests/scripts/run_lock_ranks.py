"""Helper for tests/core/test_run_lock.py: every rank of a ``torchrun`` launch enters ``run_lock(output_dir)`` and writes
what happened to ``<report>.<rank>.json`` (``held``, or the refusal's message)."""

import json
import sys

from unidetox.processes import end_process_group, rank_and_world_size
from unidetox.run_dir import OutputDirBusy, run_lock

output_dir, report = sys.argv[1], sys.argv[2]
rank, world = rank_and_world_size()
try:
    with run_lock(output_dir):
        outcome = "held"
except OutputDirBusy as err:
    outcome = str(err)
with open(f"{report}.{rank}.json", "w") as fh:
    json.dump({"world": world, "outcome": outcome}, fh)
end_process_group()

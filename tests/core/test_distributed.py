"""unidetox.processes: the process-group teardown every recipe runs after ``main()``."""

from __future__ import annotations

import torch.distributed as dist

from unidetox.processes import end_process_group


def test_end_process_group_leaves_the_group_and_is_a_no_op_without_one(tmp_path):
    end_process_group()  # no group: nothing to do, no error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        end_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    end_process_group()

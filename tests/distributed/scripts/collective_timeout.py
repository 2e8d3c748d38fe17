"""Rank script for tests/distributed/test_process_group.py: rank 0 waits in a barrier that rank 1
joins only after LAG seconds; with init_distributed(timeout_s) below LAG rank 0's barrier fails.

    torchrun --standalone --nproc_per_node 2 collective_timeout.py TIMEOUT_S LAG_S OUT_DIR

Writes OUT_DIR/rank{R}.json: {"waited_s": seconds in the barrier, "error": its exception type or null}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pipeline.distributed.collectives import barrier
from pipeline.distributed.process_group import init_distributed


def main() -> int:
    timeout_s, lag_s, out = float(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
    view = init_distributed(timeout_s)
    if view.rank == 1:
        time.sleep(lag_s)
    start, error = time.monotonic(), None
    try:
        barrier()
    except Exception as e:  # gloo reports the timeout as a RuntimeError (DistBackendError)
        error = type(e).__name__
    (out / f"rank{view.rank}.json").write_text(json.dumps({"waited_s": time.monotonic() - start, "error": error}))
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)

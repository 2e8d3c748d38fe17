"""Expert parallelism reads its all-to-all splits to the host once per MoE layer per pass (on a GPU
every host read is a sync that stalls the step), and nothing else in a forward + backward does."""

from __future__ import annotations

import json
from pathlib import Path

from tests.ranks import torchrun

SCRIPTS = Path(__file__).parent / "scripts"


def test_ep2_reads_splits_to_the_host_once_per_moe_layer(tmp_path):
    torchrun(2, [str(SCRIPTS / "ep_host_reads.py"), str(tmp_path)])
    for rank in range(2):
        report = json.loads((tmp_path / f"host_reads_rank{rank}.json").read_text())
        where = report["where"]
        # One line reads the splits (both count tables in one .tolist()), once per layer, in forward only.
        assert list(where) and all(k.startswith("pipeline/distributed/expert_parallel.py:") for k in where), where
        assert sum(where.values()) == report["moe_layers"], where

"""init_distributed's collective timeout (parallel.collective_timeout_s) on 2 real gloo ranks, and
the rank view without a process group."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.distributed.ranks import RankView, current
from pipeline.errors import ConfigError
from pipeline.train.config import ParallelConfig
from tests.ranks import torchrun

SCRIPTS = Path(__file__).parent / "scripts"


def test_a_collective_fails_after_the_timeout_given(tmp_path):
    torchrun(2, [str(SCRIPTS / "collective_timeout.py"), "3", "9", str(tmp_path)], check=False, timeout=120)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert rank0["error"] is not None, rank0
    assert 2.5 < rank0["waited_s"] < 8, rank0  # the 3 s given, not the 9 s lag (nor DeepSpeed's 600 s)


def test_without_a_process_group_this_process_is_rank_0_of_1():
    assert current() == RankView(0, 1, current().local_rank) and not current().distributed


def test_a_timeout_that_is_not_positive_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="parallel.collective_timeout_s"):
        ParallelConfig(collective_timeout_s=0)

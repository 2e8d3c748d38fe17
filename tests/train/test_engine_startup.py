"""Partitioned start-up builds the same model as building it whole: every parameter, gathered back
from its ZeRO-3 partitions, equals the same tensor of `GPTOSS(config)` built from the same seed, in
fp32 and bf16, with untied and tied embeddings. (Multi-rank and expert-parallel start-up are covered
by tests/distributed/test_expert_parallel.py and tests/planning/test_comm.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.ranks import torchrun

SCRIPTS = Path(__file__).parent / "scripts"

CASES = {
    "debug-fp32": ("debug", {}, "fp32"),
    "debug-bf16": ("debug", {}, "bf16"),
    "tied-bf16": ("moe-124m", {"n_layer": 2, "n_embd": 64, "n_head": 4, "intermediate_size": 96,
                               "vocab_size": 512}, "bf16"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("startup") / "results.json"
    torchrun(2, [str(SCRIPTS / "startup_equivalence.py"), json.dumps(CASES), str(out)])
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_partitioned_build_equals_whole_model(results, case):
    result = results[case]
    assert result["zero_params"] == result["params"] > 0
    assert result["mismatched"] == [], result["mismatched"]
    assert result["tied"] == (case == "tied-bf16")
    assert result["dtype"] == str(torch.bfloat16 if CASES[case][2] == "bf16" else torch.float32)

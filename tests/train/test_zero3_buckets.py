"""ZeRO-3 keeps one gradient bucket per partition group (pipeline/train/zero3_buckets.py) and
re-gathers its persistent parameters in one all-gather per partition group after each step
(pipeline/train/zero3_persistent_gather.py): fewer reduce-scatters with expert parallelism, fewer
all-gathers always, every gradient and loss bit-identical to DeepSpeed's own code, ZeRO-2
untouched, other DeepSpeed versions refused. Its parameter hooks go on each block instead of every
submodule (train/engine.py `hook_blocks_not_submodules`): 11 hooked modules instead of 71-87, the
same collectives, gradients equal to fp32 rounding. (That a resumed run equals an
uninterrupted one with the patch on is tests/checkpoint/test_checkpoint.py: its runs are EP 2 ZeRO-3.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.train.zero3_buckets import check_deepspeed_version
from tests.ranks import torchrun

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3_buckets") / "report.json"
    torchrun(4, [str(SCRIPTS / "zero3_bucket_grads.py"), str(out)], timeout=600)
    return {(c["ep"], c["zero"], c["sp"]): c["ranks"] for c in json.loads(out.read_text())}


@pytest.mark.slow  # 4 ranks, 28 engines: ~110 s on 2 busy cores
def test_every_gradient_and_loss_is_bit_identical(cases):
    # EP 2 needs ZeRO-3 (ds_config refuses EP with ZeRO-2), so EP 2 x ZeRO-2 is not a case.
    assert set(cases) == {(1, 2, 1), (1, 2, 2), (1, 3, 1), (1, 3, 2), (2, 3, 1), (2, 3, 2)}
    for case, ranks in cases.items():
        for r in ranks:
            assert r["n_grads"] > 50 and r["grad_norm"] > 0, (case, r["rank"])  # real gradients compared
            assert r["bit_identical"], f"{case} rank {r['rank']}: {r['worst']} differs by {r['max_grad_diff']}"
            assert r["loss_patched"] == r["loss_base"], (case, r["rank"])


@pytest.mark.slow
def test_expert_layers_no_longer_flush_the_bucket(cases):
    for (ep, zero, sp), ranks in cases.items():
        for r in ranks:
            if zero == 2:
                assert not r["touched_patched"] and r["scatters_patched"] == [0, 0]  # stage-3 path not taken
                continue
            assert r["touched_patched"] and not r["touched_base"]
            if ep == 1:  # one partition group: one bucket, flushed once at the end of backward, as before
                assert r["scatters_base"] == r["scatters_patched"] == [1, 1]
            else:  # debug preset, 4 MoE layers: 1 + 2 per layer before; dense + expert bucket after
                assert r["scatters_base"] == [9, 9] and r["scatters_patched"] == [2, 2], (ep, sp, r)


@pytest.mark.slow
def test_persistent_parameters_are_gathered_in_one_collective_per_group(cases):
    for (ep, zero, sp), ranks in cases.items():
        for r in ranks:
            if zero == 2:  # stage 3's persistent parameters do not exist: the same gathers as before
                assert r["gathers_patched"] == r["gathers_base"], (ep, sp, r)
                continue
            # Every debug-preset parameter is below stage3_param_persistence_threshold: DeepSpeed gathers
            # the 71 one by one; now one collective per partition group (all ranks; with EP 2 also the EDP group).
            assert r["gathers_base"] == [71, 71], (ep, sp, r)
            assert r["gathers_patched"] == [ep, ep], (ep, sp, r)


@pytest.mark.slow
def test_zero3_hooks_blocks_not_submodules_with_the_same_gradients(cases):
    for (ep, zero, sp), ranks in cases.items():
        for r in ranks:
            if zero == 2:  # ZeRO-2 has no parameter hooks
                assert r["hooked_patched"] == r["hooked_per_block"] == r["hooked_base"], (ep, sp, r)
                continue
            # DeepSpeed hooks every module (71-87 with the EP / SP wrappers); per block: the 4 blocks and the
            # modules outside them (the model, its embedding, block list, final norm, head...), 11 in all.
            assert r["hooked_patched"] >= 71 and r["hooked_per_block"] == 11, (ep, sp, r)
            # The gradients enter the bucket in another order, so the reduce-scatter adds each element in
            # another rank order: equal to fp32 rounding (measured <= 3.5e-7), the same collectives.
            assert r["max_grad_diff_per_block"] < 2e-6, f"{(ep, zero, sp)} rank {r['rank']}: {r['worst_per_block']}"
            assert r["loss_per_block"] == pytest.approx(r["loss_patched"], abs=1e-6), (ep, sp, r)
            assert r["scatters_per_block"] == r["scatters_patched"], (ep, sp, r)
            assert r["gathers_per_block"] == r["gathers_patched"], (ep, sp, r)


def test_other_deepspeed_versions_are_refused_in_one_line():
    check_deepspeed_version("0.19.8")
    with pytest.raises(ConfigError, match=r"deepspeed 0\.20\.0 is installed.*deepspeed==0\.19\.8") as e:
        check_deepspeed_version("0.20.0")
    assert "\n" not in str(e.value)

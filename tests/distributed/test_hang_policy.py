"""The hang watchdog's policy without ranks: allowances per phase, what counts as hung, who is named.
(The watchdog on real ranks, with real signals and stuck ranks: tests/train/test_hang.py.)"""

from __future__ import annotations

import math

import pytest

from pipeline.distributed.hang_policy import Beat, HangPolicy, Report, name_culprits, overdue_ranks, report_of
from pipeline.errors import ConfigError
from pipeline.train.config import TrainConfig

POLICY = HangPolicy.of(600)


def beat(step: int, phase: str, at: float, first: bool = False) -> Beat:
    return Beat(step, phase, POLICY.allowance(phase, first), at, 100 + step, "node1")


def test_allowances_and_the_derived_collective_timeout():
    assert POLICY.slow_timeout_s == 1800 and HangPolicy.of(600, 900).slow_timeout_s == 900
    assert POLICY.allowance("step") == POLICY.allowance("forward") == 600
    assert all(POLICY.allowance(p) == 1800 for p in ("startup", "eval", "downstream", "save"))
    assert POLICY.allowance("forward", first_step=True) == 1800
    assert POLICY.allowance("exit") == math.inf
    assert POLICY.collective_timeout_s() == 1860  # behind the watchdog: it names the rank first
    off = HangPolicy.of(0)
    assert not off.enabled and off.collective_timeout_s() is None
    assert HangPolicy.of(5).poll_s == 0.25 and POLICY.poll_s == 2.0


def test_beats_round_trip():
    b = Beat(12, "save", 1800.0, 1700000000.25, 4242, "node-7|x")
    assert Beat.decode(b.encode().encode()) == b


def test_hung_only_past_the_longest_allowance_in_progress():
    now = 10_000.0
    steps = {0: beat(5, "forward", now - 601), 1: beat(5, "forward", now - 100)}
    assert overdue_ranks(steps, now, started=0, startup_allowance=1800) == [0]
    # A rank still saving (slow allowance) protects the rank waiting for it in a collective...
    saving = {0: beat(5, "step", now - 700), 1: beat(4, "save", now - 700)}
    assert overdue_ranks(saving, now, started=0, startup_allowance=1800) == []
    # ...until the save itself is overdue.
    assert overdue_ranks(saving, now + 1200, started=0, startup_allowance=1800) == [0, 1]
    # A rank not yet heard from is in start-up since the watchdog started.
    assert overdue_ranks({0: beat(1, "step", now - 10, True), 1: None}, now, now - 1000, 1800) == []
    assert overdue_ranks({0: beat(1, "step", now - 10, True), 1: None}, now, now - 1801, 1800) == [1]
    # Finished ranks never are.
    assert overdue_ranks({0: beat(0, "exit", 0.0), 1: beat(0, "exit", 0.0)}, now, 0, 1800) == []


def test_the_culprit_is_the_silent_then_the_behind_then_the_one_outside_a_collective():
    now = 1000.0
    waiting = Report("pipeline/distributed/expert_parallel.py:139 in forward", True)
    beats = {0: beat(5, "forward", now - 9), 1: beat(5, "step", now - 9.2), 2: beat(5, "forward", now - 9)}
    # 1. a rank that does not answer (SIGSTOP, a dead host), whatever its progress
    v = name_culprits(beats, {0: waiting, 1: waiting, 2: None}, {2: "stopped, process state T as after SIGSTOP"},
                      now, "RUN/hang/x")
    assert v.culprits == [2]
    assert v.line == ("hung: rank 2 stopped making progress (rank 2 at step 5 in forward, no progress for 9 s: "
                      "stopped, process state T as after SIGSTOP); rank(s) 0, 1 waited for it; Python stacks of "
                      "rank(s) 0, 1 in RUN/hang/x; run the same command again to resume from the last checkpoint")
    # 2. the rank behind: the others beat a later phase and wait there
    stuck = Report("pipeline/data/sampler.py:77 in next", False)
    v = name_culprits(beats, {0: waiting, 1: stuck, 2: waiting}, {}, now, "D")
    assert v.culprits == [1] and "rank 1 at step 5 in step, no progress for 9 s: stuck at pipeline/data/sampler.py" \
        ":77 in next); rank(s) 0, 2 waited for it; Python stacks of rank(s) 0, 1, 2 in D" in v.line
    # 3. the same progress everywhere: the rank whose main thread is not in a collective
    same = {r: beat(5, "forward", now - 9) for r in range(3)}
    assert name_culprits(same, {0: waiting, 1: waiting, 2: stuck}, {}, now, "D").culprits == [2]
    # else every rank, each with where it waits
    v = name_culprits(same, {r: waiting for r in range(3)}, {}, now, "D")
    assert v.culprits == [0, 1, 2] and v.line.startswith("hung: ranks 0, 1, 2 stopped making progress")


def test_where_a_main_thread_is():
    frames = [("/repo/pipeline/train/trainer.py", 170, "train_step"),
              ("/repo/pipeline/train/health.py", 95, "agree"),
              ("/repo/pipeline/distributed/collectives.py", 88, "all_reduce_sum_"),
              ("/site-packages/torch/distributed/c10d_logger.py", 81, "wrapper"),
              ("/site-packages/torch/distributed/distributed_c10d.py", 2900, "all_reduce")]
    assert report_of(frames) == Report("pipeline/train/health.py:95 in agree", True)
    assert report_of(frames[:2]) == Report("pipeline/train/health.py:95 in agree", False)
    assert report_of([]) == Report("?", False)


def test_config_checks():
    assert TrainConfig().hang_timeout_s == 600 and TrainConfig().hang_slow_timeout_s is None
    with pytest.raises(ConfigError, match=r"train.hang_timeout_s \(-1\) must be >= 0"):
        TrainConfig(hang_timeout_s=-1)
    with pytest.raises(ConfigError, match=r"train.hang_slow_timeout_s \(10\) must be >= train.hang_timeout_s"):
        TrainConfig(hang_timeout_s=60, hang_slow_timeout_s=10)

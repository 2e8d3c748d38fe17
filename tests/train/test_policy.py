"""The training loop's decisions (log / evaluate / save / skip / stop), without ranks or engines."""

from __future__ import annotations

from pipeline.train.config import TrainConfig
from pipeline.train.policy import LoopPolicy


def run(policy: LoopPolicy, healthy_at) -> dict[str, list[int]]:
    """Steps 1..steps through the policy as the trainer drives it (every save succeeds)."""
    seen = {"log": [], "evaluate": [], "save": []}
    for step in range(1, policy.train.steps + 1):
        todo = policy.after_step(step, healthy_at(step))
        for name in seen:
            if getattr(todo, name):
                seen[name].append(step)
        policy.done(evaluated=todo.evaluate, saved=todo.save)
    return seen


def test_intervals_and_the_last_step():
    policy = LoopPolicy(TrainConfig(steps=10, log_interval=4, eval_interval=5, save_interval=3))
    seen = run(policy, lambda step: True)
    assert seen == {"log": [4, 8, 10], "evaluate": [5, 10], "save": [3, 6, 9]}
    end = policy.at_end()
    assert not end.evaluate and end.save  # step 10 evaluated but did not save


def test_downstream_tasks_run_every_interval_and_at_the_last_step_only_when_configured():
    train = TrainConfig(steps=10, eval_interval=0)
    due = lambda policy: [s for s in range(1, 11) if policy.after_step(s, True).downstream]  # noqa: E731
    assert due(LoopPolicy(train, downstream_interval=4)) == [4, 8, 10]
    assert due(LoopPolicy(train, downstream_interval=0)) == [10]  # 0: only at the end
    assert due(LoopPolicy(train)) == []  # no eval.tasks


def test_a_save_due_on_a_skipped_step_waits_for_the_next_healthy_one():
    policy = LoopPolicy(TrainConfig(steps=8, save_interval=3, eval_interval=0))
    seen = run(policy, lambda step: step not in (3, 4))
    assert seen["save"] == [5, 6]
    assert policy.bad_steps == 0


def test_consecutive_skips_diverge_and_a_healthy_step_resets_the_count():
    policy = LoopPolicy(TrainConfig(steps=20, max_bad_steps=3))
    for step, healthy in enumerate([False, False, True, False, False], start=1):
        policy.after_step(step, healthy)
        assert not policy.diverged
    policy.after_step(6, False)
    assert policy.diverged and policy.bad_steps == 3


def test_stop_and_end_never_save_a_skipped_step_or_twice():
    policy = LoopPolicy(TrainConfig(steps=4, save_interval=2, eval_interval=0))
    todo = policy.after_step(2, True)
    policy.done(saved=todo.save)
    assert todo.save and not policy.save_on_stop()  # this step already saved
    policy.after_step(3, False)
    assert not policy.save_on_stop()  # skipped: its weights are the previous step's
    assert policy.at_end().save is False and policy.at_end().evaluate is True
    policy.after_step(4, True)
    assert policy.save_on_stop()


def test_a_failed_save_is_not_counted_as_saved():
    policy = LoopPolicy(TrainConfig(steps=2, save_interval=2, eval_interval=0))
    policy.after_step(1, True)
    todo = policy.after_step(2, True)
    policy.done(saved=False)  # weights were not finite
    assert todo.save and policy.at_end().save

"""When the training loop logs, evaluates, saves and gives up: the decisions, apart from the work.

The trainer calls `after_step` once per optimizer step and does what it says; a stop signal and the
end of the run ask `save_on_stop` / `at_end`. Nothing here touches ranks, engines or files, so the
policy is tested on its own (tests/train/test_policy.py).

- Log every `log_interval` steps and at the last step.
- Evaluate every `eval_interval` steps, and at the end unless the last step just did.
- Run the downstream tasks (lm-evaluation-harness, when `eval.tasks` is set) every
  `downstream_interval` steps and at the last step (an interval of 0: only at the last step).
- Save every `save_interval` steps; a save that falls on a skipped step moves to the next applied
  step (a checkpoint is only written from weights a healthy step produced). On a stop signal, save
  unless this step saved or was skipped. At the end, save unless this step saved, or the run ended
  on skipped steps (then the newest good checkpoint stays the latest).
- Give up after `max_bad_steps` skipped steps in a row.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.train.config import TrainConfig


@dataclass(frozen=True)
class StepActions:
    log: bool
    evaluate: bool
    save: bool
    downstream: bool = False


class LoopPolicy:
    def __init__(self, train: TrainConfig, downstream_interval: int | None = None):
        self.train = train
        self.downstream_interval = downstream_interval  # None: no downstream tasks in this run
        self.bad_steps = 0  # consecutive skipped steps
        self.save_due = False  # a scheduled save waiting for a healthy step
        self.evaluated = self.saved = False  # by the latest step

    def after_step(self, step: int, healthy: bool) -> StepActions:
        t = self.train
        self.evaluated = self.saved = False
        self.bad_steps = 0 if healthy else self.bad_steps + 1
        self.save_due = self.save_due or bool(t.save_interval and step % t.save_interval == 0)
        save = self.save_due and healthy
        if save:
            self.save_due = False
        every = self.downstream_interval
        downstream = every is not None and (step == t.steps or bool(every and step % every == 0))
        return StepActions(log=step % t.log_interval == 0 or step == t.steps,
                           evaluate=bool(t.eval_interval and step % t.eval_interval == 0), save=save,
                           downstream=downstream)

    def done(self, evaluated: bool = False, saved: bool = False) -> None:
        """What the trainer did for the latest step (a save can fail: non-finite weights)."""
        self.evaluated, self.saved = self.evaluated or evaluated, self.saved or saved

    @property
    def diverged(self) -> bool:
        return self.bad_steps >= self.train.max_bad_steps

    def save_on_stop(self) -> bool:
        return not self.saved and self.bad_steps == 0

    def at_end(self) -> StepActions:
        return StepActions(log=False, evaluate=not self.evaluated, save=not self.saved and self.bad_steps == 0)

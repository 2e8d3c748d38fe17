"""The `eval` section of a run config (and of `python -m pipeline.evaluate`'s flags): downstream
evaluation with lm-evaluation-harness tasks. Lives with the evaluation it configures."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from pipeline.errors import ConfigError


@dataclass(kw_only=True)
class EvalConfig:
    """Downstream evaluation with lm-evaluation-harness tasks in the training loop (pip install -e .[eval];
    see pipeline/evaluation/). Off while `tasks` is empty."""

    tasks: list[str] = field(default_factory=list)
    """lm-eval task or group names, e.g. [hellaswag, arc_easy]; likelihood and multiple-choice tasks only."""
    task_paths: list[str] = field(default_factory=list)
    """Folders (or YAML files) of extra task definitions, e.g. ones that read local data files."""
    downstream_interval: int = 0
    """Steps between downstream evaluations (0 = only at the end of training)."""
    limit: int | float | None = None
    """Examples per task; below 1.0 a fraction of each task's examples, as lm-eval's --limit (null = all)."""
    num_fewshot: int | None = None
    """Few-shot examples in each prompt (null = the task's own default)."""
    batch_size: int = 16
    """Requests per forward on each rank."""

    def __post_init__(self):
        if self.downstream_interval < 0:
            raise ConfigError(f"eval.downstream_interval ({self.downstream_interval}) must be >= 0 "
                              "(0 = only at the end)")
        if self.limit is not None and (self.limit <= 0 or (self.limit > 1 and self.limit != int(self.limit))):
            raise ConfigError(f"eval.limit ({self.limit}) must be >= 1 (a whole number of examples per task), "
                              "a fraction below 1.0 of each task's examples, or null for every example")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"eval.num_fewshot ({self.num_fewshot}) must be >= 0, or null for the task's default")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size ({self.batch_size}) must be >= 1")

    def check_installed(self) -> None:
        """For runs about to start; find_spec does not import lm_eval (seconds of imports)."""
        if self.tasks and importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("eval.tasks is set but lm-evaluation-harness is not installed: pip install -e .[eval] "
                              "(or leave eval.tasks empty)")

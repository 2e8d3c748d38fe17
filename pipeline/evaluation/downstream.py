"""Downstream evaluation: lm-evaluation-harness tasks on the model being trained, or on a checkpoint.

    evaluator = DownstreamEvaluator(cfg.eval, tokenizer, prefix_token_id, max_length, ranks)
    results = evaluator.evaluate(forward, device)     # on every rank; the harness's results on rank 0

The trainer calls `run` when its LoopPolicy says the tasks are due; `python -m pipeline.evaluate`
calls `evaluate`.
Tasks are checked when the evaluator is built (before any engine or training): an unknown task,
a task whose data cannot be loaded, and a generation task with generation_kwargs we do not implement
or a max_gen_toks that leaves no context are each one ConfigError naming the task, raised on every
rank (rank 0 checks, the others receive its verdict).

Training state is left as it was: the model runs in eval mode without gradients (and goes back to
train mode), and the process-wide RNGs the harness seeds (Python, NumPy, torch) are restored.
Metrics are the harness's own, computed once on rank 0 (see harness.py for how requests are split).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import torch

from pipeline.config_utils import resolve_path
from pipeline.data import load_manifest, load_tokenizer
from pipeline.data.manifest import MANIFEST
from pipeline.data.tokenizer import Tokenizer
from pipeline.distributed.collectives import agree_on_error
from pipeline.distributed.ranks import RankView
from pipeline.errors import ConfigError
from pipeline.evaluation.config import EvalConfig
from pipeline.io_utils import atomic_write_text
from pipeline.rng import rng_state, set_rng_state

# Request types PipelineLM implements; multiple_choice tasks issue loglikelihood requests.
SUPPORTED_OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")
FEWSHOT_SEED = 1234  # lm_eval's default fewshot_random_seed
ONE_RANK = RankView()  # no process group: this process scores everything
TASK_FILE_SUFFIXES = (".yaml", ".yml")  # a task given as its YAML file, not a name
RESULTS_DIR = "downstream"
"""RUN/downstream/step_N.json: the harness's result JSON of each evaluation of a run."""


def load_tasks(tasks: list[str], task_paths: list[str], key: str = "eval.tasks",
               max_length: int | None = None) -> dict:
    """The harness's loaded tasks ({"tasks": {name: Task}, "groups": ...}), data included, so that a
    missing dataset shows at start, not mid-run; loaded once and reused by every evaluation.
    Generation tasks are checked against `max_length` (the context).

    `tasks`: names, or task YAML files (as lm-eval's --tasks). The harness's ~15,000 built-in task
    configs take seconds to index; when `task_paths` and files define every requested task they are
    not indexed at all."""
    from lm_eval.tasks import TaskManager

    paths = []
    for p in task_paths:
        path = resolve_path(p)
        if not path.exists():
            raise ConfigError(f"eval.task_paths: {p} does not exist; give a folder of task YAMLs")
        paths.append(str(path))
    specs = task_specs(tasks, key)
    names = [t for t in specs if not t.endswith(TASK_FILE_SUFFIXES)]
    manager = TaskManager(include_path=paths, include_defaults=False) if paths or not names else None
    if manager is None or not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths or None)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"{key}: unknown task(s) {', '.join(unknown)}; `lm_eval ls tasks` lists the built-in "
                          "ones, and eval.task_paths adds folders of your own task YAMLs")
    with quiet_harness():
        try:
            loaded = manager.load(specs)
        except Exception:  # datasets raises many kinds (offline, missing file, bad format): find whose
            for name in specs:
                try:
                    manager.load([name])
                except Exception as e:
                    reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                    raise ConfigError(
                        f"{key}: task {name} could not load its data ({type(e).__name__}: {reason}); download it "
                        "on a machine with network first, or point its YAML at local files (README: Downstream "
                        "evaluation)") from None
            raise
    for name, task in loaded["tasks"].items():
        output_type = task.get_config("output_type")
        if output_type not in SUPPORTED_OUTPUT_TYPES:
            raise ConfigError(f"{key}: {name} has output_type {output_type}; supported: "
                              f"{', '.join(SUPPORTED_OUTPUT_TYPES)}")
        if output_type == "generate_until":
            check_generation_task(name, task.get_config("generation_kwargs") or {}, key, max_length)
    return loaded


def task_specs(tasks: list[str], key: str) -> list[str]:
    """Task names as given; a task YAML file (or glob of them, as lm-eval's --tasks takes) as the
    absolute paths it matches, which the harness loads as task definitions."""
    import glob

    specs = []
    for task in tasks:
        if not task.endswith(TASK_FILE_SUFFIXES):
            specs.append(task)
            continue
        matches = sorted(glob.glob(str(resolve_path(task))))
        if not matches:
            raise ConfigError(f"{key}: task file {task} does not exist; give a task YAML file, a task name, "
                              "or a folder of task YAMLs in eval.task_paths (--include_path)")
        specs += [str(Path(m).resolve()) for m in matches]
    return specs


def check_generation_task(name: str, gen_kwargs: dict, key: str, max_length: int | None) -> None:
    from pipeline.evaluation.generation import GenerationSettings
    from pipeline.evaluation.harness import check_generation_fits

    try:
        settings = GenerationSettings.from_gen_kwargs(gen_kwargs, None)
        if max_length is not None:
            check_generation_fits(settings, max_length)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key}: {name}: {e}") from None


@contextmanager
def quiet_harness():
    """The harness logs several INFO/WARNING lines per task and draws a progress bar per task and
    request type on every call; inside a training log they would bury the training lines. Its
    logger is set to ERROR and sys.stderr (where tqdm draws) points at /dev/null until exit; logging
    handlers keep the stream they were made with, and exceptions still propagate."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, redirect_stderr(devnull):
            yield
    finally:
        logger.setLevel(level)


def run_harness(lm, loaded: dict, cfg: EvalConfig, bootstrap_iters: int, log_samples: bool) -> dict:
    """What `lm_eval.simple_evaluate` does for a ready model, without its environment report (which
    runs `git`, `pip` and `nvidia-smi` subprocesses: seconds per evaluation, from inside a training
    job): the harness's default seeds, the few-shot override, then its `evaluate`."""
    import random

    import lm_eval
    import numpy as np
    from lm_eval.evaluator import evaluate

    seeds = {"random_seed": 0, "numpy_seed": 1234, "torch_seed": 1234}  # simple_evaluate's defaults
    random.seed(seeds["random_seed"])
    np.random.seed(seeds["numpy_seed"])
    torch.manual_seed(seeds["torch_seed"])
    for task in loaded["tasks"].values():
        if cfg.num_fewshot is not None and task.get_config("num_fewshot") != 0:  # 0 in a task's YAML is final
            task.set_config(key="num_fewshot", value=cfg.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    results = evaluate(lm=lm, task_dict=loaded, limit=cfg.limit, bootstrap_iters=bootstrap_iters,
                       log_samples=log_samples)
    results["config"] = {**lm.get_model_info(), "limit": cfg.limit, "num_fewshot": cfg.num_fewshot,
                         **seeds, "fewshot_seed": FEWSHOT_SEED, "bootstrap_iters": bootstrap_iters,
                         "batch_size": cfg.batch_size, "lm_eval_version": lm_eval.__version__}
    return results


def data_tokenizer(data_dir: str | Path) -> tuple[Tokenizer, int]:
    """A prepared data dir's tokenizer and the token that conditions an empty context: BOS when its
    documents start with one (prepare --bos), else EOS, the document separator the model saw. A
    tokenizer dir or file instead (data.tokenizer of a run on Megatron prefixes): it and its EOS."""
    if not (Path(data_dir) / MANIFEST).is_file() and Path(data_dir).exists():
        tokenizer = load_tokenizer(data_dir)
        return tokenizer, tokenizer.eos_id
    manifest = load_manifest(data_dir)
    tokenizer = load_tokenizer(data_dir)
    return tokenizer, tokenizer.bos_id if manifest.raw.get("bos") and tokenizer.bos_id is not None else tokenizer.eos_id


def flat_metrics(results: dict) -> dict[str, float]:
    """The harness's results -> {"downstream/<task>/<metric>": value} (filter suffixes like ",none"
    dropped, stderr kept as <metric>_stderr when the harness computed one)."""
    out = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            out[f"downstream/{task}/{name}"] = float(value)
    return out


def write_results(path: Path, results: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")


def load_tasks_in_one_line(cfg: EvalConfig, max_length: int | None = None) -> dict:
    """load_tasks, where any failure (e.g. a malformed task YAML) is a one-line ConfigError."""
    try:
        return load_tasks(cfg.tasks, cfg.task_paths, max_length=max_length)
    except ConfigError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ConfigError(f"eval.tasks: the harness could not load {', '.join(cfg.tasks)} ({type(e).__name__}: "
                          f"{first}); check eval.task_paths") from None


class DownstreamEvaluator:
    """lm-eval tasks on every rank's model; see the module docstring."""

    def __init__(self, cfg: EvalConfig, tokenizer: Tokenizer, prefix_token_id: int, max_length: int,
                 ranks: RankView = ONE_RANK, bootstrap_iters: int = 0, log_samples: bool = False):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.prefix_token_id = prefix_token_id
        self.max_length = max_length
        self.ranks = ranks  # every rank of the default process group scores (harness.Scorer)
        self.bootstrap_iters = bootstrap_iters  # 0: no bootstrapped stderr (seconds of CPU per metric)
        self.log_samples = log_samples
        # Only rank 0 runs the harness; its verdict is every rank's.
        self.tasks = agree_on_error(lambda: load_tasks_in_one_line(cfg, max_length), ranks)

    @classmethod
    def for_data(cls, cfg: EvalConfig, data_dir: str | Path, max_length: int, ranks: RankView = ONE_RANK,
                 **kwargs) -> DownstreamEvaluator | None:
        """The evaluator of a run on prepared data `data_dir` (its tokenizer); None without eval.tasks."""
        if not cfg.tasks:
            return None
        tokenizer, prefix = data_tokenizer(data_dir)
        return cls(cfg, tokenizer, prefix, max_length, ranks, **kwargs)

    def evaluate(self, forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str,
                 name: str = "gpt-oss-pipeline", sequence_parallel: int = 1, decoder=None) -> dict | None:
        """Run the tasks; every rank must call this. `forward(ids [B, T]) -> logits [B, T, V]` with
        the model already in eval mode. `sequence_parallel` N > 1: groups of N consecutive ranks run
        the same requests through `forward` (see harness.Scorer). `decoder` (generation.Decoder) runs
        generation tasks, under sequence parallelism too (each rank decodes whole requests of its
        own). Returns the harness's results on rank 0, None elsewhere."""
        from pipeline.evaluation.harness import PipelineLM, Scorer

        scorer = Scorer(forward, device, self.cfg.batch_size, pad_id=self.tokenizer.eos_id,
                        sequence_parallel=sequence_parallel, decoder=decoder, tokenizer=self.tokenizer)
        if self.ranks.rank != 0:
            scorer.serve()
            return None
        lm = PipelineLM(scorer, self.tokenizer, self.max_length, self.prefix_token_id, name=name)
        saved = rng_state()  # the harness seeds Python's, NumPy's and torch's global RNGs
        try:
            with quiet_harness():
                results = run_harness(lm, self.tasks, self.cfg, self.bootstrap_iters, self.log_samples)
        except BaseException as e:
            scorer.stop(error=f"{type(e).__name__}: {e}")
            raise
        finally:
            set_rng_state(saved)
        scorer.stop()
        results["config"]["forwards_per_rank"] = scorer.forwards
        return results

    def run(self, step: int, engine, log, append_metrics: Callable[[dict], None],
            results_dir: Path) -> dict[str, float] | None:
        """The trainer's call when its LoopPolicy says the tasks are due: evaluate, log on rank 0 (console,
        TensorBoard, W&B, metrics.jsonl) and write RUN/downstream/step_N.json. Returns the logged values
        on rank 0."""
        from pipeline.evaluation.generation import Decoder

        was_training = engine.module.training
        engine.eval()
        start = time.perf_counter()
        forward = lambda ids_BT: engine(ids_BT)[0]  # noqa: E731
        shard = getattr(engine.module, "sequence_shard", None)  # set by sequence parallelism
        sp = shard.count if shard is not None else 1
        if sp > 1:  # the SP group's ranks share each scored request, each computing its slice of the sequence
            from pipeline.distributed.sequence_parallel import create_sequence_groups, whole_sequence_forward

            forward = whole_sequence_forward(forward, create_sequence_groups(sp))
        try:
            results = self.evaluate(forward, engine.device, sequence_parallel=sp,
                                    decoder=Decoder(engine.module, engine))
        finally:
            engine.train(was_training)
        if results is None:
            return None
        values = {**flat_metrics(results), "downstream/seconds": time.perf_counter() - start}
        log.scalars(step, values)
        scores = " | ".join(f"{k.removeprefix('downstream/')} {v:.4f}" for k, v in values.items()
                            if not k.endswith("_stderr") and k != "downstream/seconds")
        log.message(f"downstream step {step:>6} | {scores} | {values['downstream/seconds']:.1f} s")
        append_metrics({"step": step, **values})
        write_results(results_dir / RESULTS_DIR / f"step_{step}.json", results)
        return values

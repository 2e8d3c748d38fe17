"""Downstream evaluation of a checkpoint or an export with lm-evaluation-harness tasks.

    python -m pipeline.evaluate --run-dir runs/x [--step N] [--tasks hellaswag arc_easy] [--limit 500]
    python -m pipeline.evaluate --model runs/x/export --tasks pycode_tiny --task-path tests/evaluation/tasks
    torchrun --nproc_per_node 8 -m pipeline.evaluate --run-dir runs/x       # ZeRO-3 + EP, as trained

A run dir's checkpoint (latest, or --step) is read in one process (no ranks, like
`pipeline.export`); under a launcher every rank builds the run's ZeRO-3 / expert-parallel engine and
loads its share, so a model that needs several GPUs is evaluated where it was trained. An export
(`--model`) is loaded whole on every rank. Requests are split over the ranks either way.
Settings default to the run config's `eval` section (tasks, task_paths, limit, num_fewshot);
flags override them. The harness's result JSON goes to RUN/downstream/step_N.json (or
EXPORT/lm_eval_results.json, or --output); --output_path writes lm_eval's own layout
(pipeline/evaluation/lm_eval_output.py). lm_eval's flag spellings (--include_path, --num_fewshot,
--batch_size, --log_samples, task YAML files in --tasks, --limit fractions) mean what they mean there.
Errors in the input are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.cli import run_and_exit, user_errors_exit_2
from pipeline.errors import ConfigError
from pipeline.evaluation.lm_eval_output import LmEvalOutput


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="training run dir (holds checkpoints/)")
    source.add_argument("--model", help="exported model dir (python -m pipeline.export)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step with --run-dir (default: latest)")
    # Each flag also answers to lm_eval's spelling (--num_fewshot, --include_path, ...), same meaning.
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="lm-eval task or group names, or task YAML files (comma- or space-separated)")
    parser.add_argument("--task-path", "--include_path", "--include-path", dest="task_path", nargs="+",
                        default=None, help="folders (or YAML files) of extra task definitions")
    parser.add_argument("--limit", type=limit_value, default=None,
                        help="examples per task; below 1.0 a fraction of each task's examples (default: all)")
    parser.add_argument("--num-fewshot", "--num_fewshot", type=int, default=None,
                        help="few-shot examples (default: the task's)")
    parser.add_argument("--batch-size", "--batch_size", type=batch_size_value, default=None,
                        help="requests per forward per rank (default 16; 'auto' keeps the default)")
    parser.add_argument("--max-length", type=int, default=None, help="context length (default: model block_size)")
    parser.add_argument("--prefix-token", choices=("eos", "bos"), default=None,
                        help="token conditioning an empty context (default: bos if the run's data has BOS, else eos)")
    parser.add_argument("--bootstrap-iters", type=int, default=0, help="harness stderr bootstrap (default 0: off)")
    parser.add_argument("--log-samples", "--log_samples", action="store_true",
                        help="keep per-request outputs (in the JSON; with --output_path in samples_<task>_*.jsonl)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--output", default=None, help="result JSON path")
    output.add_argument("--output-path", "--output_path", dest="output_path", default=None,
                        help="lm_eval's layout: DIR/<model name>/results_<time>.json (+ samples_<task>_<time>.jsonl), "
                        "or FILE_<time>.json for a .json path")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tasks:  # lm_eval takes "a,b" as well as "a b"
        args.tasks = [t for arg in args.tasks for t in arg.split(",") if t]
    return args


def limit_value(text: str) -> int | float:
    """lm_eval's --limit: a count, or below 1.0 a fraction of each task's examples."""
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def batch_size_value(text: str) -> int | str:
    """An int, or lm_eval's 'auto' / 'auto:N' (no automatic search here: the default batch size)."""
    return text if text == "auto" or text.startswith("auto:") else int(text)


def eval_config(saved_eval: dict | None, args: argparse.Namespace):
    """The run's `eval` section (if any) with the flags given on top."""
    from pipeline.config_utils import from_dict
    from pipeline.evaluation.config import EvalConfig

    cfg = from_dict(EvalConfig, saved_eval or {}, "eval")
    batch_size = args.batch_size
    if isinstance(batch_size, str):
        print(f"--batch_size {batch_size}: no automatic batch-size search; {cfg.batch_size} requests per forward "
              "per rank (give a number to change it)", flush=True)
        batch_size = None
    flags = {"tasks": args.tasks, "task_paths": args.task_path, "limit": args.limit,
             "num_fewshot": args.num_fewshot, "batch_size": batch_size}
    cfg = replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    if not cfg.tasks:
        raise ConfigError("no tasks to run: pass --tasks (the run config has no eval.tasks)")
    return cfg


def load_from_run_dir(run_dir: Path, step: int | None, world: int, device: torch.device):
    """(forward, decoder, model config, data dir, checkpoint dir, saved config) for a run's checkpoint."""
    from pipeline.checkpoint import load_state, read_full_weights
    from pipeline.checkpoint.hf_export import checkpoint_model, model_from_state, run_dtype
    from pipeline.evaluation.generation import Decoder

    ckpt, saved, model_cfg, data_dir = checkpoint_model(run_dir, step)
    if world == 1:
        model = model_from_state(model_cfg, read_full_weights(ckpt, run_dtype(saved))).to(device).eval()
        return (lambda ids: model(ids)[0]), Decoder(model), model_cfg, data_dir, ckpt, saved
    # Under a launcher: the run's own engine (ZeRO-3, expert parallelism), weights only.
    from pipeline.config_utils import from_dict
    from pipeline.train.config import RunConfig
    from pipeline.train.ds_config import build_ds_config
    from pipeline.train.engine import build_engine

    # No sequence parallelism (it adds no parameters): scoring deals whole requests to ranks.
    saved_run = {k: v for k, v in saved.items() if k not in ("wandb", "eval")}
    saved_run["parallel"] = {**saved_run.get("parallel", {}), "sequence_parallel_size": 1}
    cfg = from_dict(RunConfig, saved_run)
    ds_config = build_ds_config(cfg, world)
    engine = build_engine(cfg, model_cfg, ds_config, world)
    load_state(engine, ckpt, with_optimizer=False)
    engine.eval()
    return (lambda ids: engine(ids)[0]), Decoder(engine.module, engine), model_cfg, data_dir, ckpt, saved


def run(args: argparse.Namespace) -> dict | None:
    from pipeline.data import load_tokenizer
    from pipeline.distributed.ranks import RankView
    from pipeline.evaluation.downstream import RESULTS_DIR, DownstreamEvaluator, data_tokenizer, write_results
    from pipeline.evaluation.generation import Decoder

    ranks = RankView()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from pipeline.distributed.process_group import init_distributed

        ranks = init_distributed()
    world = ranks.world
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if args.run_dir:
        forward, decoder, model_cfg, data_dir, ckpt, saved = load_from_run_dir(Path(args.run_dir), args.step,
                                                                               world, device)
        cfg = eval_config(saved.get("eval"), args)
        tokenizer, prefix = data_tokenizer(data_dir)
        output = Path(args.output) if args.output else Path(args.run_dir) / RESULTS_DIR / f"{ckpt.name}.json"
        name = f"{args.run_dir}:{ckpt.name}"
    else:
        from pipeline.checkpoint import load_exported

        model_dir = Path(args.model)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"{model_dir} holds no exported model (config.json); run python -m pipeline.export")
        cfg = eval_config(None, args)
        tokenizer = load_tokenizer(model_dir / "tokenizer")
        prefix = tokenizer.eos_id
        model = load_exported(model_dir).to(device).eval()
        model_cfg = model.config
        forward = lambda ids: model(ids)[0]  # noqa: E731
        decoder = Decoder(model)
        output = Path(args.output) if args.output else model_dir / "lm_eval_results.json"
        name = str(model_dir)
    if args.prefix_token == "bos":
        if tokenizer.bos_id is None:
            raise ConfigError("--prefix-token bos: the tokenizer has no BOS token; use eos")
        prefix = tokenizer.bos_id
    elif args.prefix_token == "eos":
        prefix = tokenizer.eos_id
    evaluator = DownstreamEvaluator(cfg, tokenizer, prefix, args.max_length or model_cfg.block_size,
                                    ranks, bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples)
    tracker = LmEvalOutput(args.output_path, name) if args.output_path and ranks.rank == 0 else None
    results = evaluator.evaluate(forward, device, name=name, decoder=decoder)
    if results is not None:
        from lm_eval.utils import make_table

        if tracker is not None:
            output = tracker.save(results, tokenizer, str(device))
        else:
            write_results(output, results)
        print(make_table(results), flush=True)
        print(f"results: {output}", flush=True)
    return results


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    finally:
        from pipeline.distributed.process_group import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    run_and_exit(main)

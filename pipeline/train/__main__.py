"""`python -m pipeline.train --config RUN.yaml [key=value ...]`, under deepspeed, torchrun or alone.

    deepspeed --num_gpus 8 --module pipeline.train --config launch/configs/gpt-oss-20b-1node.yaml
    torchrun --nproc_per_node 2 -m pipeline.train --config run.yaml train.steps=100

Exit codes: 0 done (or stopped on a signal with a checkpoint), 2 bad config or data at start-up,
3 stopped after train.max_bad_steps consecutive skipped steps. Errors are one line, no traceback,
printed once per node (by local rank 0): every rank raises the same error from the same config, so
every rank exits on its own and none waits in a collective for a rank that has gone.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import fail, user_errors_exit_2

EXIT_DIVERGED = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (see pipeline/train/config.py)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment is what we use.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@user_errors_exit_2  # at start-up: bad config or data
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.train.config import load_run_config
    from pipeline.train.trainer import Trainer

    trainer = Trainer(load_run_config(args.config, args.overrides))
    from pipeline.train.health import TrainingDiverged

    try:
        trainer.fit()
    except TrainingDiverged as e:
        return fail(str(e), EXIT_DIVERGED)
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

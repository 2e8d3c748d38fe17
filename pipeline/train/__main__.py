"""`python -m pipeline.train --config RUN.yaml [key=value ...]`, under deepspeed, torchrun or alone.

    deepspeed --num_gpus 8 --module pipeline.train --config launch/configs/gpt-oss-20b-1node.yaml
    torchrun --nproc_per_node 2 -m pipeline.train --config run.yaml train.steps=100
"""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import ConfigError, DataError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (see pipeline/train/config.py)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment is what we use.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.train.config import load_run_config

    try:
        cfg = load_run_config(args.config, args.overrides)
        from pipeline.train.trainer import Trainer

        trainer = Trainer(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        trainer.fit()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

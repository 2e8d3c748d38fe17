"""`python -m pipeline.export --run-dir runs/debug --output exported/ [--step N]`: a training
checkpoint to a Hugging Face GPT-OSS folder (or our native one for models transformers cannot
represent). The work is done by `pipeline/checkpoint/hf_export.py`.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import user_errors_exit_2


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export",
                                     description="Export a training checkpoint to a Hugging Face folder.")
    parser.add_argument("--run-dir", required=True, help="training run dir (holds checkpoints/)")
    parser.add_argument("--output", required=True, help="folder to write (replaced atomically)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = parser.parse_args(argv)
    from pipeline.checkpoint.hf_export import export  # after parsing: --help needs no torch

    export(args.run_dir, args.output, args.step)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m pipeline.train --config RUN.yaml [key=value ...]`, under deepspeed, torchrun or alone.

    deepspeed --num_gpus 8 --module pipeline.train --config launch/configs/gpt-oss-20b-1node.yaml
    torchrun --nproc_per_node 2 -m pipeline.train --config run.yaml train.steps=100

Exit codes: 0 done (or stopped on a signal / a dead launcher with a checkpoint), 2 bad config or
data at start-up, or a data / disk error during training, 3 stopped after train.max_bad_steps
consecutive skipped steps, 4 hung (a rank made no progress for train.hang_timeout_s; the line names
it, stacks in RUN/hang/), 130 stopped at once by a second stop signal (or by any stop signal during
start-up), 1 a rank whose peer failed (the peer printed why). Errors are one line, no traceback,
printed once per node (by local rank 0): every rank raises the same error from the same config, so
every rank exits on its own and none waits in a collective for a rank that has gone. An error only
one rank sees (a corrupt shard it read) is printed by that rank.
"""

from __future__ import annotations

import argparse

from pipeline.cli import fail, run_and_exit, user_errors_exit_2

EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_PEER_GONE = 3, 130, 1
# What a collective raises on the ranks left behind when a peer exited (gloo, NCCL): that peer
# printed the cause (e.g. a corrupt shard only it read), so these ranks exit without a traceback.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited",
             "NCCL communicator was aborted")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (see pipeline/train/config.py)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment is what we use.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@user_errors_exit_2  # bad config or data at start-up; a corrupt shard or a full disk later
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.train.stop_signal import StoppedDuringStartup, StopSignal

    stop = StopSignal()  # before the slow imports: a Ctrl-C at any moment of start-up is one line
    try:
        from pipeline.train.config import load_run_config
        from pipeline.train.trainer import Trainer

        trainer = Trainer(load_run_config(args.config, args.overrides), stop)
    except StoppedDuringStartup as e:
        return fail(str(e), EXIT_INTERRUPTED)
    finally:
        stop.end_startup()
    from pipeline.train.health import TrainingDiverged

    try:
        trainer.fit()
    except TrainingDiverged as e:
        return fail(str(e), EXIT_DIVERGED)
    except RuntimeError as e:
        if any(p in str(e) for p in PEER_GONE):
            return EXIT_PEER_GONE
        raise
    finally:
        trainer.close()
    from pipeline.distributed.process_group import shutdown

    shutdown()  # NCCL aborts its communicators here; run_and_exit then skips teardown
    return 0


if __name__ == "__main__":
    run_and_exit(main)

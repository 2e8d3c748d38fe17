"""How an entry point ends: a user error is one line on stderr, no traceback, exit code 2; a process
that joined a process group ends without interpreter teardown (run_and_exit).

    @user_errors_exit_2
    def main(argv: list[str] | None = None) -> int: ...

ConfigError and DataError (CheckpointError included) carry messages that name the file or key and
the fix, so a traceback would only bury them. Under a launcher every rank raises the same error from
the same config: the line is printed once per node (local rank 0), and a process group is left
without waiting for peers, which fail alike. An error only one rank sees (errors.rank_local: a
corrupt shard it read) is printed by that rank.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

from pipeline.errors import ConfigError, DataError
from pipeline.process_exit import end_process, exit_code_of

EXIT_USER_ERROR = 2
# A launcher stops every rank as soon as one has failed. A rank that leaves the line to local rank 0
# waits this long before it exits (or until the launcher stops it, once rank 0 has printed and
# exited), so that the line is never lost to a faster sibling's exit.
PRINTER_GRACE_S = 5.0


def fail(message: str | Exception, code: int = EXIT_USER_ERROR) -> int:
    """Print `error: message` once per node, leave the process group if one is up; returns `code`."""
    printer = os.environ.get("LOCAL_RANK", "0") == "0" or getattr(message, "rank_local", False)
    if printer:
        print(f"error: {message}", file=sys.stderr, flush=True)
    dist = sys.modules.get("torch.distributed")  # never import torch just to report an error
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if not printer:
        time.sleep(PRINTER_GRACE_S)
    return code


def user_errors_exit_2(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (ConfigError, DataError) as e:
            return fail(e)

    return wrapper


def run_and_exit(main: Callable[[], int | None]) -> NoReturn:
    """End a process that may have joined a process group: `if __name__ == "__main__": run_and_exit(main)`.

    Not `sys.exit(main())`, because gloo's worker threads outlive destroy_process_group (DeepSpeed's
    engine and groups still hold the process groups), and a worker that releases a finished
    collective's tensors once interpreter teardown has begun needs the GIL, which Python 3.11 answers
    by ending that thread inside a C++ destructor: the rank aborts ("terminate called without an
    active exception", exit -6) after a run that trained and saved, and the launcher reports the job
    failed (1 run in ~40 of a 2-rank training on 2 busy cores). So the process ends here, without
    teardown (pipeline.process_exit.end_process): the atexit handlers (W&B, logging, the run-dir
    lock) run and the streams are flushed while the interpreter is whole, then os._exit. An
    unexpected error keeps its traceback and exit code 1; Ctrl-C exits 130.
    """
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):  # sys.exit("message"), as Python itself treats it
        print(code, file=sys.stderr)
    end_process(exit_code_of(code))

"""The one way an entry point reports a user error: one line on stderr, no traceback, exit code 2.

    @user_errors_exit_2
    def main(argv: list[str] | None = None) -> int: ...

ConfigError and DataError (CheckpointError included) carry messages that name the file or key and
the fix, so a traceback would only bury them. Under a launcher every rank raises the same error from
the same config: the line is printed once per node (local rank 0), and a process group is left
without waiting for peers, which fail alike.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

from pipeline.errors import ConfigError, DataError

EXIT_USER_ERROR = 2


def fail(message: str, code: int = EXIT_USER_ERROR) -> int:
    """Print `error: message` once per node, leave the process group if one is up; returns `code`."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    dist = sys.modules.get("torch.distributed")  # never import torch just to report an error
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return code


def user_errors_exit_2(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (ConfigError, DataError) as e:
            return fail(str(e))

    return wrapper

"""Ending a process that joined a gloo process group without interpreter teardown.

Why: gloo's worker threads outlive `destroy_process_group` (DeepSpeed's engine and groups keep the
process groups alive, partly through references the garbage collector cannot see, so they cannot
be released either). A worker that releases a finished collective's tensors once interpreter
teardown has begun needs the GIL, which Python 3.11 answers by ending that thread inside a C++
destructor: the rank aborts ("terminate called without an active exception", exit -6) after a run
that trained and saved, and the launcher reports the job failed. So the process ends while the
interpreter is still whole: non-daemon threads joined, atexit handlers run, streams flushed, then
os._exit with the exit code.

Two ways in:
- `pipeline.cli.run_and_exit(main)`: our entry points, which know their exit code;
- `end_at_interpreter_exit()`: for a library user's own script (Trainer.close() calls it), which
  returns or raises as any script does. An atexit handler, kept last, runs the other handlers and
  ends the process with the code Python would have used: 1 after an uncaught exception (130 for
  Ctrl-C), the code given to sys.exit, else 0.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def end_process(code: int, join_threads: bool = True) -> NoReturn:
    """What interpreter teardown would have done first, then os._exit(code): wait for non-daemon
    threads (not when stopping at once: one may be what we cannot wait for), run the atexit
    handlers, flush stdout and stderr."""
    if _installed is not None:  # the process ends here, with this code
        atexit.unregister(_installed.at_exit)
    try:
        for thread in threading.enumerate() if join_threads else []:
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing left to flush into
                pass
        os._exit(code)


def exit_code_of(code: object) -> int:
    """The process exit code Python gives `sys.exit(code)` (a message is printed and exits 1)."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


class _ExitAtInterpreterExit:
    """The installed hooks: sys.excepthook and sys.exit wrapped to note the exit code (each calls
    the original), and an atexit handler that ends the process."""

    def __init__(self):
        self.code = 0
        self.registered_at = 0  # atexit's callback count right after ours was registered
        self.excepthook, self.exit = sys.excepthook, sys.exit
        sys.excepthook, sys.exit = self.note_exception, self.note_exit

    def note_exception(self, kind, value, tb) -> None:
        self.code = 130 if issubclass(kind, KeyboardInterrupt) else 1
        self.excepthook(kind, value, tb)

    def note_exit(self, code: object = None) -> NoReturn:
        self.code = exit_code_of(code)
        self.exit(code)

    def register_last(self) -> None:
        atexit.unregister(self.at_exit)
        atexit.register(self.at_exit)
        self.registered_at = atexit._ncallbacks()  # grows with every registration, never shrinks

    def at_exit(self) -> None:
        if atexit._ncallbacks() != self.registered_at:
            # A handler registered after ours has run already and would run twice: leave the
            # ending to Python (the abort this module prevents becomes possible again).
            return
        end_process(self.code)  # runs the handlers registered before ours, in their order


_installed: _ExitAtInterpreterExit | None = None


def end_at_interpreter_exit() -> None:
    """From now on the process ends at interpreter exit without teardown (see the module docstring).
    Calling it again keeps one handler and moves it last."""
    global _installed
    if _installed is None:
        _installed = _ExitAtInterpreterExit()
    _installed.register_last()

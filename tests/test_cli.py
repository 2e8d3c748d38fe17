"""How entry points end (pipeline/cli.py): one line for a user error; no interpreter teardown after
a process group, with the exit code, traceback, atexit handlers and buffered output a normal exit gives."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.ranks import rank_env, torchrun

SCRIPTS = Path(__file__).parent / "scripts"


def test_rank_whose_last_collective_ends_in_teardown_exits_0():
    proc = torchrun(2, [str(SCRIPTS / "late_collective.py")], timeout=120)
    assert "terminate called" not in proc.stderr
    for rank in (0, 1):  # the unflushed last line, then the atexit handler: both before the exit
        assert f"rank {rank}: main returnedrank {rank}: atexit handlers ran" in proc.stdout


def python_c(code: str) -> subprocess.CompletedProcess:
    """`python -c code` from the repo root, an atexit handler printing 'atexit' registered first."""
    code = "import atexit, sys\natexit.register(print, 'atexit', flush=True)\n" + code
    return subprocess.run([sys.executable, "-c", code], env=rank_env(), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)


def run_and_exit_on(body: str) -> subprocess.CompletedProcess:
    return python_c(f"from pipeline.cli import run_and_exit\ndef main():\n    {body}\nrun_and_exit(main)\n")


def test_run_and_exit_keeps_what_a_normal_exit_gives():
    proc = run_and_exit_on("print('done', end=''); return 3")
    assert (proc.returncode, proc.stdout) == (3, "doneatexit\n")
    proc = run_and_exit_on("raise RuntimeError('boom')")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "RuntimeError: boom" in proc.stderr
    assert proc.stdout == "atexit\n"
    proc = run_and_exit_on("sys.exit('stopped: reason')")
    assert (proc.returncode, proc.stderr.strip()) == (1, "stopped: reason")
    proc = run_and_exit_on("return None")
    assert proc.returncode == 0


def end_at_exit_on(body: str) -> subprocess.CompletedProcess:
    """A script that installed pipeline.process_exit.end_at_interpreter_exit (as Trainer.close() does
    on gloo) and then ends by `body`."""
    return python_c("from pipeline.process_exit import end_at_interpreter_exit\nend_at_interpreter_exit()\n"
                    f"print('done', end='')\n{body}\n")


def test_exit_at_interpreter_exit_keeps_the_exit_code_and_handlers():
    proc = end_at_exit_on("pass")
    assert (proc.returncode, proc.stdout) == (0, "doneatexit\n")
    proc = end_at_exit_on("sys.exit(3)")
    assert (proc.returncode, proc.stdout) == (3, "doneatexit\n")
    proc = end_at_exit_on("sys.exit('stopped: reason')")
    assert (proc.returncode, proc.stderr.strip()) == (1, "stopped: reason")
    proc = end_at_exit_on("raise RuntimeError('boom')")
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr and proc.stdout == "doneatexit\n"
    # A handler registered later has already run when ours would: Python ends the process itself.
    proc = end_at_exit_on("atexit.register(print, 'later', flush=True)")
    assert (proc.returncode, proc.stdout) == (0, "donelater\natexit\n")


def test_run_and_exit_keeps_its_code_after_the_exit_was_installed():
    proc = run_and_exit_on("from pipeline.process_exit import end_at_interpreter_exit\n"
                           "    end_at_interpreter_exit(); return 3")
    assert (proc.returncode, proc.stdout) == (3, "atexit\n")

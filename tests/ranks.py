"""Real ranks for tests, one convention: a multi-rank test runs a rank script
(tests/<area>/scripts/NAME.py, whose docstring starts "Rank script for tests/...", ending through
pipeline.cli.run_and_exit) or `-m pipeline.train` under `torchrun(n, args)` on CPU over gloo.

    proc = torchrun(2, [str(SCRIPTS / "name.py"), out])       # raises with the ranks' output on failure
    env = rank_env()                                           # for launching ranks another way
    port = free_port()                                         # for launchers that need a fixed port
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import psutil

from tests.conftest import REPO_ROOT


def rank_env() -> dict[str, str]:
    """This environment, with one intra-op thread per rank and this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it. Killing the launcher alone leaves its ranks
    running (torchrun puts them in sessions of their own), holding the cores, the memory and the
    output pipes from the tests after a timed-out one."""
    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)


def torchrun(nproc: int, args: list[str], timeout: int = 300, check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Real ranks on CPU over gloo: `torchrun --standalone --nproc_per_node N ARGS` from the repo root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    with subprocess.Popen(cmd, env={**rank_env(), **(env or {})}, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as launcher:
        try:
            stdout, stderr = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(launcher.pid)
            stdout, stderr = launcher.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr) from None
    proc = subprocess.CompletedProcess(cmd, launcher.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc

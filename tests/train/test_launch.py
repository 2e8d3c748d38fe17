"""The launch scripts: single_node.sh really trains with 2 CPU ranks under the deepspeed launcher
(and equals the single-process reference); the multi-node and SLURM scripts, which need a cluster,
are checked for syntax, for the hostfile they build and for a launcher command that DeepSpeed's own
argument parser and our trainer's accept."""

from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from deepspeed.launcher.runner import fetch_hostfile
from deepspeed.launcher.runner import parse_args as parse_deepspeed_args

from pipeline.checkpoint import read_latest
from pipeline.distributed.process_group import SHM_DIR
from pipeline.train.__main__ import parse_args as parse_train_args
from tests.conftest import REPO_ROOT
from tests.ranks import free_port, rank_env
from tests.runs import losses, read_metrics, write_run_config
from tests.train.reference import reference_run

LAUNCH = REPO_ROOT / "launch"
SCRIPTS = ["single_node.sh", "multi_node_hostfile.sh", "slurm.sbatch", "prepare_array.sbatch"]


def bash(script: str, *args: str, env: dict | None = None, cwd: Path = REPO_ROOT, timeout: int = 60):
    """Run a launch script with this environment, less a MASTER_PORT of the caller's (the scripts'
    own default port is under test), plus `env`."""
    inherited = {k: v for k, v in rank_env().items() if k != "MASTER_PORT"}
    return subprocess.run(["bash", str(LAUNCH / script), *args], env={**inherited, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def launched(proc: subprocess.CompletedProcess) -> list[str]:
    """The command a DRY_RUN=1 script printed (last stdout line, shell-quoted)."""
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout.strip().splitlines()[-1])


def check_deepspeed_command(cmd: list[str], config: Path, overrides: list[str]):
    """Parse with DeepSpeed's launcher and our trainer: every flag must exist and reach its target."""
    assert cmd[0] == "deepspeed"
    ds = parse_deepspeed_args(cmd[1:])
    assert ds.module and ds.user_script == "pipeline.train"
    train = parse_train_args(ds.user_args)
    assert train.config == str(config) and train.overrides == overrides
    return ds


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_strict(script):
    text = (LAUNCH / script).read_text()
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0
    assert "set -euo pipefail" in text
    assert text.startswith("#!/usr/bin/env bash\n# ")  # usage comment right under the shebang


def test_single_node_trains_with_two_cpu_ranks(prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir, train={"steps": 10})
    # Called from another directory, with overrides passed through to the trainer.
    port = free_port()
    proc = bash("single_node.sh", str(cfg), "train.steps=3", "train.micro_batch_size=2",
                env={"NPROC": "2", "MASTER_PORT": str(port)}, cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "--local_rank=0" in out and "--local_rank=1" in out, "deepspeed did not spawn 2 ranks"
    assert "world 2, ep 2" in out
    # DeepSpeed's shared-memory all-reduce (on under this launcher) left 69 MB per rank in RAM per run.
    assert not sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "shared memory left behind"

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["perf/consumed_samples"] == 3 * 2 * 2  # steps x micro batch x 2 ranks
    # The launched job is the right 2-rank job: same losses as one process over both ranks' samples.
    ref, _ = reference_run(cfg, world=2, overrides=["train.steps=3"])
    for step, loss in losses(run_dir).items():
        assert math.isclose(loss, ref[step]["total"], abs_tol=1e-5), (step, loss, ref[step]["total"])


def test_restarts_resume_a_crashed_job_but_not_a_user_error(prepared_data, tmp_path):
    # Rank 1 dies at step 2 of the first attempt (after the step-1 checkpoint): the supervisor
    # (RESTARTS) starts the job again, which resumes from step 1 and finishes.
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, run_dir, train={"steps": 3, "save_interval": 1})
    env = {"NPROC": "2", "MASTER_PORT": str(free_port()), "RESTARTS": "2", "RESTART_BACKOFF_S": "0",
           "PIPELINE_INJECT_NAN": "crash:1:2"}
    proc = bash("single_node.sh", str(cfg), env=env, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "PIPELINE_INJECT_NAN: crashing at step 2" in out and "resumed from" in out
    log = [line.split(" ", 2)[2] for line in (run_dir / "supervise.log").read_text().splitlines()]
    assert log == ["the job failed (exit code 1 at step 1); restart 1 of 2 in 0 s", "the job ended (exit code 0)"]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]  # the crashed step 2 was never logged
    assert read_latest(run_dir / "checkpoints") == "step_3"

    # A user error (exit 2) is reported once and not retried.
    proc = bash("single_node.sh", str(cfg), "train.steps=three", env=env, timeout=200)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-6000:]
    assert proc.stderr.count("supervise:") == 1 and "user error" in proc.stderr
    assert "train.steps" in proc.stderr


def fake_slurm(tmp_path: Path) -> dict:
    """PATH with an `scontrol` that logs its calls (one host, n1) and a `deepspeed` that runs until a
    signal: exit 0 on USR1 (as our ranks do after their checkpoint), 143 on TERM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/scontrol.log\n'
                                      '[[ "$1" != show ]] || echo n1\n')
    (bin_dir / "deepspeed").write_text(f"#!/usr/bin/env bash\ntrap 'exit 0' USR1\ntrap 'exit 143' TERM\n"
                                       f"touch {tmp_path}/running\nwhile :; do sleep 0.1; done\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**rank_env(), "PATH": f"{bin_dir}:{rank_env()['PATH']}", "SLURM_JOB_NODELIST": "n1",
            "SLURM_JOB_ID": "4242", "HOSTFILE": str(tmp_path / "hostfile"), "SLURM_GPUS_ON_NODE": "1"}


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_slurm_requeues_after_the_time_limit_warning_only(tmp_path, sig, requeued):
    """What SLURM does (--signal=B:USR1@120 signals this script) cannot run here: the script's part can."""
    assert "#SBATCH --signal=B:USR1@120" in (LAUNCH / "slurm.sbatch").read_text()
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "launch/configs/quickstart.yaml"],
                            env=fake_slurm(tmp_path), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "running").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, sig)  # B: the batch shell alone; it forwards to the job
    assert proc.wait(timeout=30) == (0 if requeued else 143)
    calls = (tmp_path / "scontrol.log").read_text().splitlines()
    assert calls == ["show hostnames n1"] + (["requeue 4242"] if requeued else []), proc.stdout.read()


def no_gpu_path(tmp_path: Path) -> str:
    """PATH with an `nvidia-smi` that finds no GPU (so the test means the same on GPU machines)."""
    fake = tmp_path / "nogpu"
    fake.mkdir(exist_ok=True)
    (fake / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'No devices were found'\nexit 6\n")
    (fake / "nvidia-smi").chmod(0o755)
    return f"{fake}:{rank_env()['PATH']}"


def test_single_node_without_gpu_uses_nproc_ranks(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: {train: [x]}\n")
    for nproc in ("2", "3"):
        env = {"DRY_RUN": "1", "NPROC": nproc, "PATH": no_gpu_path(tmp_path)}
        proc = bash("single_node.sh", "run.yaml", "a.b=1", env=env, cwd=tmp_path)
        ds = check_deepspeed_command(launched(proc), cfg, ["a.b=1"])
        assert ds.num_gpus == int(nproc) and ds.master_port == 29500


def test_hostfile_example_is_valid_for_deepspeed():
    hosts = fetch_hostfile(str(LAUNCH / "hostfile.example"))
    assert list(hosts) == [f"node{i}" for i in range(1, 9)] and set(hosts.values()) == {8}


def test_multi_node_command(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: {train: [x]}\n")
    proc = bash("multi_node_hostfile.sh", str(LAUNCH / "hostfile.example"), str(cfg), "train.steps=5",
                env={"DRY_RUN": "1", "MASTER_PORT": "29611"})
    ds = check_deepspeed_command(launched(proc), cfg, ["train.steps=5"])
    assert ds.hostfile == str(LAUNCH / "hostfile.example") and ds.launcher == "pdsh"
    assert ds.master_addr == "node1" and ds.master_port == 29611  # first host of the hostfile

    proc = bash("multi_node_hostfile.sh", str(tmp_path / "missing"), str(cfg), env={"DRY_RUN": "1"})
    assert proc.returncode == 2 and "hostfile" in proc.stderr


def fake_scontrol(tmp_path: Path, nodelist: str, hosts: list[str]) -> str:
    """PATH with an `scontrol` that expands exactly `nodelist` (and fails on anything else)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'[[ "$*" == {shlex.quote("show hostnames " + nodelist)} ]] || {{ echo "bad args: $*" >&2; exit 1; }}\n'
        f"printf '%s\\n' {' '.join(hosts)}\n"
    )
    script.chmod(0o755)
    return f"{bin_dir}:{rank_env()['PATH']}"


def slurm_env(tmp_path: Path, nodelist: str, hosts: list[str], **extra) -> dict:
    return {"PATH": fake_scontrol(tmp_path, nodelist, hosts), "SLURM_JOB_NODELIST": nodelist,
            "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO_ROOT), "HOSTFILE": str(tmp_path / "hostfile"),
            "DRY_RUN": "1", **extra}


def test_slurm_builds_hostfile_and_deepspeed_command(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: {train: [x]}\n")
    env = slurm_env(tmp_path, "gpu-[07-08],gpu-11", ["gpu-07", "gpu-08", "gpu-11"], GPUS_PER_NODE="4")
    proc = bash("slurm.sbatch", str(cfg), "train.steps=9", "data.seq_len=64", env=env)
    ds = check_deepspeed_command(launched(proc), cfg, ["train.steps=9", "data.seq_len=64"])

    hostfile = tmp_path / "hostfile"
    assert hostfile.read_text() == "gpu-07 slots=4\ngpu-08 slots=4\ngpu-11 slots=4\n"
    assert dict(fetch_hostfile(str(hostfile))) == {"gpu-07": 4, "gpu-08": 4, "gpu-11": 4}
    assert ds.hostfile == str(hostfile) and ds.launcher == "pdsh" and not ds.no_ssh_check
    assert ds.master_addr == "gpu-07" and ds.master_port == 29500


def test_slurm_defaults_single_node_and_torchrun(tmp_path):
    # No CONFIG argument: the 1-node default; 8 GPUs per node unless SLURM says otherwise.
    env = slurm_env(tmp_path, "h100-a1", ["h100-a1"])
    ds = check_deepspeed_command(launched(bash("slurm.sbatch", "train.steps=2", env=env)),
                                 LAUNCH / "configs" / "gpt-oss-20b-1node.yaml", ["train.steps=2"])
    assert (tmp_path / "hostfile").read_text() == "h100-a1 slots=8\n"
    assert ds.no_ssh_check  # one node: deepspeed starts the ranks locally, ssh is not needed

    env = slurm_env(tmp_path, "n[1-2]", ["n1", "n2"], LAUNCHER="torchrun", SLURM_GPUS_ON_NODE="2")
    cmd = launched(bash("slurm.sbatch", "launch/configs/gpt-oss-120b-8node.yaml", env=env))
    torchrun = cmd.index("torchrun")
    assert cmd[:torchrun] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    flags = dict(zip(cmd[torchrun + 1 : cmd.index("-m") : 2], cmd[torchrun + 2 : cmd.index("-m") : 2], strict=True))
    assert flags == {"--nnodes": "2", "--nproc_per_node": "2", "--rdzv_id": "4242", "--rdzv_backend": "c10d",
                     "--rdzv_endpoint": "n1:29500"}
    assert cmd[cmd.index("-m") :] == ["-m", "pipeline.train", "--config",
                                      str(LAUNCH / "configs" / "gpt-oss-120b-8node.yaml")]


def test_slurm_outside_an_allocation_fails_clearly(tmp_path):
    env = {k: v for k, v in {**rank_env(), **slurm_env(tmp_path, "x", ["x"])}.items() if k != "SLURM_JOB_NODELIST"}
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch")], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "submit with sbatch" in proc.stderr


def test_prepare_array_passes_task_flags_that_prepare_accepts():
    from pipeline.prepare import build_parser

    array = {"DRY_RUN": "1", "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "4",
             "SLURM_CPUS_PER_TASK": "16"}
    cmd = launched(bash("prepare_array.sbatch", "--input", "a b.jsonl", "--output", "data/x", env=array))
    assert cmd[1:3] == ["-m", "pipeline.prepare"]
    args = build_parser().parse_args(cmd[3:])
    assert args.input == ["a b.jsonl"] and (args.num_tasks, args.task_index, args.workers) == (4, 2, 16)
    # Rerunning one task alone (`NUM_TASKS=4 sbatch --array=3`): the array says 1 task starting at 3.
    rerun = {**array, "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "1"}
    args = build_parser().parse_args(launched(bash("prepare_array.sbatch", "--input", "x", "--output", "o",
                                                   "--workers", "2", env={**rerun, "NUM_TASKS": "4"}))[3:])
    assert (args.num_tasks, args.task_index, args.workers) == (4, 3, 2)
    proc = bash("prepare_array.sbatch", "--input", "x", "--output", "o", env=rerun)
    assert proc.returncode == 2 and proc.stderr.startswith("error: array indices are task indices and start at 0")
    merge = {k: v for k, v in array.items() if not k.startswith("SLURM_ARRAY")}
    assert launched(bash("prepare_array.sbatch", "--merge", "data/x", env=merge))[3:] == ["--merge", "data/x"]

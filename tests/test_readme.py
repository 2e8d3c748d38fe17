"""Every command in README.md is run: here, by the end-to-end test, or by CI itself.

Commands are read from the README's ```bash blocks, so a new README command fails
`test_every_readme_command_is_covered` until something runs it. Commands that need GPUs or a
cluster (the launchers) run in their scripts' DRY_RUN mode, which prints the exact launcher
command; everything else runs for real on inputs generated in a sandbox, with only sizes scaled
down (SCALE_DOWN) so it fits 2 CPU cores.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tests.conftest import REPO_ROOT
from tests.ranks import rank_env

README = REPO_ROOT / "README.md"
RUN_BY_CI = ("pip install -r requirements.txt -e .", "python -m pytest tests -q")
RUN_BY_E2E = ("bash launch/quickstart.sh",)
PREPARE_ARRAY = "launch/prepare_array.sbatch"  # run under a stand-in sbatch (test_readme_prepare_array_...)
LAUNCHERS = ("bash launch/single_node.sh", "bash launch/multi_node_hostfile.sh", "sbatch ", "deepspeed ")
SCALE_DOWN = {"--vocab-size 32000": "--vocab-size 400", "--workers 8": "--workers 2",
              "python -m pipeline.model": "python -m pipeline.model --preset debug",
              "python -m pipeline.train.single_process":
                  "python -m pipeline.train.single_process --max-bytes 6000 --epochs 1"}


def readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+", " ", line.split(" #")[0] if not line.startswith("#") else "").strip()
            if line:
                commands.append(line)
    return commands


def classify(command: str) -> str:
    if PREPARE_ARRAY in command:
        return "prepare_array"
    if command in RUN_BY_CI:
        return "ci"
    if command in RUN_BY_E2E:
        return "e2e"
    if command.startswith(LAUNCHERS):
        return "launcher"
    return "sandbox"


def test_every_readme_command_is_covered():
    commands = readme_commands()
    assert len(commands) >= 15
    ci_script = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        kind = classify(command)
        if kind == "ci":
            assert any(line.strip() == command or line.strip().endswith(f" {command}") for line in ci_script), command
        elif kind == "e2e":
            assert command.split()[1] in (REPO_ROOT / "tests" / "e2e" / "test_quickstart.py").read_text()
    # What runs in the sandbox must be runnable on a CPU machine without a cluster.
    for command in sandbox_commands():
        assert command.startswith(("python -m pipeline.", "torchrun ", "tensorboard ")), command


def sandbox_commands() -> list[str]:
    return [c for c in readme_commands() if classify(c) == "sandbox"]


def make_inputs(root: Path) -> None:
    """The files the README's data-prep examples name, made from real text."""
    std = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8") for p in sorted((std / "json").glob("*.py"))]
    texts += [p.read_text(encoding="utf-8") for p in sorted((std / "email").glob("*.py"))[:8]]
    (root / "corpus").mkdir()
    for i in range(2):
        lines = "".join(json.dumps({"text": t, "id": j}) + "\n" for j, t in enumerate(texts[i::2]))
        (root / "corpus" / f"part{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    (root / "books").mkdir()
    for i, t in enumerate(texts[:5]):
        (root / "books" / f"book{i}.txt").write_text(t)
    pq.write_table(pa.table({"text": texts[5:]}), root / "wiki.parquet")
    # A Hugging Face tokenizer directory, trained here (no Hub).
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(
        root / "path" / "to" / "hf_tokenizer_dir"
    )
    # gzip'd JSONL is a documented format too; keep one around so the dir mixes formats.
    with gzip.open(root / "corpus" / "extra.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": texts[0]}) + "\n")


def run(command: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    for old, new in SCALE_DOWN.items():
        command = command.replace(old, new)
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=rank_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def run_tensorboard(command: str, cwd: Path) -> None:
    """Starts the server, waits until it serves, stops it (loopback only)."""
    args = shlex.split(command) + ["--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(args, cwd=cwd, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if "TensorBoard" in line and "http://" in line:
                break
            assert time.monotonic() < deadline, "tensorboard did not start"
        else:
            pytest.fail("tensorboard exited before serving")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_readme_commands_run_in_a_sandbox(tmp_path):
    make_inputs(tmp_path)
    # The quickstart's data, which the README's training and export examples use.
    run("python -m pipeline.prepare --input stdlib: --output data/stdlib --train-tokenizer bpe --vocab-size 4096 "
        "--tokenizer-sample-bytes 4000000 --no-progress", tmp_path)
    outputs = {}
    for command in sandbox_commands():
        if command.startswith("tensorboard "):
            run_tensorboard(command, tmp_path)
        else:
            outputs[command] = run(command, tmp_path).stdout
    assert (tmp_path / "data" / "web" / "manifest.json").is_file()
    assert json.loads((tmp_path / "data" / "mix" / "manifest.json").read_text())["tokenizer"]["type"] == "huggingface"
    assert (tmp_path / "runs" / "quickstart" / "export" / "config.json").is_file()
    generated = next(out for cmd, out in outputs.items() if "pipeline.generate" in cmd)
    assert generated.startswith("def ")
    planned = next(out for cmd, out in outputs.items() if "--preset gpt-oss-120b" in cmd)
    assert "116.83B" in planned and "5.13B" in planned


def test_readme_launcher_commands_dry_run(tmp_path):
    """The cluster commands print the launcher command they would run (no GPUs here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # sbatch runs the script on the first allocated node; here bash runs it with SLURM's variables
    # and an `scontrol` that expands the node list as SLURM would.
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-%s\\n' 1 2 3 4 5 6 7 8\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = dict(rank_env(), DRY_RUN="1", PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-node-[1-8]",
               SLURM_JOB_ID="42", SLURM_NNODES="8", SLURM_GPUS_ON_NODE="8", TMPDIR=str(tmp_path))
    for command in (c for c in readme_commands() if classify(c) == "launcher"):
        argv = shlex.split(command)
        if argv[0] == "sbatch":
            argv = ["bash", *[a for a in argv[1:] if not a.startswith("--nodes")]]
        if argv[0] == "deepspeed":
            # The bare launcher line is what single_node.sh runs on 8 GPUs; check it prints exactly that.
            config = argv[argv.index("--config") + 1]
            argv = ["bash", "launch/single_node.sh", config]
            env["NPROC"] = "8"
        proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        printed = proc.stdout.strip().splitlines()[-1]
        assert "--module pipeline.train --config" in printed, printed
        config = next(a for a in shlex.split(command) if a.endswith(".yaml"))
        assert str(REPO_ROOT / config) in printed or config in printed, printed
        if command.startswith("deepspeed"):
            assert "--num_gpus 8" in printed
        if "hostfile" in command or command.startswith("sbatch"):
            assert "--hostfile" in printed


# Runs a job at once, as SLURM would on a node: each index of an --array in turn, with SLURM's variables.
STAND_IN_SBATCH = """#!/usr/bin/env bash
set -euo pipefail
array="" args=()
for a in "$@"; do
    case "$a" in --array=*) array=${a#--array=} ;; --parsable|--dependency=*) ;; *) args+=("$a") ;; esac
done
if [[ -n "$array" ]]; then
    lo=${array%-*} hi=${array#*-}
    for ((i = lo; i <= hi; i++)); do
        SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_MIN=$lo SLURM_ARRAY_TASK_COUNT=$((hi - lo + 1)) \
            SLURM_CPUS_PER_TASK=1 bash "${args[@]}" >&2
    done
else
    bash "${args[@]}" >&2
fi
echo 41
"""


def test_readme_prepare_array_commands_run_under_a_stand_in_sbatch(tmp_path):
    """The README's SLURM array prepare, run for real (array tasks one after another), equals the
    single-task prepare of the same inputs and verifies."""
    from tests.data.test_prepare_tasks import single_vs_merged

    commands = [c for c in readme_commands() if classify(c) == "prepare_array"]
    assert len(commands) == 2 and "--array=" in commands[0] and "--merge" in commands[1]
    make_inputs(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(STAND_IN_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    # Submitted from the sandbox (where the data paths point); sbatch runs a spool copy of the script,
    # which finds the repo through REPO.
    (tmp_path / "launch").symlink_to(REPO_ROOT / "launch")
    env = dict(rank_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", REPO=str(REPO_ROOT))
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(commands)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = tmp_path / shlex.split(commands[1])[-1]
    n = int(re.search(r"--array=0-(\d+)", commands[0]).group(1)) + 1
    assert f"merged the {n} tasks" in proc.stderr and f"merged {n} tasks" in proc.stderr
    assert sorted(p.name for p in (out / "tasks").iterdir()) == [f"task_{i:05d}_of_{n:05d}" for i in range(n)]
    single = shlex.split(commands[0].split("launch/prepare_array.sbatch ")[1].rstrip(")"))
    single = [a.replace(str(out.name), "single") for a in single]
    run(shlex.join(["python", "-m", "pipeline.prepare", *single, "--no-progress"]), tmp_path)
    single_vs_merged(tmp_path / "data" / "single", out, nonempty=("train",))  # valid: 1% of few docs
    run(f"python -m pipeline.prepare --verify {out}", tmp_path)


def test_readme_python_snippet_runs(capsys):
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(code) == 1
    namespace: dict = {}
    exec(compile(code[0], str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["out"].shape == (1, 58)
    assert "val ppl" in capsys.readouterr().out
    assert sys.modules.get("pipeline.train.single_process") is not None

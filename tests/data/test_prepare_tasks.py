"""Prepare across nodes: N tasks (real processes, one SIGKILLed and rerun) each tokenise their share of
the inputs, one merge writes the manifest, and the merged dir holds exactly the documents of a
single-task prepare of the same inputs, verifies and trains. Bad merges stop with one line."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.tasks import resolve_task, task_dir
from pipeline.errors import ConfigError
from tests.data.conftest import make_docs, run_prepare, write_jsonl
from tests.data.reader_util import read_mmidx
from tests.data.test_resume_verify import _cli, kill_after_shards
from tests.runs import losses, train, write_run_config


def documents(data_dir: Path, split: str) -> Counter:
    """The multiset of per-document token sequences of `split`, read with the independent reader from
    the shards the manifest lists (in a merged dir they live under tasks/)."""
    m = json.loads((data_dir / "manifest.json").read_text())
    shards = [read_mmidx(data_dir / sh["name"])["sequences"] for sh in m["splits"][split]["shards"]]
    seqs = [tuple(seq.tolist()) for shard in shards for seq in shard]
    assert len(seqs) == m["splits"][split]["documents"]
    return Counter(seqs)


def task_args(out: Path, n: int, i: int, common: list) -> list:
    return [*common, "--output", out, "--num-tasks", n, "--task-index", i]


def single_vs_merged(single: Path, merged: Path, nonempty=("train", "valid")) -> None:
    """Each split holds the same documents (and those in `nonempty` have some: not two empty sets)."""
    for split in ("train", "valid"):
        a, b = documents(single, split), documents(merged, split)
        assert a == b and (sum(a.values()) > 0 or split not in nonempty), split


def mixed_inputs(root: Path) -> list[Path]:
    """A JSONL big enough for several shards per task, a Parquet file of 6 row groups and a .jsonl.gz
    (read whole by one task): 3 tasks cut the JSONL and the Parquet file between them."""
    root.mkdir()
    big = write_jsonl(root / "big.jsonl", [d for k in range(6) for d in make_docs(seed=k, n=120)])
    rows = make_docs(seed=20, n=120)
    pq.write_table(pa.table({"text": rows}), root / "rows.parquet", row_group_size=20)
    with gzip.open(root / "small.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in make_docs(seed=30, n=40))
    return [big, root / "rows.parquet", root / "small.jsonl.gz"]


def test_three_tasks_one_killed_merge_equal_a_single_task_prepare(spm_bpe, tmp_path, capsys):
    inputs = mixed_inputs(tmp_path / "in")
    common = ["--input", *inputs, "--tokenizer", spm_bpe, "--shard-size-tokens", "4000", "--valid-fraction", "0.1"]
    single = tmp_path / "single"
    assert run_prepare(capsys, *common, "--output", single)[0] == 0

    out, n = tmp_path / "tasks_out", 3
    proc = _cli(*task_args(out, n, 1, common), "--no-progress")
    kill_after_shards(proc, task_dir(out, 1, n), 1)  # SIGKILL mid-write: task 1 is unfinished
    for i in (0, 2):
        code, stdout, err = run_prepare(capsys, *task_args(out, n, i, common))
        assert code == 0 and "merged" not in stdout, err
    code, _, err = run_prepare(capsys, "--merge", out)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: task 1 of 3 did not finish ({task_dir(out, 1, n)} has no manifest.json); rerun")

    # The rerun resumes task 1 (its finished shards are kept) and, being the last, merges.
    code, stdout, err = run_prepare(capsys, *task_args(out, n, 1, common))
    assert code == 0, err
    assert re.search(r"reused [1-9]\d* verified shard\(s\)", stdout), stdout  # >= 1: SIGKILL lands a moment later
    assert f"merged the 3 tasks into {out / 'manifest.json'}" in stdout
    single_vs_merged(single, out)
    assert run_prepare(capsys, "--verify", out)[0] == 0

    tasks = [json.loads((task_dir(out, i, n) / "manifest.json").read_text()) for i in range(n)]
    parts = [[e.get("part") for e in m["inputs"] if e["path"] == str(inputs[0])] for m in tasks]
    assert all(len(p) == 1 and p[0] for p in parts), "the big JSONL is cut into a byte range per task"
    assert parts[0][0][0] == 0 and parts[0][0][1] == parts[1][0][0] and parts[1][0][1] == parts[2][0][0]
    assert parts[2][0][1] == inputs[0].stat().st_size
    gz = [i for i, m in enumerate(tasks) if any(e["path"] == str(inputs[2]) for e in m["inputs"])]
    assert gz == [2], "a compressed file is read whole by the task holding its first byte"

    merged = json.loads((out / "manifest.json").read_text())
    code, stdout, _ = run_prepare(capsys, "--merge", out)  # merging again: the same manifest
    again = json.loads((out / "manifest.json").read_text())
    assert code == 0 and "merged 3 tasks" in stdout
    assert {k: v for k, v in again.items() if k != "command"} == {k: v for k, v in merged.items() if k != "command"}

    # The trainer reads the merged dir (pipeline.data.build_dataset) with 2 real ranks.
    run_dir = tmp_path / "run"
    train(2, write_run_config(tmp_path / "run.yaml", out, run_dir), "train.steps=4")
    assert sorted(losses(run_dir)) == [1, 2, 3, 4] and all(v == v for v in losses(run_dir).values())

    shard = task_dir(out, 1, n) / "train_00000.bin"  # --verify checks the tasks' shards through the merge
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run_prepare(capsys, "--verify", out)
    assert code == 1 and "tasks/task_00001_of_00003/train_00000.bin: sha256 mismatch" in err


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_one_huge_file_is_split_over_tasks(fmt, spm_bpe, tmp_path, capsys):
    docs = [d for k in range(3) for d in make_docs(seed=k, n=120)]
    if fmt == "jsonl":
        inp = write_jsonl(tmp_path / "one.jsonl", docs)
    else:
        inp = tmp_path / "one.parquet"
        pq.write_table(pa.table({"text": docs}), inp, row_group_size=25)
    common = ["--input", inp, "--tokenizer", spm_bpe, "--valid-fraction", "0.1"]
    assert run_prepare(capsys, *common, "--output", tmp_path / "single")[0] == 0
    out, n = tmp_path / "tasks_out", 4
    for i in range(n):
        assert run_prepare(capsys, *task_args(out, n, i, common))[0] == 0
    single_vs_merged(tmp_path / "single", out)
    tasks = [json.loads((task_dir(out, i, n) / "manifest.json").read_text()) for i in range(n)]
    parts = [m["inputs"][0]["part"] for m in tasks]
    ends = [p[1] for p in parts]
    assert [p[0] for p in parts] == [0, *ends[:-1]], "contiguous parts, each read by one task"
    assert ends[-1] == (inp.stat().st_size if fmt == "jsonl" else pq.ParquetFile(inp).num_row_groups)
    assert all(sum(s["documents"] for s in m["splits"].values()) > 0 for m in tasks)
    assert run_prepare(capsys, "--verify", out)[0] == 0


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    for k in range(3):
        write_jsonl(root / f"part{k}.jsonl", make_docs(seed=40 + k, n=30))
    return root


def _refused(capsys, out, message_start: str, *extra) -> None:
    code, _, err = run_prepare(capsys, "--merge", out, *extra)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"error: {message_start}"), err


@pytest.mark.parametrize("case", ["missing", "duplicate", "tokenizer", "dtype", "split", "task count", "inputs"])
def test_merge_refuses_a_bad_task_in_one_line(case, small_inputs, spm_bpe, spm_unigram, tmp_path, capsys):
    common = ["--input", small_inputs, "--tokenizer", spm_bpe, "--valid-fraction", "0.2"]
    out, n = tmp_path / "out", 3
    other = {"tokenizer": ["--tokenizer", spm_unigram], "dtype": ["--dtype", "int32"],
             "split": ["--valid-fraction", "0.3"], "inputs": ["--input", small_inputs / "part0.jsonl"]}
    for i in (0, 2):
        assert run_prepare(capsys, *task_args(out, n, i, common))[0] == 0
    d1 = task_dir(out, 1, n)
    if case == "missing":
        return _refused(capsys, out, f"task 1 of 3 is missing (no {d1}); run it: python -m pipeline.prepare ")
    if case == "duplicate":
        shutil.copytree(task_dir(out, 0, n), d1)
        return _refused(capsys, out, f"task dir {d1} holds the output of task 0 of 3, not task 1 of 3 (a duplicate")
    if case == "task count":
        assert run_prepare(capsys, *task_args(out, 2, 1, common))[0] == 0
        _refused(capsys, out, f"{out / 'tasks'} holds tasks of two runs (2 and 3 tasks")
        return _refused(capsys, out, f"task dir {task_dir(out, 1, 2)} belongs to a run with another task count "
                        "than 3; remove it", "--num-tasks", "3")
    code, stdout, err = run_prepare(capsys, *task_args(out, n, 1, [*common, *other[case]]))
    assert code == 0 and "not merged: task" in stdout and not (out / "manifest.json").exists(), err
    what = {"tokenizer": "tokenizer", "dtype": "token dtype", "split": "split settings (--valid-fraction / --seed)",
            "inputs": "input list (--input)"}[case]
    _refused(capsys, out, f"task 1 of 3 was prepared with another {what} than task 0 (")


def test_task_index_and_count_from_slurm_array_variables():
    env = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}
    assert resolve_task(None, None, env) == (2, 4)
    assert resolve_task(None, 1, env) == (1, 4)  # a flag wins over the variable
    assert resolve_task(None, None, {}) == (0, 1)
    assert resolve_task(1, None, env) == (0, 1)  # --num-tasks 1: the whole prepare, inside any array job
    with pytest.raises(ConfigError, match=r"--task-index 4 is outside 0..3 .* sbatch --array=0-3"):
        resolve_task(4, 4, {})
    with pytest.raises(ConfigError, match="--num-tasks 3 needs --task-index"):
        resolve_task(3, None, {})


def test_train_tokenizer_is_refused_with_several_tasks(small_inputs, tmp_path, capsys):
    code, _, err = run_prepare(capsys, "--input", small_inputs, "--output", tmp_path / "o", "--train-tokenizer", "bpe",
                               "--vocab-size", "300", "--num-tasks", "2", "--task-index", "0")
    assert code == 2 and err.startswith("error: --num-tasks 2: every task must tokenise with the same tokenizer")


def test_more_tasks_than_whole_files_leaves_tasks_empty(spm_bpe, tmp_path, capsys):
    """Text files are not cut: with 2 files and 4 tasks, two tasks read nothing, and the merge still
    equals the single-task prepare."""
    root = tmp_path / "in"
    root.mkdir()
    for k in range(2):
        (root / f"doc{k}.txt").write_text("\n\n".join(make_docs(seed=50 + k, n=40)), encoding="utf-8")
    common = ["--input", root, "--tokenizer", spm_bpe, "--text-mode", "paragraph", "--valid-fraction", "0.2"]
    assert run_prepare(capsys, *common, "--output", tmp_path / "single")[0] == 0
    out, n = tmp_path / "tasks_out", 4
    for i in range(n):
        assert run_prepare(capsys, *task_args(out, n, i, common))[0] == 0
    tasks = [json.loads((task_dir(out, i, n) / "manifest.json").read_text()) for i in range(n)]
    assert sorted(len(m["inputs"]) for m in tasks) == [0, 0, 1, 1]
    single_vs_merged(tmp_path / "single", out)
    assert run_prepare(capsys, "--verify", out)[0] == 0


def test_tasks_may_read_node_local_copies_of_the_tokenizer(small_inputs, spm_bpe, tmp_path, capsys):
    copy = tmp_path / "node2" / "bpe.model"
    copy.parent.mkdir()
    shutil.copyfile(spm_bpe, copy)
    out, n = tmp_path / "out", 2
    for i, tok in enumerate((spm_bpe, copy)):
        code, stdout, err = run_prepare(capsys, *task_args(out, n, i, ["--input", small_inputs, "--tokenizer", tok]))
        assert code == 0, err
    assert f"merged the 2 tasks into {out / 'manifest.json'}" in stdout

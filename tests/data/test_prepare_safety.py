"""prepare never mixes or loses datasets: an input edited in place (same size, same mtime) is noticed on
resume and by --verify, two prepares into one output dir cannot both run (real processes), an output
inside an input is refused before anything is removed, and --overwrite removes the old dataset only once
the new one is complete (a SIGKILL mid-build leaves the old one verified)."""

from __future__ import annotations

import json
import os
import re
import time

from tests.data.conftest import run_prepare, write_jsonl
from tests.data.test_resume_verify import _cli, big_jsonl, kill_after_shards


def _edit_in_place(path) -> None:
    """Change one byte of text, keeping the size and the modification time (ns)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    i = data.index(b"doc 7:")
    data[i : i + 6] = b"DOC 7:"
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _sharded_prepare(spm_bpe, tmp_path):
    """(input, output dir, prepare arguments) of a prepare that writes several shards."""
    inp, out = big_jsonl(tmp_path), tmp_path / "out"
    return inp, out, ["--input", inp, "--tokenizer", spm_bpe, "--shard-size-tokens", "2000", "--output", out]


def test_input_edited_in_place_is_refused_on_resume_and_caught_by_verify(spm_bpe, tmp_path, capsys):
    inp, out, args = _sharded_prepare(spm_bpe, tmp_path)
    proc = _cli(*args, "--no-progress")
    kill_after_shards(proc, out, 2)
    _edit_in_place(inp)

    code, _, err = run_prepare(capsys, *args)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (f"error: output dir {out} already holds a dataset prepared from different inputs (content "
                           f"changed: {inp}); resuming would mix old and new text: pass --overwrite to rebuild it, "
                           "or choose another --output")

    assert run_prepare(capsys, *args, "--overwrite")[0] == 0
    assert run_prepare(capsys, "--verify", out)[0] == 0
    _edit_in_place(inp)  # again, after a finished prepare: --verify reports it
    code, _, err = run_prepare(capsys, "--verify", out)
    assert code == 1 and f"input {inp}: content changed since prepare" in err


def test_two_prepares_into_one_dir_cannot_both_run(spm_bpe, tmp_path, capsys):
    inp, out, args = _sharded_prepare(spm_bpe, tmp_path)
    first = _cli(*args, "--no-progress")
    deadline = time.time() + 60
    while not (out / ".lock").exists():
        assert first.poll() is None and time.time() < deadline, "the first prepare ended before it was seen"
        time.sleep(0.005)

    code, _, err = run_prepare(capsys, *args)
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"error: {out} is in use by another prepare: pid {first.pid} on ")
    assert "wait for it to finish or stop it, or use another dir" in err

    kill_after_shards(first, out, 1)  # SIGKILL: its lock stays behind, naming a dead pid
    code, stdout, err = run_prepare(capsys, *args)
    assert code == 0, err
    assert f"took over the stale lock {out / '.lock'} of prepare pid {first.pid}" in stdout
    assert not (out / ".lock").exists() and run_prepare(capsys, "--verify", out)[0] == 0


def test_output_inside_an_input_is_refused_before_anything_is_removed(spm_bpe, tmp_path, capsys, docs):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    inp = write_jsonl(corpus / "a.jsonl", docs[:20])
    out = corpus / "out"  # a complete dataset there, prepared from an input outside the corpus dir
    assert run_prepare(capsys, "--input", write_jsonl(tmp_path / "b.jsonl", docs[20:40]), "--tokenizer", spm_bpe,
                       "--output", out)[0] == 0
    before = (out / "manifest.json").read_bytes()
    for output, spec, how in ((out, corpus, "is inside the input"), (corpus, corpus, "is the input"),
                              (corpus, inp, "holds the input")):
        code, _, err = run_prepare(capsys, "--input", spec, "--tokenizer", spm_bpe, "--output", output, "--overwrite")
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"error: --output {output} {how} {spec}: ") and "choose an --output outside" in err
    assert (out / "manifest.json").read_bytes() == before and run_prepare(capsys, "--verify", out)[0] == 0


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete(spm_bpe, tmp_path, capsys, docs):
    inp, out, args = _sharded_prepare(spm_bpe, tmp_path)
    small = write_jsonl(tmp_path / "small.jsonl", docs[:30])
    assert run_prepare(capsys, "--input", small, "--tokenizer", spm_bpe, "--output", out)[0] == 0
    before = (out / "manifest.json").read_bytes()
    (out / "notes.bin").write_text("the user's own file")  # not ours: never removed

    proc = _cli(*args, "--overwrite", "--no-progress")
    kill_after_shards(proc, out / ".overwrite", 1)  # SIGKILL while the new dataset is half built
    assert (out / "manifest.json").read_bytes() == before and run_prepare(capsys, "--verify", out)[0] == 0

    code, stdout, err = run_prepare(capsys, *args, "--overwrite")  # resumes the half-built one, then swaps
    assert code == 0 and f"replaced the dataset in {out}" in stdout, err
    assert re.search(r"reused [1-9]\d* verified shard\(s\)", stdout), stdout
    assert run_prepare(capsys, "--verify", out)[0] == 0
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["documents"] > 30
    assert (out / "notes.bin").read_text() == "the user's own file"
    assert not (out / ".overwrite").exists() and not (out / ".replaced").exists()


def test_a_rerun_on_other_inputs_or_options_says_what_differs(spm_bpe, tmp_path, capsys, docs):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    a = write_jsonl(corpus / "a.jsonl", docs[:20])
    out = tmp_path / "out"
    args = ["--input", corpus, "--tokenizer", spm_bpe, "--output", out]
    assert run_prepare(capsys, *args)[0] == 0

    def refused(*extra) -> str:
        code, _, err = run_prepare(capsys, *args, *extra)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: output dir {out} already holds a dataset prepared from different ")
        assert err.rstrip().endswith("pass --overwrite to replace it (the old one stays until the new one is "
                                     "complete), or choose another --output")
        return err

    assert "(--dtype auto -> int32; --seed 1234 -> 7)" in refused("--dtype", "int32", "--seed", "7")
    assert f"(--tokenizer {spm_bpe.resolve()} -> {a.resolve()})" in refused("--tokenizer", a)
    b = write_jsonl(corpus / "b.jsonl", docs[20:30])
    assert f"different inputs (added: {b})" in refused()
    b.unlink()
    size = a.stat().st_size
    write_jsonl(a, docs[:21])
    assert f"different inputs (size changed: {a} ({size:,} -> {a.stat().st_size:,} bytes))" in refused()
    a.unlink()
    write_jsonl(corpus / "c.jsonl", docs[:20])
    assert f"different inputs (added: {corpus / 'c.jsonl'}; removed: {a})" in refused()

"""Bad input: a clear error naming file / line / byte offset, or a counted and reported skip."""

from __future__ import annotations

import json

import pytest

from tests.data.conftest import run_prepare, write_jsonl
from tests.data.reader_util import read_split


def _prepare(capsys, spm_bpe, out, *args):
    return run_prepare(capsys, "--output", out, "--tokenizer", spm_bpe, "--valid-fraction", "0", *args)


def _skipped(out) -> dict:
    return json.loads((out / "manifest.json").read_text())["skipped"]


def test_empty_and_binary_files_are_skipped_and_reported(spm_bpe, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.txt").write_text("good document")
    (inp / "empty.txt").write_text("")
    (inp / "blank.txt").write_text("\n \n")
    (inp / "blob.txt").write_bytes(b"MZ\x90\x00\x03\x00\xff\xfe")
    (inp / "image.png").write_bytes(b"\x89PNG")
    code, out, err = _prepare(capsys, spm_bpe, tmp_path / "out", "--input", inp)
    assert code == 0, err
    sk = _skipped(tmp_path / "out")
    assert sk["empty file"]["examples"] == [str(inp / "empty.txt")]
    assert sk["file with only whitespace"]["count"] == 1
    assert sk["binary file (NUL byte)"]["examples"] == [f"{inp / 'blob.txt'}: NUL byte at byte offset 3"]
    assert (
        str(inp / "image.png")
        in sk["file with unsupported extension (use --format to force one)"]["examples"]
    )
    assert "empty file" in out and "binary file" in out  # the summary is printed too
    assert len(read_split(tmp_path / "out", "train")) == 1


def test_invalid_utf8_error_skip_replace(spm_bpe, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\nline two ok\nbroken \xff here\nlast line\n")
    offset = len(b"line one\nline two ok\nbroken ")
    code, _, err = _prepare(capsys, spm_bpe, tmp_path / "o1", "--input", bad, "--text-mode", "line")
    assert code == 2 and err.startswith("error: ")
    assert f"{bad}: invalid UTF-8 at byte offset {offset} (line 3)" in err and "Traceback" not in err
    code, _, err = _prepare(
        capsys, spm_bpe, tmp_path / "o2", "--input", bad, "--text-mode", "line", "--on-invalid-utf8", "skip"
    )
    assert code == 0, err
    assert _skipped(tmp_path / "o2")["document with invalid UTF-8"]["count"] == 1
    assert len(read_split(tmp_path / "o2", "train")) == 3
    code, _, err = _prepare(capsys, spm_bpe, tmp_path / "o3", "--input", bad, "--on-invalid-utf8", "replace")
    assert code == 0, err
    from pipeline.data import load_tokenizer

    tok = load_tokenizer(tmp_path / "o3")
    (doc,) = read_split(tmp_path / "o3", "train")
    assert "broken \ufffd here" in tok.decode(doc[:-1].tolist())
    assert _skipped(tmp_path / "o3")["invalid UTF-8 replaced by U+FFFD"]["count"] == 1


def test_jsonl_malformed_line_and_missing_key(spm_bpe, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"text": "fine"}\n\n{"text": "also fine"\n{"txt": "wrong key"}\n{"text": 5}\n'
        '["list"]\n{"text": ""}\n{"text": "ok"}\n'
    )
    code, _, err = _prepare(capsys, spm_bpe, tmp_path / "o1", "--input", bad)
    assert code == 2 and f"error: {bad}:3: malformed JSON" in err and "--on-bad-record skip" in err
    ok = write_jsonl(tmp_path / "ok.jsonl", ["a"])
    miss = tmp_path / "miss.jsonl"
    miss.write_text('{"text": "a"}\n{"body": "b", "id": 1}\n')
    code, _, err = _prepare(capsys, spm_bpe, tmp_path / "o2", "--input", ok, miss)
    assert code == 2 and f"{miss}:2: record has no key 'text' (keys: body, id); set --text-key" in err
    code, _, err = _prepare(capsys, spm_bpe, tmp_path / "o3", "--input", bad, "--on-bad-record", "skip")
    assert code == 0, err
    sk = _skipped(tmp_path / "o3")
    assert sk["malformed JSON"]["examples"] == [f"{bad}:3"]
    assert sk["record has no key 'text'"]["examples"] == [f"{bad}:4"]
    assert sk["'text' is int, not a string"]["examples"] == [f"{bad}:5"]
    assert sk["record is a JSON list, not an object"]["examples"] == [f"{bad}:6"]
    assert sk["empty document"]["examples"] == [f"{bad}:7"]
    assert len(read_split(tmp_path / "o3", "train")) == 2  # "fine" and "ok"


def test_parquet_missing_column_and_corrupt_gzip(spm_bpe, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    code, _, err = _prepare(capsys, spm_bpe, tmp_path / "o1", "--input", tmp_path / "a.parquet")
    assert code == 2 and "has no column 'text' (columns: body)" in err
    gz = tmp_path / "t.jsonl.gz"
    import gzip

    gz.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:60])
    code, _, err = _prepare(capsys, spm_bpe, tmp_path / "o2", "--input", gz)
    assert code == 2 and f"{gz}: corrupt or truncated compressed file" in err


@pytest.mark.parametrize("policy", ["split", "error", "skip"])
def test_enormous_document_policy(policy, spm_bpe, tmp_path, capsys):
    big = tmp_path / "big.txt"
    lines = [f"line {i} of a very long document" for i in range(400)]
    big.write_text("\n".join(lines) + "\n")
    small = write_jsonl(tmp_path / "s.jsonl", ["small doc"])
    code, _, err = _prepare(
        capsys,
        spm_bpe,
        tmp_path / "o",
        "--input",
        big,
        small,
        "--max-doc-chars",
        "1000",
        "--on-huge-doc",
        policy,
    )
    if policy == "error":
        assert code == 2 and f"{big}: document has more than --max-doc-chars 1,000 characters" in err
        return
    assert code == 0, err
    from pipeline.data import load_tokenizer

    tok = load_tokenizer(tmp_path / "o")
    texts = [tok.decode(s[:-1].tolist()) for s in read_split(tmp_path / "o", "train")]
    key = (
        f"document longer than --max-doc-chars 1000 {'split into pieces' if policy == 'split' else 'skipped'}"
    )
    assert _skipped(tmp_path / "o")[key]["examples"] == [str(big)]
    if policy == "split":
        assert all(len(t) <= 1000 for t in texts) and len(texts) > 10
        assert "".join(texts[:-1]) == big.read_text() and texts[-1] == "small doc"
        assert all(t.endswith("\n") for t in texts[:-2]), "pieces are cut after a newline"
    else:
        assert texts == ["small doc"]


def test_input_and_output_dir_errors(spm_bpe, tmp_path, capsys, docs):
    code, _, err = _prepare(capsys, spm_bpe, tmp_path / "o", "--input", tmp_path / "nope.txt")
    assert code == 2 and f"input {tmp_path / 'nope.txt'} does not exist" in err
    code, _, err = _prepare(capsys, spm_bpe, tmp_path / "o", "--input", str(tmp_path / "*.jsonl"))
    assert code == 2 and "matches no files" in err
    a = write_jsonl(tmp_path / "a.jsonl", docs[:10])
    b = write_jsonl(tmp_path / "b.jsonl", docs[10:20])
    assert _prepare(capsys, spm_bpe, tmp_path / "o", "--input", a)[0] == 0
    code, out, err = _prepare(capsys, spm_bpe, tmp_path / "o", "--input", a)  # same dataset: no-op
    assert code == 0 and "already holds this dataset" in out
    code, _, err = _prepare(capsys, spm_bpe, tmp_path / "o", "--input", b)
    assert (
        code == 2 and "already holds a dataset prepared from different inputs" in err and "--overwrite" in err
    )
    code, _, err = _prepare(capsys, spm_bpe, tmp_path / "o", "--input", b, "--overwrite")
    assert code == 0, err
    assert len(read_split(tmp_path / "o", "train")) == 10
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "x_00000.bin").write_bytes(b"")
    code, _, err = _prepare(capsys, spm_bpe, stray, "--input", a)
    assert code == 2 and "already holds shard/tokenizer files" in err
    code, _, err = run_prepare(capsys, "--input", a, "--output", tmp_path / "o4", "--train-tokenizer", "bpe")
    assert code == 2 and "--vocab-size" in err
    code, _, err = _prepare(capsys, spm_bpe, tmp_path / "o5", "--input", "hf:someone/some_corpus")
    assert code == 2 and "cannot stream Hub dataset 'someone/some_corpus': offline mode" in err

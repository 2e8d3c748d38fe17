"""Round trips through every input format and tokenizer type, checked with an independent reader."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from pipeline.data import load_manifest, load_tokenizer
from pipeline.data.indexed import dtype_for_vocab
from tests.data.conftest import run_prepare, write_jsonl
from tests.data.reader_util import read_mmidx, read_split


def _write_input(fmt: str, root, docs: list[str]):
    """Writes `docs` in format `fmt`; returns (input path, extra CLI args, expected documents)."""
    root.mkdir()
    if fmt == "text-file":
        for i, d in enumerate(docs):
            sub = root / f"part{i % 3}"
            sub.mkdir(exist_ok=True)
            (sub / f"doc{i:04d}.txt").write_text(d, encoding="utf-8")
        walk_order = [d for k in range(3) for i, d in enumerate(docs) if i % 3 == k]  # sorted dirs, files
        return root, ["--text-mode", "file"], walk_order
    if fmt == "text-paragraph":
        (root / "all.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        return root / "all.txt", ["--text-mode", "paragraph"], docs
    if fmt == "text-line":
        lines = [line for d in docs for line in d.split("\n") if line.strip()]
        (root / "all.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return root / "all.txt", ["--text-mode", "line"], lines
    if fmt == "jsonl":
        return write_jsonl(root / "a.jsonl", docs, "content"), ["--text-key", "content"], docs
    if fmt == "jsonl.gz":
        path = root / "a.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        return path, [], docs
    if fmt == "jsonl.zst":
        import zstandard

        path = root / "a.jsonl.zst"
        data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
        return path, [], docs
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(
            pa.table({"body": docs, "n": list(range(len(docs)))}), root / "a.parquet", row_group_size=17
        )
        return root / "*.parquet", ["--text-key", "body"], docs
    if fmt == "hf_disk":
        import datasets

        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "saved"))
        return root / "saved", [], docs
    raise AssertionError(fmt)


def _decoded(out, tok, split):
    eos = tok.eos_id
    texts = []
    for seq in read_split(out, split):
        assert seq[-1] == eos, "every document ends with EOS"
        assert eos not in seq[:-1].tolist()
        texts.append(tok.decode(seq[:-1].tolist()))
    return texts


def _is_subsequence(sub: list, seq: list) -> bool:
    it = iter(seq)
    return all(any(x == y for y in it) for x in sub)


def _check_round_trip(out, expected: list[str]):
    tok = load_tokenizer(out)
    train, valid = _decoded(out, tok, "train"), _decoded(out, tok, "valid")
    assert sorted(train + valid) == sorted(expected)
    assert _is_subsequence(train, expected) and _is_subsequence(valid, expected), "input order is kept"
    assert valid, "the valid split got documents"
    m = load_manifest(out)
    assert m.splits["train"].documents == len(train) and m.splits["valid"].documents == len(valid)
    return m


FORMATS = ["text-file", "text-paragraph", "text-line", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "hf_disk"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_every_format(fmt, docs, spm_bpe, tmp_path, capsys):
    inp, extra, expected = _write_input(fmt, tmp_path / "in", docs)
    out = tmp_path / "out"
    code, stdout, err = run_prepare(
        capsys,
        "--input",
        inp,
        "--output",
        out,
        "--tokenizer",
        spm_bpe,
        "--valid-fraction",
        "0.2",
        "--shard-size-tokens",
        "3000",
        *extra,
    )
    assert code == 0, err
    m = _check_round_trip(out, expected)
    assert len(m.splits["train"].shards) > 1, "the shard size target splits the corpus"


@pytest.mark.parametrize("which", ["spm_bpe", "spm_unigram", "hf_tokenizer_dir"])
def test_round_trip_every_tokenizer(which, request, docs, tmp_path, capsys):
    tok_path = request.getfixturevalue(which)
    inp = write_jsonl(tmp_path / "a.jsonl", docs)
    out = tmp_path / "out"
    code, _, err = run_prepare(
        capsys, "--input", inp, "--output", out, "--tokenizer", tok_path, "--valid-fraction", "0.2", "--bos"
    )
    assert code == 0, err
    tok = load_tokenizer(out)
    m = load_manifest(out)
    assert m.tokenizer["type"] == ("huggingface" if which.startswith("hf") else "sentencepiece")
    assert m.bos_id == tok.bos_id and m.eos_id == tok.eos_id
    if m.bos_id is not None:  # --bos: every document starts with BOS
        assert all(seq[0] == m.bos_id for seq in read_split(out, "train"))
    texts = []
    for split in ("train", "valid"):
        for seq in read_split(out, split):
            body = seq[1:-1] if m.bos_id is not None else seq[:-1]
            texts.append(tok.decode(body.tolist()))
    assert sorted(texts) == sorted(docs)
    # The copied tokenizer is the same file the user passed (identity = sha256).
    assert m.tokenizer["sha256"] == load_tokenizer(tok_path).sha256


def test_independent_reader_matches_format(docs, spm_bpe, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "a.jsonl", docs)
    out = tmp_path / "out"
    assert (
        run_prepare(
            capsys, "--input", inp, "--output", out, "--tokenizer", spm_bpe, "--shard-size-tokens", "5000"
        )[0]
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            r = read_mmidx(out / shard["name"])
            assert r["magic"] == b"MMIDIDX\x00\x00" and r["version"] == 1
            assert r["code"] == 8 and r["dtype"] == np.uint16 and manifest["dtype"] == "uint16"
            assert len(r["sizes"]) == shard["documents"] and int(r["sizes"].sum()) == shard["tokens"]
            assert r["doc_idx"].tolist() == list(range(shard["documents"] + 1))
            assert r["pointers"][0] == 0 and np.all(np.diff(r["pointers"]) == 2 * r["sizes"][:-1])
            assert (out / f"{shard['name']}.bin").stat().st_size == 2 * shard["tokens"]
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"]), split
    # Boundaries: every shard but the last reaches the target; removing its last doc would not.
    for shard in manifest["splits"]["train"]["shards"][:-1]:
        sizes = read_mmidx(out / shard["name"])["sizes"]
        assert sizes.sum() >= 5000 > sizes[:-1].sum()


def test_dtype_boundary_and_ids_above_65535(big_vocab_tokenizer, tmp_path, capsys):
    assert dtype_for_vocab(65_499) == np.uint16 and dtype_for_vocab(65_500) == np.int32
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{i}" for i in rng.integers(0, 69_999, size=rng.integers(5, 50))) for _ in range(60)]
    docs.append("w69998 w65534 w65535 w65536 w0")
    inp = write_jsonl(tmp_path / "a.jsonl", docs)
    out = tmp_path / "out"
    code, _, err = run_prepare(
        capsys,
        "--input",
        inp,
        "--output",
        out,
        "--tokenizer",
        big_vocab_tokenizer,
        "--eos-token",
        "</s>",
        "--valid-fraction",
        "0.1",
    )
    assert code == 0, err
    m = load_manifest(out)
    assert m.vocab_size == 70_001 and m.dtype == np.int32
    seqs = read_split(out, "train") + read_split(out, "valid")
    assert all(read_mmidx(p.with_suffix(""))["code"] == 4 for p in out.glob("*.idx"))
    assert max(int(s.max()) for s in seqs) == 70_000  # ids above 65,535 survive
    tok = load_tokenizer(out)
    assert sorted(tok.decode(s[:-1].tolist()) for s in seqs) == sorted(docs)
    # Forcing uint16 with this tokenizer is refused up front, naming the limit.
    code, _, err = run_prepare(
        capsys,
        "--input",
        inp,
        "--output",
        tmp_path / "o2",
        "--tokenizer",
        big_vocab_tokenizer,
        "--eos-token",
        "</s>",
        "--dtype",
        "uint16",
    )
    assert code == 2 and "70001 ids" in err and "65535" in err


def test_trained_tokenizer_and_workers_give_identical_shards(docs, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "a.jsonl", docs * 3)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        code, stdout, err = run_prepare(
            capsys,
            "--input",
            inp,
            "--output",
            out,
            "--train-tokenizer",
            "unigram",
            "--vocab-size",
            "500",
            "--workers",
            workers,
            "--shard-size-tokens",
            "4000",
            "--valid-fraction",
            "0.2",
        )
        assert code == 0, err
        assert "trained SentencePiece unigram tokenizer" in stdout
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir() if p.suffix in (".bin", ".idx"))
    assert len(names) > 4
    for name in names + ["tokenizer/tokenizer.model"]:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    _check_round_trip(outs[0], docs * 3)


def test_builtin_stdlib_corpus_is_the_standard_library_without_tests():
    import sysconfig
    from pathlib import Path

    from pipeline.data.readers import SkipReport, expand_inputs, stdlib_sources

    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_sources()
    assert str(root / "json" / "decoder.py") in files and str(root / "os.py") in files
    assert len(files) > 300
    parts = {part for f in files for part in Path(f).relative_to(root).parts[:-1]}
    assert not parts & {"site-packages", "test", "tests", "idle_test"}
    sources = expand_inputs(["stdlib:"], "auto", SkipReport())
    assert [s.path for s in sources] == files and {s.kind for s in sources} == {"text"}

"""Megatron prefixes as data sources (pipeline/data/megatron_sources.py): vocabulary from data.tokenizer,
token-id ranges read once and kept in a sidecar (or the run dir), and the data identity of their content.
Real files: shards written as preprocess_data.py writes them, real tokenizers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import xxhash

from pipeline.data import MMapIndexedDataset
from pipeline.data import megatron_sources as ms
from pipeline.data.identity import data_identity, identity_change
from pipeline.errors import ConfigError, DataError
from tests.data.conftest import make_docs
from tests.data.megatron_util import SHIPPED_TOKENIZER, write_megatron_prefix


@pytest.fixture()
def prefix(tmp_path):
    return str(write_megatron_prefix(tmp_path / "corpus" / "web_text_document", make_docs(seed=1, n=40)))


def test_ranges_are_read_once_then_taken_from_the_sidecar(prefix, tmp_path, monkeypatch):
    monkeypatch.setattr(ms, "_CHUNK_BYTES", 64)  # many chunks: the min/max and hash must span them
    facts, read, fell_back = ms.prefix_facts([prefix], tmp_path / "run" / "data_ranges")
    ids = MMapIndexedDataset(prefix).tokens
    f = facts[prefix]
    assert (read, fell_back) == ([prefix], [])
    assert (f["min_id"], f["max_id"]) == (int(ids.min()), int(ids.max())) and f["max_id"] < 384
    with open(f"{prefix}.bin", "rb") as fh:
        assert f["bin_hash"] == "xxh3_128:" + xxhash.xxh3_128(fh.read()).hexdigest()
    sidecar = tmp_path / "corpus" / f"web_text_document{ms.SIDECAR_SUFFIX}"
    written = sidecar.stat().st_mtime_ns
    again, read, _ = ms.prefix_facts([prefix], tmp_path / "run" / "data_ranges")
    assert again == facts and read == [] and sidecar.stat().st_mtime_ns == written
    assert not (tmp_path / "run").exists()

    # Rewritten with the same size (one id changed): its key (size + mtime) no longer matches, so it is read again.
    raw = bytearray(open(f"{prefix}.bin", "rb").read())
    raw[0:2] = np.array([383], np.uint16).tobytes()
    with open(f"{prefix}.bin", "wb") as fh:
        fh.write(raw)
    changed, read, _ = ms.prefix_facts([prefix], tmp_path / "run" / "data_ranges")
    assert read == [prefix] and changed[prefix]["max_id"] == 383 and changed[prefix]["bin_hash"] != f["bin_hash"]


def test_read_only_data_dir_keeps_the_sidecar_in_the_run_dir(prefix, tmp_path):
    data_dir = tmp_path / "corpus"
    if subprocess.run(["chattr", "+i", str(data_dir)], capture_output=True).returncode != 0:  # works for root
        if os.geteuid() == 0:
            pytest.skip("cannot make a directory read-only here (root, and chattr is refused)")
        data_dir.chmod(0o555)
    try:
        facts, read, fell_back = ms.prefix_facts([prefix], tmp_path / "run" / "data_ranges")
        assert read == fell_back == [prefix]
        [kept] = (tmp_path / "run" / "data_ranges").iterdir()
        assert kept.name.startswith("web_text_document-") and json.loads(kept.read_text())["max_id"] == facts[prefix][
            "max_id"]
        again, read, _ = ms.prefix_facts([prefix], tmp_path / "run" / "data_ranges")
        assert again == facts and read == []  # found there on the next start
        note = ms.recorded_notes([prefix], [prefix], tmp_path / "run" / "data_ranges")
        assert "read-only" in note[1] and str(tmp_path / "run" / "data_ranges") in note[1]
    finally:
        subprocess.run(["chattr", "-i", str(data_dir)], capture_output=True)
        data_dir.chmod(0o755)
    assert sorted(p.name for p in data_dir.iterdir()) == ["web_text_document.bin", "web_text_document.idx"]


def test_out_of_range_id_is_one_line_naming_shard_id_and_vocabulary(tmp_path):
    bad = str(write_megatron_prefix(tmp_path / "bad", make_docs(n=5), extra_ids=(5, 400, 7)))
    facts, _, _ = ms.prefix_facts([bad], tmp_path / "run")
    with pytest.raises(DataError) as e:
        ms.check_prefix_ids(facts, 384)
    msg = str(e.value)
    assert "\n" not in msg and f"{bad}.bin holds token id 400" in msg and "vocabulary of size 384" in msg
    ms.check_prefix_ids(facts, 401)  # fits a larger vocabulary


def test_vocabulary_from_data_tokenizer_and_the_manifest_wins(prefix, hf_tokenizer_dir, prepared_data, tmp_path):
    with pytest.raises(ConfigError, match=r"is a Megatron \.bin/\.idx prefix.*set data.tokenizer"):
        ms.run_vocabulary([prefix], None)
    with pytest.raises(DataError, match="neither a prepared data dir nor a Megatron"):
        ms.run_vocabulary([str(tmp_path / "typo")], None)
    with pytest.raises(DataError, match="^data.tokenizer: tokenizer path .* does not exist"):
        ms.run_vocabulary([prefix], str(tmp_path / "nope.model"))
    assert ms.run_vocabulary([[0.5, f"{prefix}.bin"], [0.5, prefix]], str(SHIPPED_TOKENIZER)) == (384, 2)
    hf = ms.tokenizer_facts(hf_tokenizer_dir)
    assert ms.run_vocabulary([prefix], str(hf_tokenizer_dir)) == (hf["vocab_size"], hf["eos_id"])
    assert hf["type"] == "huggingface" and ms.tokenizer_source([prefix], str(hf_tokenizer_dir)) == str(hf_tokenizer_dir)

    # A prepared dir first: its manifest gives the vocabulary, data.tokenizer or not.
    m = json.loads((prepared_data / "manifest.json").read_text())["tokenizer"]
    assert ms.run_vocabulary([str(prepared_data), prefix], str(SHIPPED_TOKENIZER)) == (m["vocab_size"], m["eos_id"])
    same = ms.tokenizer_facts(prepared_data / "tokenizer")
    assert ms.tokenizer_notes([str(prepared_data)], str(prepared_data / "tokenizer"), same) == []
    given = ms.tokenizer_facts(SHIPPED_TOKENIZER)
    [note] = ms.tokenizer_notes([str(prepared_data)], str(SHIPPED_TOKENIZER), given)
    assert f"is not the tokenizer {prepared_data} was prepared with" in note and "manifest's tokenizer is used" in note
    with pytest.raises(DataError, match="Megatron prefixes .* would be read with another tokenizer"):
        ms.tokenizer_notes([str(prepared_data), prefix], str(SHIPPED_TOKENIZER), given)


def test_identity_holds_the_content_and_tokenizer_of_a_prefix(prefix, tmp_path, hf_tokenizer_dir):
    facts, _, _ = ms.prefix_facts([prefix], tmp_path / "run")
    tok = ms.tokenizer_facts(SHIPPED_TOKENIZER)
    ident = data_identity([prefix], 32, 1, facts, tok)
    [entry] = ident["sources"]
    assert entry["tokenizer"] == tok and set(entry["shards"]) == {f"{prefix}.bin", f"{prefix}.idx"}

    copy = tmp_path / "copy"
    copy.mkdir()
    for ext in (".bin", ".idx"):  # new mtimes, same content: the same data
        shutil.copyfile(prefix + ext, copy / f"web_text_document{ext}")
    moved = str(copy / "web_text_document")
    facts2, read, _ = ms.prefix_facts([moved], tmp_path / "run")
    assert read == [moved] and facts2[moved]["bin_hash"] == facts[prefix]["bin_hash"]

    other = str(write_megatron_prefix(tmp_path / "b" / "web_text_document", make_docs(seed=2, n=40)))
    facts3, _, _ = ms.prefix_facts([other], tmp_path / "run")
    assert "holds other shards (missing" in identity_change(ident, data_identity([other], 32, 1, facts3, tok))
    same_files = data_identity([prefix], 32, 1, facts, ms.tokenizer_facts(hf_tokenizer_dir))
    assert "another tokenizer" in identity_change(ident, same_files)
    assert identity_change(ident, data_identity([prefix], 32, 1, facts, tok)) is None
    # Recorded before prefixes carried content and tokenizer (only the .bin size): compared on that alone.
    legacy = {**ident, "sources": [{"path": prefix, "weight": None,
                                    "shards": {f"{prefix}.bin": f"size:{facts[prefix]['bin_size']}"}}]}
    assert identity_change(legacy, ident) is None
    legacy["sources"][0]["shards"][f"{prefix}.bin"] = "size:1"
    assert "holds other shards (changed" in identity_change(legacy, ident)

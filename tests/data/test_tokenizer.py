"""load_tokenizer over every accepted path kind, and the wrapper's contract."""

from __future__ import annotations

import json

import pytest

from pipeline.data import load_tokenizer
from pipeline.errors import DataError

TEXT = "def f(x):\n\treturn  x  # naïve 日本 😀"


@pytest.mark.parametrize("which", ["spm_bpe", "spm_unigram", "hf_tokenizer_dir"])
def test_wrapper_contract(which, request, tmp_path):
    path = request.getfixturevalue(which)
    tok = load_tokenizer(path)
    ids = tok.encode(TEXT)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == TEXT  # exact: identity normalisation / byte-level
    assert tok.encode_batch([TEXT, "a"]) == [ids, tok.encode("a")]
    assert tok.eos_id not in ids and 0 <= tok.eos_id < tok.vocab_size
    # A literal special-token string in the text is text, never a document boundary.
    assert tok.eos_id not in tok.encode("x <|endoftext|> </s> y")
    # The saved copy (what a prepared dir holds) loads to the same tokenizer.
    tok.save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    assert again.encode(TEXT) == ids and (again.eos_id, again.bos_id, again.vocab_size) == (
        tok.eos_id,
        tok.bos_id,
        tok.vocab_size,
    )
    assert again.sha256 == tok.sha256


def test_hf_paths_and_eos_resolution(hf_tokenizer_dir, big_vocab_tokenizer, tmp_path):
    by_dir = load_tokenizer(hf_tokenizer_dir)
    by_file = load_tokenizer(hf_tokenizer_dir / "tokenizer.json")
    assert by_dir.eos_id == by_file.eos_id == 0  # "<|endoftext|>" is the first special token
    big = load_tokenizer(big_vocab_tokenizer)  # "</s>" is a known EOS name
    assert big.eos_id == 0 and big.vocab_size == 70_001
    (tmp_path / "t.json").write_text(json.dumps(json.loads(big_vocab_tokenizer.read_text())))
    cfg = json.loads(big_vocab_tokenizer.read_text())
    cfg["model"]["vocab"].pop("</s>")
    (tmp_path / "noeos.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match="pass --eos-token"):
        load_tokenizer(tmp_path / "noeos.json")
    assert load_tokenizer(tmp_path / "noeos.json", eos_token="w5").eos_id == 7
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")

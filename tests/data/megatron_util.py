"""Megatron `tools/preprocess_data.py` output for tests, written as it writes it (Megatron is not
installed here; our MMIDIDX writer writes its format, tests/data/test_prepare_formats.py reads ours
with an independent reader): each document's ids plus the EOD id (`--append-eod`) as one sequence,
uint16 ids below 65,500 tokens of vocabulary, `PREFIX.bin` + `PREFIX.idx` and no manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data import load_tokenizer
from pipeline.data.indexed import IndexedDatasetWriter, dtype_for_vocab
from tests.conftest import REPO_ROOT

# The small SentencePiece model shipped with the test fixtures (vocabulary 384, EOS 2).
SHIPPED_TOKENIZER = REPO_ROOT / "tests/checkpoint/fixtures/pre_refactor_run/data/tokenizer/tokenizer.model"


def write_megatron_prefix(prefix: Path, texts: list[str], tokenizer: Path = SHIPPED_TOKENIZER,
                          extra_ids: tuple[int, ...] = ()) -> Path:
    """`prefix`.bin/.idx of `texts`; `extra_ids`: one more document of these raw ids (e.g. out of range)."""
    tok = load_tokenizer(tokenizer)
    docs = [ids + [tok.eos_id] for ids in tok.encode_batch(texts)] + ([list(extra_ids)] if extra_ids else [])
    prefix.parent.mkdir(parents=True, exist_ok=True)
    writer = IndexedDatasetWriter(prefix, dtype_for_vocab(tok.vocab_size))
    writer.add_documents(np.array([i for d in docs for i in d]), np.array([len(d) for d in docs]))
    writer.finalize()
    return prefix

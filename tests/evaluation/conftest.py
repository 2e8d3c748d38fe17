"""Fixtures for downstream-evaluation tests: the shipped tiny tasks and a real HF tokenizer."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

TASKS_DIR = Path(__file__).parent / "tasks"
TINY_TASKS = ["pycode_tiny", "pycode_tiny_ppl"]


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE `tokenizers` tokenizer (vocab 512) trained on stdlib source, saved like an HF repo."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    std = Path(sysconfig.get_paths()["stdlib"])
    docs = [p.read_text(errors="replace") for p in sorted((std / "json").glob("*.py"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    d = tmp_path_factory.mktemp("tokenizer") / "hf_bpe"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return d

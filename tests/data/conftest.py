"""Session fixtures: a small real corpus and real tokenizers made offline in this session."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import pytest

from pipeline.data.tokenizer import train_sentencepiece
from pipeline.prepare import main as prepare_main


def _stdlib_snippets(n: int, rng: random.Random) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    out = []
    for f in files:
        lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
        for _ in range(3):
            start = rng.randrange(max(1, len(lines) - 40))
            out.append("".join(lines[start : start + rng.randint(3, 40)]))
    return out[:n]


def make_docs(seed: int = 0, n: int = 120) -> list[str]:
    """Documents with code, prose, unicode, tabs and odd spacing; no blank lines inside a doc
    (so paragraph mode can round-trip them) and no leading/trailing whitespace."""
    rng = random.Random(seed)
    docs = []
    extras = [
        "naïve café — ünïcödé 日本語 テキスト 😀",
        "tabs\tand  double  spaces",
        "ends with digits 12345",
        "Ωμέγα: σ = √(x² + y²)",
        "<|endoftext|> appears literally in this text",
        "</s> and <s> too",
    ]
    for i, snip in enumerate(_stdlib_snippets(n, rng)):
        body = "\n".join(line for line in snip.splitlines() if line.strip())
        doc = f"doc {i}: {extras[i % len(extras)]}\n{body}".strip()
        docs.append(doc)
    return docs


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return make_docs()


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="session")
def spm_bpe(docs, tok_dir) -> Path:
    path = tok_dir / "bpe.model"
    train_sentencepiece(docs, "bpe", 600, path)
    return path


@pytest.fixture(scope="session")
def spm_unigram(docs, tok_dir) -> Path:
    path = tok_dir / "unigram.model"
    train_sentencepiece(docs, "unigram", 600, path)
    return path


@pytest.fixture(scope="session")
def hf_tokenizer_dir(docs, tok_dir) -> Path:
    """A byte-level BPE `tokenizers` tokenizer saved like an HF repo (tokenizer.json + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer)
    d = tok_dir / "hf_bpe"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return d


@pytest.fixture(scope="session")
def big_vocab_tokenizer(tok_dir) -> Path:
    """WordLevel tokenizer with 70,001 ids (> 65,535): forces the int32 shard dtype."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"</s>": 0, "[UNK]": 1}
    vocab.update({f"w{i}": i + 2 for i in range(69_999)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    path = tok_dir / "wordlevel70k.json"
    tok.save(str(path))
    return path


def run_prepare(capsys, *argv) -> tuple[int, str, str]:
    """`python -m pipeline.prepare ARGV` in-process -> (exit code, stdout, stderr)."""
    code = prepare_main([str(a) for a in argv] + ["--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "id": len(d)}) + "\n")
    return path


@pytest.fixture(scope="session")
def prepared(spm_bpe, tmp_path_factory) -> tuple[Path, Path]:
    """Two prepared dirs (different corpora, same tokenizer), several shards each."""
    from pipeline.data.prepare import PrepareOptions, prepare

    root = tmp_path_factory.mktemp("prepared")
    dirs = []
    for k in range(2):
        docs = make_docs(seed=10 + k, n=120)
        inp = write_jsonl(root / f"in{k}.jsonl", docs)
        out = root / f"d{k}"
        prepare(
            PrepareOptions(
                inputs=[str(inp)],
                output=out,
                tokenizer=str(spm_bpe),
                valid_fraction=0.2,
                shard_size_tokens=4000,
                progress=False,
            )
        )
        dirs.append(out)
    return dirs[0], dirs[1]

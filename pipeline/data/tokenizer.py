"""One tokenizer interface over SentencePiece models and Hugging Face tokenizers.

`load_tokenizer(path)` accepts a prepared data dir (uses its `tokenizer/` copy and the ids
recorded in its manifest), a SentencePiece `.model` file, a `tokenizer.json` file, or a Hugging
Face tokenizer dir. `encode` never adds BOS/EOS: the prepare pipeline adds them explicitly so the
same rule holds for every tokenizer type.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.errors import DataError
from pipeline.io_utils import atomic_write_bytes, atomic_write_text

META_FILE = "pipeline_tokenizer.json"
# Files that make up a Hugging Face tokenizer; we copy only these (never model weights).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[SEP]")
_BOS_CANDIDATES = ("<|startoftext|>", "<s>", "<bos>", "<|begin_of_text|>", "[CLS]")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """Wrapper with `.encode(str) -> list[int]`, `.encode_batch`, `.decode`, and the ids we need.

    `kind` is "sentencepiece" or "huggingface"; `file` is the file that defines the vocabulary
    (its sha256 is the tokenizer's identity in manifests).
    """

    def __init__(self, kind: str, file: Path, backend, eos_id: int, bos_id: int | None, vocab_size: int):
        self.kind = kind
        self.file = Path(file)
        self._backend = backend
        self.eos_id = int(eos_id)
        self.bos_id = None if bos_id is None else int(bos_id)
        self.vocab_size = int(vocab_size)

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            # One thread: parallelism comes from prepare's worker processes, not from here.
            return self._backend.encode(texts, out_type=int, num_threads=1)
        fast = getattr(self._backend, "encode_batch_fast", None)
        encs = (fast or self._backend.encode_batch)(texts, add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=False)

    # -- identity / persistence -------------------------------------------------------------
    @property
    def sha256(self) -> str:
        return sha256_file(self.file)

    def identity(self) -> dict:
        return {"type": self.kind, "file": self.file.name, "sha256": self.sha256}

    def save(self, out_dir: str | Path) -> list[Path]:
        """Copy the tokenizer files into `out_dir` plus a small meta file with the ids we use."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.kind == "sentencepiece":
            sources = [self.file]
        else:
            sources = [self.file.parent / n for n in HF_TOKENIZER_FILES if (self.file.parent / n).is_file()]
            if self.file not in sources:
                sources.append(self.file)
        written = []
        for src in sources:
            dst = out_dir / ("tokenizer.model" if self.kind == "sentencepiece" else src.name)
            if src.resolve() != dst.resolve():
                shutil.copyfile(src, dst)
            written.append(dst)
        meta = {
            "type": self.kind,
            "file": "tokenizer.model" if self.kind == "sentencepiece" else self.file.name,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
            "vocab_size": self.vocab_size,
        }
        atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
        return written + [out_dir / META_FILE]

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.kind}, {self.file}, vocab_size={self.vocab_size}, "
            f"eos_id={self.eos_id}, bos_id={self.bos_id})"
        )


# -- loading --------------------------------------------------------------------------------
def _load_sentencepiece(path: Path, eos_id=None, bos_id=None) -> Tokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as e:
        raise DataError(f"{path} is not a SentencePiece model: {e}") from e
    eos = sp.eos_id() if eos_id is None else eos_id
    bos = (sp.bos_id() if sp.bos_id() >= 0 else None) if bos_id is None else bos_id
    if eos is None or eos < 0:
        raise DataError(f"SentencePiece model {path} defines no EOS piece; train it with eos_id >= 0")
    return Tokenizer("sentencepiece", path, sp, eos, bos, sp.get_piece_size())


def _special_from_config(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_hf(tok_json: Path, eos_token: str | None, eos_id=None, bos_id=None) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(str(tok_json))
    except Exception as e:  # the Rust side raises plain Exception subclasses
        raise DataError(f"{tok_json} is not a Hugging Face tokenizer.json: {e}") from e
    # Text that happens to contain "<|endoftext|>" must be tokenised as text, not as the special
    # token, or a document could inject a fake document boundary.
    if hasattr(tok, "encode_special_tokens"):
        tok.encode_special_tokens = True
    config = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = tok_json.parent / name
        if p.is_file():
            try:
                config = {**json.loads(p.read_text()), **config}
            except json.JSONDecodeError as e:
                raise DataError(f"{p} is not valid JSON: {e}") from e
    vocab = tok.get_vocab(with_added_tokens=True)

    def resolve(explicit, key, candidates, required):
        if explicit is not None:
            return explicit
        names = [n for n in ([eos_token] if key == "eos_token" else []) if n]
        names += [n for n in [_special_from_config(config, key)] if n] + list(candidates)
        for name in names:
            if name in vocab:
                return vocab[name]
        if required:
            raise DataError(
                f"cannot tell the EOS token of {tok_json}: no eos_token in tokenizer_config.json and none of "
                f"{', '.join(_EOS_CANDIDATES)} in its vocabulary; pass --eos-token TOKEN"
            )
        return None

    eos = resolve(eos_id, "eos_token", _EOS_CANDIDATES, True)
    bos = resolve(bos_id, "bos_token", _BOS_CANDIDATES, False)
    # Added tokens may sit above get_vocab_size(False); the dtype must hold the largest id.
    vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    return Tokenizer("huggingface", tok_json, tok, eos, bos, vocab_size)


def load_tokenizer(path: str | Path, eos_token: str | None = None) -> Tokenizer:
    """Load a tokenizer from a prepared data dir, a `.model` file, a tokenizer.json or an HF dir."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"tokenizer path {path} does not exist")
    if path.is_dir() and (path / "manifest.json").is_file():
        # A prepared data dir: its tokenizer/ copy carries the exact ids the shards were made with.
        return load_tokenizer(path / "tokenizer", eos_token)
    if path.is_dir() and (path / META_FILE).is_file():
        meta = json.loads((path / META_FILE).read_text())
        f = path / meta["file"]
        if meta["type"] == "sentencepiece":
            return _load_sentencepiece(f, meta["eos_id"], meta["bos_id"])
        return _load_hf(f, None, meta["eos_id"], meta["bos_id"])
    if path.is_file():
        if path.suffix == ".json":
            return _load_hf(path, eos_token)
        return _load_sentencepiece(path)
    if (path / "tokenizer.json").is_file():
        return _load_hf(path / "tokenizer.json", eos_token)
    if (path / "tokenizer.model").is_file():
        return _load_sentencepiece(path / "tokenizer.model")
    raise DataError(
        f"{path} holds no tokenizer.json or tokenizer.model; convert a slow tokenizer with "
        f"AutoTokenizer.from_pretrained(dir).save_pretrained(dir) (writes tokenizer.json) and retry"
    )


# -- training -------------------------------------------------------------------------------
def _sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Non-empty lines of the sample; SentencePiece trains on lines, not documents."""
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                seen += len(line)
                yield line[:16000]
            if seen >= max_bytes:
                return


def train_sentencepiece(
    texts: Iterable[str],
    model_type: str,
    vocab_size: int,
    out_file: str | Path,
    max_bytes: int = 64 << 20,
    num_threads: int = 16,
) -> Tokenizer:
    """Train a SentencePiece BPE/unigram model on (a bounded sample of) `texts`.

    Settings chosen for exact round trips on any text, code included: identity normalisation,
    whitespace kept as is, byte fallback for unseen characters, newline/tab as their own pieces.
    Ids: unk 0, bos 1, eos 2. The model depends on `num_threads` (SentencePiece splits its work
    by thread), so it is a fixed 16 (SentencePiece's default), not the core or worker count: the
    same corpus and options give the same tokenizer on every machine.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--train-tokenizer must be bpe or unigram, got {model_type!r}")
    min_vocab = 256 + 3 + 2 + 1
    if vocab_size < min_vocab:
        raise DataError(f"--vocab-size {vocab_size} is too small: byte fallback needs at least {min_vocab}")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts, max_bytes),
            model_writer=buf,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n", "\t"],
            character_coverage=0.9995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            max_sentence_length=16384,
            hard_vocab_limit=False,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(
            f"SentencePiece training failed ({model_type}, vocab {vocab_size}): {e}; "
            f"try a smaller --vocab-size or a larger --tokenizer-sample-bytes"
        ) from e
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_file, lambda f: f.write(buf.getvalue()))
    return _load_sentencepiece(out_file)

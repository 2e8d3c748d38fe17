"""Corpus readers: turn input specs into one ordered stream of documents, streaming.

Formats: plain text (a document per file, per blank-line-separated paragraph, or per line),
JSONL (plain / .gz / .zst) with a text key, Parquet (read by record batches), a Hugging Face
dataset saved with `save_to_disk`, and a Hub dataset name (`hf:owner/name`, streamed).

Nothing here holds more than one document (or one record batch) in memory. Bad input either
raises DataError naming the file and line / byte offset, or is counted in a SkipReport that ends
up in the summary and the manifest -- never dropped silently.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import os
import sysconfig
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import DataError
from pipeline.io_utils import content_hash

TEXT_EXTS = (".txt", ".text", ".md", ".rst")
JSONL_EXTS = (".jsonl", ".json", ".ndjson")
COMPRESSED = (".gz", ".zst")
PARQUET_EXTS = (".parquet", ".pq")
_BINARY_SNIFF = 8192


@dataclasses.dataclass
class ReaderOptions:
    text_key: str = "text"
    text_mode: str = "file"  # file | paragraph | line
    input_format: str = "auto"  # auto | text | jsonl | parquet
    on_invalid_utf8: str = "error"  # error | skip | replace
    on_bad_record: str = "error"  # error | skip  (malformed JSON, missing key, non-string text)
    max_doc_chars: int = 10_000_000
    on_huge_doc: str = "split"  # split | error | skip
    hf_split: str = "train"
    hf_config: str | None = None


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # text | jsonl | parquet | hf_disk | hf_hub
    path: str
    # One task's share of a file too big for one task (pipeline/data/tasks.py): [start, end) byte
    # offsets of an uncompressed JSONL file (the lines that start there) or a Parquet row-group range.
    part: tuple[int, int] | None = None

    def fingerprint(self, legacy: bool = False) -> list:
        """What must not change between a crashed run and its resume: every file's size and content
        hash (an edit that keeps size and mtime is still a change). `legacy`: the size + mtime form
        of versions before content hashes, to recognise the dirs they prepared."""
        if self.kind == "hf_hub":
            return [self.kind, self.path]
        p = Path(self.path)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        if legacy:
            return [self.kind, self.path, [[str(q), q.stat().st_size, q.stat().st_mtime_ns] for q in files]]
        whole = [self.kind, self.path, [[str(q), q.stat().st_size, content_hash(q)] for q in files]]
        return whole if self.part is None else [*whole, list(self.part)]

    def record(self) -> dict:
        """The manifest's entry for this input (`part` only when it is one)."""
        return {"kind": self.kind, "path": self.path, **({"part": list(self.part)} if self.part else {})}


class SkipReport:
    """Counts of skipped input by reason, with the first few locations of each."""

    MAX_EXAMPLES = 5

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.MAX_EXAMPLES:
            ex.append(where)

    def to_dict(self) -> dict:
        return {r: {"count": n, "examples": self.examples.get(r, [])} for r, n in sorted(self.counts.items())}

    def summary(self) -> str:
        if not self.counts:
            return "skipped: nothing"
        lines = ["skipped input (see manifest.json 'skipped'):"]
        for r, n in sorted(self.counts.items()):
            lines.append(f"  {n} x {r}, e.g. {'; '.join(self.examples.get(r, []))}")
        return "\n".join(lines)


# -- input expansion ------------------------------------------------------------------------
def _kind_of_file(path: Path, input_format: str) -> str | None:
    if input_format != "auto":
        return input_format
    name = path.name.lower()
    for c in COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
    suffix = os.path.splitext(name)[1]
    if suffix in JSONL_EXTS:
        return "jsonl"
    if suffix in PARQUET_EXTS:
        return "parquet"
    if suffix in TEXT_EXTS:
        return "text"
    return None


def _is_saved_hf_dataset(d: Path) -> bool:
    return (d / "dataset_dict.json").is_file() or (
        (d / "state.json").is_file() and (d / "dataset_info.json").is_file()
    )


STDLIB_SPEC = "stdlib:"
# Not part of the standard library proper, or test fixtures (some deliberately malformed).
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_sources() -> list[str]:
    """The built-in corpus: the running interpreter's standard-library sources (.py), sorted.

    Real text on every machine with Python, no download: what the quickstart trains on.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP_DIRS and not d.startswith("."))
        files += [os.path.join(dirpath, n) for n in sorted(names) if n.endswith(".py")]
    return files


def expand_inputs(specs: list[str], input_format: str, report: SkipReport) -> list[Source]:
    """Files, directories (recursive, sorted), globs, `hf:` names and `stdlib:` -> ordered, de-duplicated sources."""
    out: list[Source] = []
    seen: set[str] = set()

    def add(kind: str, path: str) -> None:
        key = f"{kind}:{os.path.realpath(path) if kind != 'hf_hub' else path}"
        if key not in seen:
            seen.add(key)
            out.append(Source(kind, path))

    def add_path(p: Path, explicit: bool) -> None:
        if p.is_dir():
            if _is_saved_hf_dataset(p):
                return add("hf_disk", str(p))
            found = False
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    f = Path(root) / name
                    kind = _kind_of_file(f, input_format)
                    if kind is None:
                        report.add("file with unsupported extension (use --format to force one)", str(f))
                        continue
                    found = True
                    add(kind, str(f))
            if not found:
                raise DataError(f"input directory {p} holds no .txt/.md/.jsonl[.gz|.zst]/.parquet files")
            return None
        kind = _kind_of_file(p, input_format) or ("text" if explicit else None)
        add(kind, str(p))

    for spec in specs:
        if spec.startswith("hf:"):
            add("hf_hub", spec[3:].lstrip("/"))
        elif spec == STDLIB_SPEC:
            for f in stdlib_sources():
                add("text", f)
        elif any(ch in spec for ch in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise DataError(f"input pattern {spec!r} matches no files")
            for m in matches:
                add_path(Path(m), explicit=False) if Path(m).is_dir() else add_path(Path(m), explicit=True)
        else:
            p = Path(spec)
            if not p.exists():
                raise DataError(f"input {spec} does not exist")
            add_path(p, explicit=True)
    return out


# -- decoding helpers -----------------------------------------------------------------------
def _open_binary(path: str):
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 - closed with the wrapper
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    return open(path, "rb")  # noqa: SIM115


def _stream_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return (OSError, EOFError, zlib.error, zstandard.ZstdError)


class _Decoder:
    """UTF-8 decoding with the --on-invalid-utf8 policy; errors name the byte offset."""

    def __init__(self, opts: ReaderOptions, report: SkipReport):
        self.policy = opts.on_invalid_utf8
        self.report = report

    def __call__(self, raw: bytes, path: str, offset: int, lineno: int) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = f" (line {lineno})" if lineno else ""  # 0: read from a byte offset, line unknown
            where = f"{path}: invalid UTF-8 at byte offset {offset + e.start}{line}"
            if self.policy == "error":
                raise DataError(f"{where}; pass --on-invalid-utf8 skip or replace to go on") from None
            if self.policy == "skip":
                self.report.add("document with invalid UTF-8", where)
                return None
            self.report.add("invalid UTF-8 replaced by U+FFFD", where)
            return raw.decode("utf-8", errors="replace")


Doc = tuple[str, str, bool]  # (text, where, continues the previous document)


def _pieces(text: str, limit: int) -> list[str]:
    """Cut `text` into pieces of at most `limit` chars, preferring cuts after a newline."""
    out, start = [], 0
    while start < len(text):
        end = min(start + limit, len(text))
        if end < len(text):
            nl = text.rfind("\n", start + limit // 2, end)
            end = nl + 1 if nl >= 0 else end
        out.append(text[start:end])
        start = end
    return out


def _huge(text_len: int, where: str, opts: ReaderOptions, report: SkipReport) -> None:
    """Apply --on-huge-doc to a document longer than --max-doc-chars (error raises here)."""
    limit = opts.max_doc_chars
    if opts.on_huge_doc == "error":
        raise DataError(
            f"{where}: document has more than --max-doc-chars {limit:,} characters "
            f"({text_len:,} read so far); raise the limit or pass --on-huge-doc split (or skip)"
        )
    verb = "skipped" if opts.on_huge_doc == "skip" else "split into pieces"
    report.add(f"document longer than --max-doc-chars {limit} {verb}", where)


def _limit(text: str, where: str, opts: ReaderOptions, report: SkipReport) -> Iterator[Doc]:
    """One document through the size policy: as is, split into pieces (same split), error, skip."""
    if len(text) <= opts.max_doc_chars:
        yield text, where, False
        return
    _huge(len(text), where, opts, report)
    if opts.on_huge_doc == "split":
        for i, piece in enumerate(_pieces(text, opts.max_doc_chars)):
            yield piece, where, i > 0


def _read_text(path: str, opts: ReaderOptions, report: SkipReport, decode: _Decoder) -> Iterator[Doc]:
    mode, limit = opts.text_mode, opts.max_doc_chars
    try:
        f = _open_binary(path)
    except OSError as e:
        raise DataError(f"cannot open {path}: {e}") from e
    lineno = 0
    with f:
        try:
            head = f.peek(_BINARY_SNIFF)[:_BINARY_SNIFF]
            if b"\x00" in head:
                nul = head.index(b"\x00")
                report.add("binary file (NUL byte)", f"{path}: NUL byte at byte offset {nul}")
                return
            parts: list[str] = []  # lines of the document being assembled (file / paragraph mode)
            n_chars, bad, pieces_out, any_text, offset, doc_line = 0, False, 0, False, 0, 1

            def flush() -> Iterator[Doc]:
                nonlocal parts, n_chars, bad, pieces_out
                text = "".join(parts)
                where = path if mode == "file" else f"{path}:{doc_line}"
                if mode == "paragraph":
                    text = text.rstrip("\r\n")
                if not bad and (text.strip() or pieces_out):
                    if pieces_out:  # the tail of an enormous file that was already being split
                        yield from ((p, where, True) for p in _pieces(text, limit))
                    else:
                        yield from _limit(text, where, opts, report)
                parts, n_chars, bad, pieces_out = [], 0, False, 0

            for lineno, raw in enumerate(f, 1):  # noqa: B007 - lineno is reported after the loop
                line = decode(raw, path, offset, lineno)
                offset += len(raw)
                if line is None:
                    bad = True
                    continue
                blank = not line.strip()
                any_text = any_text or not blank
                if mode == "line":
                    if not blank:
                        yield from _limit(line.rstrip("\r\n"), f"{path}:{lineno}", opts, report)
                    continue
                if mode == "paragraph" and blank:
                    yield from flush()
                    doc_line = lineno + 1
                    continue
                if bad:
                    continue
                parts.append(line)
                n_chars += len(line)
                if mode == "file" and n_chars > limit:
                    # Bound memory for one enormous file: apply the policy now, not at EOF.
                    if not pieces_out:
                        _huge(n_chars, path, opts, report)
                    if opts.on_huge_doc == "skip":
                        parts, bad = [], True
                        continue
                    *done, rest = _pieces("".join(parts), limit)
                    for piece in done:
                        yield piece, path, pieces_out > 0
                        pieces_out += 1
                    parts, n_chars = [rest], len(rest)
            if mode != "line":
                yield from flush()
        except _stream_errors() as e:
            raise DataError(f"{path}: corrupt or truncated compressed file near line {lineno}: {e}") from e
    if lineno == 0:
        report.add("empty file", path)
    elif not any_text:
        report.add("file with only whitespace", path)


def _bad_record(opts: ReaderOptions, report: SkipReport, where: str, what: str) -> None:
    if opts.on_bad_record == "error":
        raise DataError(f"{where}: {what}; fix the record or pass --on-bad-record skip")
    report.add(what.split(" (")[0], where)


def _text_value(record, key: str, where: str, opts: ReaderOptions, report: SkipReport) -> str | None:
    if not isinstance(record, dict):
        _bad_record(opts, report, where, f"record is a JSON {type(record).__name__}, not an object")
        return None
    if key not in record:
        keys = ", ".join(list(record)[:10])
        _bad_record(opts, report, where, f"record has no key {key!r} (keys: {keys}); set --text-key")
        return None
    value = record[key]
    if not isinstance(value, str):
        _bad_record(opts, report, where, f"{key!r} is {type(value).__name__}, not a string")
        return None
    if not value.strip():
        report.add("empty document", where)
        return None
    return value


def _seek_line(f, start: int) -> int:
    """Position `f` at the first line that starts at byte `start` or later; returns that offset."""
    if start == 0:
        return 0
    f.seek(start - 1)
    if f.read(1) != b"\n":
        f.readline()  # the line that straddles `start` belongs to the task before
    return f.tell()


def _read_jsonl(src: Source, opts: ReaderOptions, report: SkipReport, decode: _Decoder) -> Iterator[Doc]:
    path = src.path
    try:
        f = _open_binary(path)
    except OSError as e:
        raise DataError(f"cannot open {path}: {e}") from e
    start, end = src.part or (0, None)
    lineno, offset, records = 0, 0, 0
    with f:
        try:
            offset = _seek_line(f, start)
            for raw in iter(f.readline, b""):
                if end is not None and offset >= end:
                    break
                # A part read from a byte offset cannot know its line numbers: it names offsets.
                lineno = lineno + 1 if start == 0 else 0
                where = f"{path}:{lineno}" if lineno else f"{path}: line at byte offset {offset}"
                line = decode(raw, path, offset, lineno)
                offset += len(raw)
                if line is None or not line.strip():
                    continue
                records += 1
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    _bad_record(opts, report, where, f"malformed JSON ({e.msg} at column {e.colno})")
                    continue
                text = _text_value(record, opts.text_key, where, opts, report)
                if text is not None:
                    yield from _limit(text, where, opts, report)
        except _stream_errors() as e:
            raise DataError(f"{path}: corrupt or truncated compressed file near line {lineno}: {e}") from e
    if records == 0 and src.part is None:
        report.add("empty file", path)


def _read_records(texts: Iterator, where_of, opts: ReaderOptions, report: SkipReport) -> Iterator[Doc]:
    for row, value in enumerate(texts):
        where = where_of(row)
        text = _text_value(
            {opts.text_key: value} if value is not None else {}, opts.text_key, where, opts, report
        )
        if text is not None:
            yield from _limit(text, where, opts, report)


def _read_parquet(src: Source, opts: ReaderOptions, report: SkipReport) -> Iterator[Doc]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = src.path
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file: {e}") from e
    names = pf.schema_arrow.names
    if opts.text_key not in names:
        raise DataError(
            f"{path}: Parquet file has no column {opts.text_key!r} (columns: {', '.join(names)}); "
            f"set --text-key"
        )

    first, stop = src.part or (0, pf.num_row_groups)
    first_row = sum(pf.metadata.row_group(k).num_rows for k in range(first))

    def values():
        # Record batches keep memory bounded by the batch, not the file or the row group.
        for batch in pf.iter_batches(batch_size=1024, columns=[opts.text_key], row_groups=range(first, stop)):
            yield from batch.column(0).to_pylist()

    yield from _read_records(values(), lambda r: f"{path}: row {first_row + r}", opts, report)


def _read_hf(source: Source, opts: ReaderOptions, report: SkipReport) -> Iterator[Doc]:
    import datasets

    if source.kind == "hf_disk":
        try:
            ds = datasets.load_from_disk(source.path)
        except Exception as e:  # datasets raises many types for a bad dir
            raise DataError(f"{source.path} is not a readable saved Hugging Face dataset: {e}") from e
    else:
        if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise DataError(
                f"cannot stream Hub dataset {source.path!r}: offline mode (HF_HUB_OFFLINE / "
                f"HF_DATASETS_OFFLINE is set); save it with Dataset.save_to_disk on a machine "
                f"with network access and pass that directory"
            )
        try:
            ds = datasets.load_dataset(source.path, opts.hf_config, split=opts.hf_split, streaming=True)
        except Exception as e:
            raise DataError(
                f"cannot stream Hub dataset {source.path!r} (split {opts.hf_split}): {e}; without "
                f"network access, save it with Dataset.save_to_disk elsewhere and pass that dir"
            ) from e
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if opts.hf_split not in ds:
            raise DataError(f"{source.path} has splits {', '.join(ds)}; choose one with --hf-split")
        ds = ds[opts.hf_split]
    columns = ds.column_names
    if columns is not None and opts.text_key not in columns:
        raise DataError(
            f"{source.path}: dataset has no column {opts.text_key!r} (columns: {', '.join(columns)}); "
            f"set --text-key"
        )

    def values():
        for batch in ds.iter(batch_size=1000):
            yield from batch[opts.text_key]

    yield from _read_records(values(), lambda r: f"{source.path}: row {r}", opts, report)


def iter_documents(sources: list[Source], opts: ReaderOptions, report: SkipReport) -> Iterator[Doc]:
    """All documents of all sources, in order: (text, where, continues_previous)."""
    decode = _Decoder(opts, report)
    for src in sources:
        if src.kind == "text":
            yield from _read_text(src.path, opts, report, decode)
        elif src.kind == "jsonl":
            yield from _read_jsonl(src, opts, report, decode)
        elif src.kind == "parquet":
            yield from _read_parquet(src, opts, report)
        elif src.kind in ("hf_disk", "hf_hub"):
            yield from _read_hf(src, opts, report)
        else:
            raise DataError(f"unknown input format {src.kind!r} for {src.path}")

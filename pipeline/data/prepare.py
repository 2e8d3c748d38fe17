"""The prepare pipeline: documents -> (parallel) tokenisation -> train/valid shards + manifest.

Flow: expand inputs -> check the output dir (resume / refuse / overwrite) -> load or train the
tokenizer and copy it to DIR/tokenizer/ -> stream documents, assign each to a split by a seeded
hash of its text, tokenise chunks of documents in worker processes (bounded number in flight,
results consumed in submission order) -> roll shards -> write manifest.json.

Memory stays flat as the corpus grows: at most `2 * workers + 2` chunks of ~1 MB text are in
flight and a shard's index holds one int32 per document.

Across nodes (`num_tasks` > 1): the task reads its share of the inputs (tasks.py) into its own dir
DIR/tasks/task_<i>_of_<n>/ through this same pipeline, so resume works per task; merge.py then
writes DIR/manifest.json.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import os
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.data.indexed import dtype_for_vocab
from pipeline.data.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST, STATE, write_json_atomic
from pipeline.data.output_dir import OVERWRITE_DIR, check_output_apart, holds_run_of, prepare_output_dir, swap_in
from pipeline.data.readers import (
    ReaderOptions,
    SkipReport,
    Source,
    expand_inputs,
    iter_documents,
)
from pipeline.data.shard_writer import SplitWriter, verified_prefix
from pipeline.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from pipeline.data.verify import sha256_problem
from pipeline.errors import ConfigError, DataError
from pipeline.io_utils import sha256_file
from pipeline.run_lock import DirLock

SPLITS = ("train", "valid")
CHUNK_CHARS = 1 << 20  # text per worker task: large enough to amortise pickling, small for memory
CHUNK_DOCS = 4096


@dataclasses.dataclass
class PrepareOptions:
    inputs: list[str]
    output: Path
    tokenizer: str | None = None
    train_tokenizer: str | None = None  # bpe | unigram
    vocab_size: int | None = None
    reader: ReaderOptions = dataclasses.field(default_factory=ReaderOptions)
    workers: int = 1
    valid_fraction: float = 0.01
    seed: int = 1234
    bos: bool = False
    shard_size_mb: float = 512.0
    shard_size_tokens: int | None = None
    dtype: str = "auto"  # auto | uint16 | int32
    tokenizer_sample_docs: int = 1_000_000
    tokenizer_sample_bytes: int = 64 << 20
    eos_token: str | None = None
    overwrite: bool = False
    progress: bool = True
    command: str = ""
    num_tasks: int = 1  # > 1: this run is task `task_index` of a multi-task prepare (tasks.py)
    task_index: int = 0


class DocumentEncoder:
    """texts -> (tokens [sum(lengths)] of the shard dtype, lengths int64 [n]); BOS? + ids + EOS."""

    def __init__(self, tokenizer: Tokenizer, bos: bool, dtype: np.dtype):
        self.tok = tokenizer
        self.bos = bos and tokenizer.bos_id is not None
        self.dtype = np.dtype(dtype)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tok.encode_batch(texts)
        body_len = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        body = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(body_len.sum()))
        if body.size and (body.max() >= self.tok.vocab_size or body.min() < 0):
            bad = int(body.max() if body.max() >= self.tok.vocab_size else body.min())
            raise DataError(
                f"tokenizer {self.tok.file} produced id {bad}, outside its vocab size "
                f"{self.tok.vocab_size} (dtype {self.dtype}); the tokenizer files are inconsistent"
            )
        extra = 1 + int(self.bos)
        lengths = body_len + extra
        ends = np.cumsum(lengths)  # exclusive end of each document in the output
        out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=self.dtype)
        special = np.zeros(len(out), dtype=bool)
        special[ends - 1] = True
        out[ends - 1] = self.tok.eos_id
        if self.bos:
            special[ends - lengths] = True
            out[ends - lengths] = self.tok.bos_id
        out[~special] = body
        return out, lengths


_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, bos: bool, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _WORKER["encode"] = DocumentEncoder(load_tokenizer(tokenizer_dir), bos, np.dtype(dtype))


def _encode_in_worker(texts: list[str]):
    return _WORKER["encode"](texts)


def split_of(data: bytes, key: bytes, valid_fraction: float) -> str:
    """Seeded content hash -> split; identical documents always land in the same split."""
    h = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little")
    return "valid" if h < valid_fraction * 2.0**64 else "train"


# -- output dir -----------------------------------------------------------------------------
def _fingerprint(opts: PrepareOptions, sources: list[Source]) -> dict:
    r = opts.reader
    tok = (
        {"path": str(Path(opts.tokenizer).resolve()), "eos_token": opts.eos_token}
        if opts.tokenizer
        else {
            "train": opts.train_tokenizer,
            "vocab_size": opts.vocab_size,
            "sample_docs": opts.tokenizer_sample_docs,
            "sample_bytes": opts.tokenizer_sample_bytes,
        }
    )
    return {
        "inputs": [s.fingerprint() for s in sources],
        "tokenizer": tok,
        "options": {
            "text_key": r.text_key,
            "text_mode": r.text_mode,
            "format": r.input_format,
            "on_invalid_utf8": r.on_invalid_utf8,
            "on_bad_record": r.on_bad_record,
            "max_doc_chars": r.max_doc_chars,
            "on_huge_doc": r.on_huge_doc,
            "hf_split": r.hf_split,
            "hf_config": r.hf_config,
            "valid_fraction": opts.valid_fraction,
            "seed": opts.seed,
            "bos": opts.bos,
            "shard_size_mb": opts.shard_size_mb,
            "shard_size_tokens": opts.shard_size_tokens,
            "dtype": opts.dtype,
        },
    }


def _tokenizer_for(opts: PrepareOptions, sources: list[Source], state: dict | None) -> Tokenizer:
    tok_dir = opts.output / "tokenizer"
    if opts.tokenizer:
        tok = load_tokenizer(opts.tokenizer, opts.eos_token)
        tok.save(tok_dir)
        return load_tokenizer(tok_dir)
    if state and state.get("tokenizer") and (tok_dir / "tokenizer.model").is_file():
        if sha256_file(tok_dir / "tokenizer.model") == state["tokenizer"]["sha256"]:
            return load_tokenizer(tok_dir)  # trained by the interrupted run: reuse, do not retrain
    if not opts.vocab_size:
        raise ConfigError("--train-tokenizer needs --vocab-size N")
    sample = itertools.islice(
        (text for text, _, _ in iter_documents(sources, opts.reader, SkipReport())),
        opts.tokenizer_sample_docs,
    )
    t0 = time.time()
    tok = train_sentencepiece(
        sample,
        opts.train_tokenizer,
        opts.vocab_size,
        tok_dir / "tokenizer.model",
        max_bytes=opts.tokenizer_sample_bytes,
    )
    tok.save(tok_dir)
    print(
        f"trained SentencePiece {opts.train_tokenizer} tokenizer: {tok.vocab_size} pieces in "
        f"{time.time() - t0:.1f}s",
        flush=True,
    )
    return load_tokenizer(tok_dir)


def _choose_dtype(opts: PrepareOptions, tok: Tokenizer) -> np.dtype:
    if opts.dtype == "auto":
        return dtype_for_vocab(tok.vocab_size)
    dtype = np.dtype(opts.dtype)
    if tok.vocab_size - 1 > np.iinfo(dtype).max:
        raise DataError(
            f"tokenizer {tok.file} has {tok.vocab_size} ids but --dtype {opts.dtype} holds ids up to "
            f"{np.iinfo(dtype).max}; use --dtype int32 (or auto)"
        )
    return dtype


# -- the streaming loop ---------------------------------------------------------------------
class _Pipeline:
    """Feeds chunks of documents to the encoder (in-process or a pool) and rolls the shards."""

    def __init__(self, opts: PrepareOptions, tok: Tokenizer, dtype: np.dtype, state: dict):
        self.opts, self.tok, self.dtype, self.state = opts, tok, dtype, state
        target = opts.shard_size_tokens or int(opts.shard_size_mb * (1 << 20)) // dtype.itemsize
        done = {s: verified_prefix(opts.output, state["shards"].get(s, [])) for s in SPLITS}
        self.state["shards"] = done
        write_json_atomic(opts.output / STATE, self.state)
        self.writers = {
            s: SplitWriter(opts.output, s, dtype, target, done[s], self._shard_done) for s in SPLITS
        }
        self.kept = {s: len(done[s]) for s in SPLITS}
        self.docs = self.tokens = self.bytes = 0

    def _shard_done(self, split: str, rec: dict) -> None:
        self.state["shards"][split] = self.writers[split].done
        write_json_atomic(self.opts.output / STATE, self.state)  # after the shard's rename: never ahead

    def _consume(self, meta: tuple[np.ndarray, np.ndarray], result) -> None:
        doc_ids, is_valid = meta  # int64 [n], bool [n]
        tokens, lengths = result
        self.docs += len(lengths)
        self.tokens += len(tokens)
        if not is_valid.any():
            self.writers["train"].add(doc_ids, lengths, tokens)
            return
        tok_valid = np.repeat(is_valid, lengths)  # [n_tokens] which split each token goes to
        for split, mask, tmask in (("train", ~is_valid, ~tok_valid), ("valid", is_valid, tok_valid)):
            if mask.any():
                self.writers[split].add(doc_ids[mask], lengths[mask], tokens[tmask])

    def run(self, sources: list[Source], report: SkipReport) -> int:
        opts = self.opts
        key = opts.seed.to_bytes(8, "little", signed=False)
        resume = {s: self.writers[s].resume_doc for s in SPLITS}
        encode = DocumentEncoder(self.tok, opts.bos, self.dtype)
        pool = None
        if opts.workers > 1:
            import multiprocessing as mp

            # spawn: workers start clean (no inherited tokenizer threads) and load the tokenizer once.
            pool = mp.get_context("spawn").Pool(
                opts.workers, _init_worker, (str(opts.output / "tokenizer"), opts.bos, self.dtype.str)
            )
        inflight: collections.deque = collections.deque()
        max_inflight = 2 * opts.workers + 2
        bar = _progress_bar(opts, sources)
        texts: list[str] = []
        ids: list[int] = []
        valid: list[bool] = []
        chars = 0

        def submit() -> None:
            nonlocal texts, ids, valid, chars
            meta = (np.asarray(ids, dtype=np.int64), np.asarray(valid, dtype=bool))
            if pool is None:
                self._consume(meta, encode(texts))
            else:
                inflight.append((meta, pool.apply_async(_encode_in_worker, (texts,))))
                while len(inflight) >= max_inflight:
                    self._consume(*_get(inflight.popleft()))
            bar.update(chars)
            bar.set_postfix(docs=f"{self.docs:,}", tokens=f"{self.tokens:,}", refresh=False)
            texts, ids, valid, chars = [], [], [], 0

        g = 0
        split = "train"
        try:
            for g, (text, _where, continues) in enumerate(iter_documents(sources, opts.reader, report)):
                data = text.encode("utf-8", errors="surrogatepass")
                self.bytes += len(data)
                if not continues:  # pieces of one split-up document stay in one split
                    split = split_of(data, key, opts.valid_fraction)
                if g < resume[split]:
                    bar.update(len(data))  # already in a verified shard of this split
                    continue
                texts.append(text)
                ids.append(g)
                valid.append(split == "valid")
                chars += len(data)
                if chars >= CHUNK_CHARS or len(texts) >= CHUNK_DOCS:
                    submit()
            if texts:
                submit()
            while inflight:
                self._consume(*_get(inflight.popleft()))
            n_docs = g + 1 if self.bytes else 0
            for w in self.writers.values():
                w.finish(end_doc=n_docs)
        except BaseException:
            for w in self.writers.values():
                w.abort()
            if pool is not None:
                pool.terminate()
            raise
        finally:
            bar.close()
        if pool is not None:
            pool.close()
            pool.join()
        return n_docs


def _get(item):
    meta, async_result = item
    return meta, async_result.get()


def _progress_bar(opts: PrepareOptions, sources: list[Source]):
    from tqdm import tqdm

    plain = all(s.kind in ("text", "jsonl") and not s.path.endswith((".gz", ".zst")) for s in sources)
    total = sum(s.part[1] - s.part[0] if s.part else os.path.getsize(s.path) for s in sources) if plain else None
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="tokenising",
        disable=not opts.progress,
        mininterval=1.0,
        smoothing=0.1,
    )


# -- entry ----------------------------------------------------------------------------------
def prepare(opts: PrepareOptions) -> dict:
    """Run the whole pipeline; returns the manifest dict (also written to DIR/manifest.json)."""
    if not 0.0 <= opts.valid_fraction < 1.0:
        raise ConfigError(f"--valid-fraction must be in [0, 1), got {opts.valid_fraction}")
    if opts.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {opts.workers}")
    if bool(opts.tokenizer) == bool(opts.train_tokenizer):
        raise ConfigError("pass exactly one of --tokenizer PATH or --train-tokenizer {bpe,unigram}")
    check_output_apart(opts.inputs, opts.output)  # before anything is read, written or removed
    report = SkipReport()
    sources = expand_inputs(opts.inputs, opts.reader.input_format, report)
    if opts.num_tasks > 1:
        return _prepare_task(opts, sources, report)
    # Two prepares into one dir would interleave their shards: one at a time (see run_lock.py).
    with DirLock(opts.output, "prepare") as lock:
        if lock.note:
            print(lock.note, flush=True)
        return _prepare_locked(opts, sources, report)


def _prepare_task(opts: PrepareOptions, sources: list[Source], report: SkipReport) -> dict:
    """Task `task_index` of `num_tasks`: its share of the inputs into its own dir under DIR/tasks/,
    then the merge if every task has finished (best effort: a dependent `--merge` job is the sure way)."""
    from pipeline.data.merge import merge_tasks
    from pipeline.data.tasks import plan_digest, task_dir, task_sources

    i, n = opts.task_index, opts.num_tasks
    if opts.train_tokenizer:
        raise ConfigError(f"--num-tasks {n}: every task must tokenise with the same tokenizer, so "
                          "--train-tokenizer cannot be used; train it once (a single-task prepare of a sample) "
                          "and pass --tokenizer DIR")
    task = {"index": i, "count": n, "plan": plan_digest(sources, n)}
    task_opts = dataclasses.replace(opts, output=task_dir(opts.output, i, n))
    mine = task_sources(sources, i, n)
    with DirLock(task_opts.output, "prepare") as lock:
        if lock.note:
            print(lock.note, flush=True)
        manifest = _prepare_locked(task_opts, mine, report, task)
    waiting = [t for t in range(n) if not (task_dir(opts.output, t, n) / MANIFEST).is_file()]
    if waiting:
        print(f"task {i} of {n} done; tasks {', '.join(map(str, waiting[:8]))}{' ...' if len(waiting) > 8 else ''} "
              f"not finished yet: the last one to finish merges (or run --merge {opts.output})", flush=True)
    else:
        try:
            merged = merge_tasks(opts.output, n, opts.command)
            print(f"merged the {n} tasks into {opts.output / MANIFEST}: "
                  f"{sum(s['documents'] for s in merged['splits'].values()):,} documents", flush=True)
        except (ConfigError, DataError) as e:  # the task itself succeeded: its exit code stays 0
            print(f"not merged: {e}", flush=True)
    return manifest


def _prepare_locked(opts: PrepareOptions, sources: list[Source], report: SkipReport, task: dict | None = None,
                    fingerprint: dict | None = None) -> dict:
    fingerprint = fingerprint or _fingerprint(opts, sources)
    if opts.overwrite and (opts.output / MANIFEST).is_file():
        # A complete dataset is replaced only by a complete one: build beside it, then swap by renames.
        # An earlier --overwrite of the same inputs and options that was stopped resumes there.
        staging = opts.output / OVERWRITE_DIR
        if staging.exists() and not holds_run_of(staging, fingerprint):
            shutil.rmtree(staging)  # ours: an earlier --overwrite of other inputs or options
        manifest = _prepare_locked(dataclasses.replace(opts, output=staging, overwrite=False), sources, report,
                                   task, fingerprint)
        swap_in(staging, opts.output)
        print(f"replaced the dataset in {opts.output} (the new one was complete before the old one was removed)",
              flush=True)
        return manifest
    state = prepare_output_dir(opts.output, fingerprint, opts.overwrite,
                                lambda: [s.fingerprint(legacy=True) for s in sources])
    if state and state.get("complete"):
        manifest, state = _recheck_complete(opts.output)
        if manifest is not None:
            return manifest
    tok = _tokenizer_for(opts, sources, state)
    dtype = _choose_dtype(opts, tok)
    tok_info = {**tok.identity(), "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id}
    if state and state.get("tokenizer") != tok_info:
        state = None  # the tokenizer changed under the same path: nothing from before is reusable
    state = state or {"fingerprint": fingerprint, "tokenizer": tok_info, "shards": {}}
    state["dtype"] = dtype.name
    t0 = time.time()
    pipe = _Pipeline(opts, tok, dtype, state)
    n_docs = pipe.run(sources, report)
    if n_docs == 0 and task is None:  # a task may get no input (more tasks than files): merge sums it
        raise DataError(f"no documents in {', '.join(opts.inputs)}: nothing to prepare\n{report.summary()}")
    elapsed = time.time() - t0
    manifest = _write_manifest(opts, sources, fingerprint, tok_info, dtype, pipe, report, n_docs, task)
    (opts.output / STATE).unlink(missing_ok=True)  # the manifest now marks the dir as complete
    kept = sum(pipe.kept.values())
    print(
        f"prepared {opts.output}: "
        + ", ".join(
            f"{s} {m['documents']:,} docs / {m['tokens']:,} tokens in {len(m['shards'])} shard(s)"
            for s, m in manifest["splits"].items()
        )
        + f"; tokenised {pipe.docs:,} docs, {pipe.tokens:,} tokens in {elapsed:.1f}s "
        f"({pipe.tokens / max(elapsed, 1e-9):,.0f} tokens/s)"
        + (f"; reused {kept} verified shard(s)" if kept else ""),
        flush=True,
    )
    print(report.summary(), flush=True)
    return manifest


def _recheck_complete(out: Path) -> tuple[dict | None, dict | None]:
    """A finished dir with the same fingerprint: a no-op if every checksum holds; otherwise turn
    the manifest back into a resume state so only the damaged / missing shards are rebuilt."""
    import json

    manifest = json.loads((out / MANIFEST).read_text())
    bad = [rel for rel, digest in manifest["files"].items() if sha256_problem(out / rel, digest)]
    if not bad:
        print(
            f"{out} already holds this dataset (same inputs and options, checksums verify); nothing to do",
            flush=True,
        )
        return manifest, None
    print(
        f"{out}: {len(bad)} file(s) fail their checksum ({', '.join(bad[:3])}); rebuilding from there",
        flush=True,
    )
    tok = {k: v for k, v in manifest["tokenizer"].items() if k != "dir"}
    shards = {s: info["shards"] for s, info in manifest["splits"].items()}
    state = {"fingerprint": manifest["fingerprint"], "tokenizer": tok, "shards": shards}
    write_json_atomic(out / STATE, state)
    (out / MANIFEST).unlink()
    return None, state


def _write_manifest(opts, sources, fingerprint, tok_info, dtype, pipe: _Pipeline, report, n_docs, task) -> dict:
    out = opts.output
    files = {}
    splits = {}
    for s in SPLITS:
        shards = pipe.writers[s].done
        for rec in shards:
            files[f"{rec['name']}.bin"] = rec["bin_sha256"]
            files[f"{rec['name']}.idx"] = rec["idx_sha256"]
        splits[s] = {
            "documents": sum(r["documents"] for r in shards),
            "tokens": sum(r["tokens"] for r in shards),
            "shards": shards,
        }
    for p in sorted((out / "tokenizer").iterdir()):
        files[f"tokenizer/{p.name}"] = sha256_file(p)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tokenizer": {**tok_info, "dir": "tokenizer"},
        "dtype": dtype.name,
        "bos": bool(opts.bos and tok_info["bos_id"] is not None),
        "document_end": "every document ends with eos_id",
        "splits": splits,
        "documents_read": n_docs,
        "skipped": report.to_dict(),
        "files": files,
        "inputs": [s.record() for s in sources],
        "command": opts.command,
        "fingerprint": fingerprint,
        **({"task": task} if task else {}),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest

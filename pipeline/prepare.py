"""`python -m pipeline.prepare`: corpus -> tokenizer + .bin/.idx shards + manifest.json. Parses the
flags and calls `pipeline.data` (prepare.py runs the streaming pipeline, verify.py rechecks;
`--num-tasks N --task-index I` runs one of N tasks across nodes, tasks.py / merge.py, and `--merge`
writes their single manifest).

User errors (bad flags, bad input, refused output dir) print `error: ...` and exit 2 with no
traceback; a failed --verify exits 1; Ctrl-C exits 130 and the same command resumes.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from pipeline.cli import user_errors_exit_2
from pipeline.data.prepare import PrepareOptions, prepare
from pipeline.data.readers import ReaderOptions
from pipeline.data.tasks import resolve_task

EPILOG = """examples:
  python -m pipeline.prepare --input corpus/ --output data/c1 \
      --train-tokenizer bpe --vocab-size 32000 --workers 8
  python -m pipeline.prepare --input 'dumps/*.jsonl.zst' --text-key content \
      --output data/c2 --tokenizer data/c1
  python -m pipeline.prepare --verify data/c1
  # across nodes: task I of N (under `sbatch --array=0-N-1` both come from SLURM), then one merge
  python -m pipeline.prepare --input 'dumps/*.jsonl' --output data/c3 --tokenizer data/c1 \
      --num-tasks 8 --task-index 0
  python -m pipeline.prepare --merge data/c3
"""


def _size(text: str) -> int:
    """`64M`, `1G`, `4096` -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.prepare",
        epilog=EPILOG,
        description="Tokenise a corpus into Megatron .bin/.idx shards with a manifest.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("input / output")
    io.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="files, directories (recursive), globs, hf:owner/name (Hub, streamed; needs network), or "
        "stdlib: (this Python's standard-library sources, a built-in corpus)",
    )
    io.add_argument(
        "--output", type=Path, metavar="DIR", help="output dir (shards, manifest.json, tokenizer/)"
    )
    io.add_argument("--verify", type=Path, metavar="DIR", help="recheck checksums and index structure of DIR")
    io.add_argument(
        "--merge",
        type=Path,
        metavar="DIR",
        help="write DIR/manifest.json from the finished tasks of a --num-tasks prepare into DIR",
    )
    io.add_argument(
        "--format",
        dest="input_format",
        default="auto",
        choices=["auto", "text", "jsonl", "parquet"],
        help="input format (default: by file extension)",
    )
    io.add_argument("--text-key", default="text", help="JSON key / column holding the text (default: text)")
    io.add_argument(
        "--text-mode",
        default="file",
        choices=["file", "paragraph", "line"],
        help="plain text: one document per file, per blank-line-separated block, or per line",
    )
    io.add_argument("--hf-split", default="train", help="split of a saved/Hub HF dataset (default: train)")
    io.add_argument("--hf-config", default=None, help="config name of a Hub dataset")
    io.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a different dataset already in --output (the new one is built beside it, in "
        "DIR/.overwrite, and swapped in once complete; only prepare's own files are removed)",
    )
    tk = p.add_argument_group("tokenizer")
    tk.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="SentencePiece .model, tokenizer.json, HF tokenizer dir, or a prepared data dir",
    )
    tk.add_argument("--train-tokenizer", choices=["bpe", "unigram"], help="train a SentencePiece model")
    tk.add_argument("--vocab-size", type=int, help="vocab size of the trained tokenizer")
    tk.add_argument(
        "--tokenizer-sample-docs",
        type=int,
        default=1_000_000,
        help="train on at most this many leading documents (default: 1,000,000)",
    )
    tk.add_argument(
        "--tokenizer-sample-bytes",
        type=_size,
        default=64 << 20,
        help="... and at most this much text, e.g. 64M (default: 64M)",
    )
    tk.add_argument("--eos-token", help="EOS token string, if an HF tokenizer does not declare one")
    tk.add_argument("--bos", action="store_true", help="also start every document with BOS")
    sh = p.add_argument_group("shards")
    sh.add_argument("--shard-size-mb", type=float, default=512.0, help="target shard size (default: 512)")
    sh.add_argument("--shard-size-tokens", type=int, help="target shard size in tokens (overrides MB)")
    sh.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "uint16", "int32"],
        help="token dtype (auto: uint16 below 65,500 ids, else int32)",
    )
    sh.add_argument(
        "--valid-fraction",
        type=float,
        default=0.01,
        help="fraction of documents (by seeded content hash) in the valid split (default: 0.01)",
    )
    sh.add_argument("--seed", type=int, default=1234, help="seed of the train/valid split (default: 1234)")
    bad = p.add_argument_group("bad input")
    bad.add_argument("--on-invalid-utf8", default="error", choices=["error", "skip", "replace"])
    bad.add_argument(
        "--on-bad-record",
        default="error",
        choices=["error", "skip"],
        help="malformed JSON line, missing key, non-string text",
    )
    bad.add_argument(
        "--max-doc-chars", type=int, default=10_000_000, help="longest document (default: 10M chars)"
    )
    bad.add_argument(
        "--on-huge-doc",
        default="split",
        choices=["split", "error", "skip"],
        help="a longer document is split into pieces (default), an error, or skipped",
    )
    run = p.add_argument_group("run")
    run.add_argument("--workers", type=int, default=1, help="tokeniser processes (default: 1)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--num-tasks",
        type=int,
        help="split the inputs over N tasks (nodes), each run separately, then --merge "
        "(default: SLURM_ARRAY_TASK_COUNT when set, else 1)",
    )
    run.add_argument(
        "--task-index",
        type=int,
        help="which task this is, 0..N-1 (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN when set)",
    )
    return p


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verify is not None:
            from pipeline.data.verify import verify

            problems = verify(args.verify)
            if problems:
                print(
                    f"error: {args.verify} failed verification:\n  " + "\n  ".join(problems), file=sys.stderr
                )
                return 1
            print(f"{args.verify}: all checksums and indexes verify")
            return 0
        if args.merge is not None:
            from pipeline.data.merge import merge_tasks

            merged = merge_tasks(args.merge, args.num_tasks, shlex.join(["python", "-m", "pipeline.prepare", *argv]))
            print(f"merged {merged['tasks']['count']} tasks into {args.merge / 'manifest.json'}: " + ", ".join(
                f"{s} {m['documents']:,} docs / {m['tokens']:,} tokens in {len(m['shards'])} shard(s)"
                for s, m in merged["splits"].items()))
            return 0
        if not args.input or not args.output:
            parser.error("--input and --output are required (or use --verify DIR / --merge DIR)")
        task_index, num_tasks = resolve_task(args.num_tasks, args.task_index)
        if num_tasks > 1 and args.num_tasks is None:  # say so: an array job of unrelated prepares must not split
            print(f"task {task_index} of {num_tasks} (from SLURM_ARRAY_TASK_*; pass --num-tasks 1 to prepare "
                  "all inputs in this task)", flush=True)
        opts = PrepareOptions(
            inputs=args.input,
            output=args.output,
            tokenizer=args.tokenizer,
            train_tokenizer=args.train_tokenizer,
            vocab_size=args.vocab_size,
            reader=ReaderOptions(
                text_key=args.text_key,
                text_mode=args.text_mode,
                input_format=args.input_format,
                on_invalid_utf8=args.on_invalid_utf8,
                on_bad_record=args.on_bad_record,
                max_doc_chars=args.max_doc_chars,
                on_huge_doc=args.on_huge_doc,
                hf_split=args.hf_split,
                hf_config=args.hf_config,
            ),
            workers=args.workers,
            valid_fraction=args.valid_fraction,
            seed=args.seed,
            bos=args.bos,
            shard_size_mb=args.shard_size_mb,
            shard_size_tokens=args.shard_size_tokens,
            dtype=args.dtype,
            tokenizer_sample_docs=args.tokenizer_sample_docs,
            tokenizer_sample_bytes=args.tokenizer_sample_bytes,
            eos_token=args.eos_token,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            command=shlex.join(["python", "-m", "pipeline.prepare", *argv]),
            num_tasks=num_tasks,
            task_index=task_index,
        )
        prepare(opts)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

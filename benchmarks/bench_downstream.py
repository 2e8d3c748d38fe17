"""Cost of in-loop downstream evaluation, relative to a training step of the same run; and the
KV cache's gain in generation.

    python benchmarks/bench_downstream.py [--data DIR] [--steps 20] [--interval 10] [--nproc 2] [--tasks ...]
    python benchmarks/bench_downstream.py --decode [--prompt 128] [--new 64] [--batch 8]

Trains the quickstart recipe (debug preset, ZeRO-3, expert parallelism over 2 ranks, activation
checkpointing, bf16) under torchrun with `eval.tasks=[pycode_tiny]` (the shipped 40-item
multiple-choice task: 32 questions x 4 choices = 128 requests, 0-shot; `--tasks pycode_gen` for the
8-prompt generation task, 16 greedy tokens each) every `--interval` steps, and
prints the seconds each evaluation took (`downstream/seconds` in metrics.jsonl, harness and all
forwards) against the median seconds of a training step (from `perf/tokens_per_s`). Without --data
it tokenizes a small corpus of Python stdlib sources into a temp dir first.

--decode: one process, fp32, the generation path of `generate_until` (generation.generate_dealt) on
`--batch` random prompts of `--prompt` tokens, `--new` greedy tokens each, with the KV cache (one
token per forward) and without it (every step reruns the whole sequence), on the debug preset and on
a wider model; prints ms per generated token side by side and checks both generated the same text.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_train import prepare_corpus  # noqa: E402


class _FullSequence:
    """The baseline's "cache": the tokens so far and the row padding; every step reruns them all."""

    def __init__(self, pad_B):
        self.pad_B, self.ids_BT = pad_B, None


class NoCacheDecoder:
    """generation.Decoder without incremental decoding: each step runs prompt + tokens so far through a
    fresh cache (same masks and positions, so the same logits), the cost of decoding with no KV cache."""

    def __init__(self, module):
        self.module = module

    def new_cache(self, batch, max_len, device, pad_B):
        return _FullSequence(pad_B)

    def step(self, ids_BT, seq):
        import torch

        seq.ids_BT = ids_BT if seq.ids_BT is None else torch.cat([seq.ids_BT, ids_BT], dim=1)
        fresh = self.module.new_cache(seq.ids_BT.shape[0], seq.ids_BT.shape[1], seq.ids_BT.device, seq.pad_B)
        return self.module(seq.ids_BT, cache=fresh)[0]


def bench_decode(prompt_len: int, new: int, batch: int) -> None:
    import time

    import torch

    from pipeline.data import load_tokenizer
    from pipeline.evaluation.generation import Decoder, GenerationSettings, generate_dealt
    from pipeline.model import GPTOSS, get_preset

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(prepare_corpus(Path(tmp) / "data"))
    settings = GenerationSettings(until=(), max_gen_toks=new)  # no stop string: every row runs `new` tokens
    gen = torch.Generator().manual_seed(0)
    for name, overrides in (("debug", {}), ("debug, n_embd 512, 8 heads", {"n_embd": 512, "n_head": 8,
                                                                           "intermediate_size": 512})):
        torch.manual_seed(0)
        model = GPTOSS(get_preset("debug", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                                  block_size=prompt_len + new, **overrides)).eval()
        contexts = [torch.randint(1, tokenizer.vocab_size, (prompt_len - (i % 4),), generator=gen).tolist()
                    for i in range(batch)]  # unequal lengths: left padding
        dummy = lambda: None  # noqa: E731  (one process: no ranks to keep in step)
        times, texts = {}, {}
        for label, decoder in (("kv cache", Decoder(model)), ("no cache", NoCacheDecoder(model))):
            start = time.perf_counter()
            texts[label], _ = generate_dealt(contexts, settings, decoder, tokenizer, dummy, torch.device("cpu"),
                                             batch, tokenizer.eos_id, 0, 1)
            times[label] = time.perf_counter() - start
        same = texts["kv cache"] == texts["no cache"]
        per_tok = {k: 1000 * v / (batch * new) for k, v in times.items()}
        print(f"{name}: {batch} prompts x {prompt_len} tokens, {new} new: kv cache {per_tok['kv cache']:.2f} ms/token, "
              f"no cache {per_tok['no cache']:.2f} ms/token = {times['no cache'] / times['kv cache']:.1f}x "
              f"(same text: {same})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="questions per evaluation (default: all 32)")
    parser.add_argument("--tasks", nargs="+", default=["pycode_tiny"], help="tasks evaluated in the loop")
    parser.add_argument("--decode", action="store_true", help="KV cache vs none, one process (see above)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    if args.decode:
        bench_decode(args.prompt, args.new, args.batch)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else prepare_corpus(tmp / "data")
        run_dir = tmp / "run"
        overrides = [f"run_dir={run_dir}", f"data.train=[{data}]", f"train.steps={args.steps}",
                     "train.log_interval=1", "train.eval_interval=0", "train.eval_iters=0", "train.save_interval=0",
                     f"eval.downstream_interval={args.interval}", f"eval.tasks=[{','.join(args.tasks)}]"]
        if args.limit:
            overrides.append(f"eval.limit={args.limit}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "pipeline.train", "--config", str(REPO_ROOT / "launch/configs/quickstart.yaml"), *overrides]
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, capture_output=True, text=True)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = 8 * args.nproc * 128  # quickstart: micro-batch 8 x seq 128 per rank
    step_s = statistics.median(tokens_per_step / r["perf/tokens_per_s"] for r in records[2:]
                               if "perf/tokens_per_s" in r)
    evals = [(r["step"], r["downstream/seconds"], {k.removeprefix("downstream/"): v for k, v in r.items()
                                                    if k.endswith(("/acc", "/exact_match"))})
             for r in records if "downstream/seconds" in r]
    print(f"training step (median): {step_s:.3f} s; tasks {', '.join(args.tasks)}")
    for step, seconds, scores in evals:
        print(f"downstream eval at step {step}: {seconds:.2f} s = {seconds / step_s:.1f} training steps "
              f"({', '.join(f'{k} {v:.3f}' for k, v in scores.items())})")


if __name__ == "__main__":
    main()

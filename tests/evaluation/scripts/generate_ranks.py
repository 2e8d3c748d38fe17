"""Rank script for tests/evaluation/test_generation_ranks.py: generation requests dealt over the ranks
by `Scorer.generate` (rank 0 sends, the others serve), on a plain model built with the same seed on
every rank.

    torchrun --standalone --nproc_per_node 2 generate_ranks.py TOKENIZER_DIR OUT_DIR

Writes OUT_DIR/rank{R}.json: {"forwards": forwards this rank ran, "texts": the texts (rank 0) or null}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.evaluation.generation_case import BATCH_SIZE, contexts, model, settings


def main() -> int:
    from pipeline.data import load_tokenizer
    from pipeline.distributed.process_group import init_distributed
    from pipeline.evaluation.generation import Decoder
    from pipeline.evaluation.harness import Scorer

    tok_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    view = init_distributed(60)
    tok = load_tokenizer(tok_dir)
    m = model(tok)
    scorer = Scorer(lambda ids: m(ids)[0], "cpu", BATCH_SIZE, pad_id=tok.eos_id, decoder=Decoder(m), tokenizer=tok)
    texts = None
    with torch.no_grad():
        if view.rank == 0:
            texts = scorer.generate(contexts(tok), settings())
            scorer.stop()
        else:
            scorer.serve()
    (out / f"rank{view.rank}.json").write_text(json.dumps({"forwards": scorer.forwards, "texts": texts}))
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)

"""Generation dealt over 2 real ranks (gloo): the same texts as one process, and every rank runs the
same number of forwards (ZeRO-3 and expert parallelism make every forward collective), also while a
rank has no batch left."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.data import load_tokenizer
from pipeline.evaluation.generation import Decoder, generate_dealt
from tests.evaluation.generation_case import BATCH_SIZE, contexts, model, settings
from tests.ranks import torchrun

SCRIPT = Path(__file__).parent / "scripts" / "generate_ranks.py"


def test_two_ranks_generate_as_one_process_in_step(hf_tokenizer_dir, tmp_path):
    torchrun(2, [str(SCRIPT), str(hf_tokenizer_dir), str(tmp_path)], timeout=120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["forwards"] == ranks[1]["forwards"]

    tok = load_tokenizer(hf_tokenizer_dir)
    m = model(tok)
    texts, n = generate_dealt(contexts(tok), settings(), Decoder(m), tok, lambda: None, "cpu",
                              BATCH_SIZE, tok.eos_id, 0, 1)  # one process: never an empty batch
    assert ranks[0]["texts"] == texts
    assert len(set(texts)) == len(texts) and min(map(len, texts)) < max(map(len, texts))
    # One process decodes 3 batches; two ranks decode 2 rounds, so fewer forwards each.
    assert ranks[0]["forwards"] < n

"""Generation dealt over 2 real ranks (gloo): the same texts as one process, and every rank runs the
same number of forwards (ZeRO-3 and expert parallelism make every forward collective), also while a
rank has no batch left. A sequence-parallel model (one process: the wrapping only) generates as the
unsplit one and is sequence-parallel again afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def test_sequence_parallel_model_generates_whole_requests_then_is_sharded_again(hf_tokenizer_dir):
    """Generation under sequence parallelism: while it decodes, the SP model computes whole sequences
    (sequence_parallel.whole_sequences, applied by generate_dealt), so it gives the unsplit model's
    texts; afterwards, and after an error inside, it is the same SP model again. No ranks needed:
    apply_sequence_parallel only wraps (its collectives run in the forward, which decoding bypasses).
    The 4-rank SP 2 x EP 2 run in tests/distributed/test_sequence_parallel.py generates in the loop."""
    from pipeline.distributed.sequence_parallel import SequenceGroups, apply_sequence_parallel, whole_sequences
    from pipeline.model import TopKRouter

    tok = load_tokenizer(hf_tokenizer_dir)
    reference, _ = generate_dealt(contexts(tok), settings(), Decoder(model(tok)), tok, lambda: None, "cpu",
                                  BATCH_SIZE, tok.eos_id, 0, 1)
    sp = model(tok)
    assert apply_sequence_parallel(sp, SequenceGroups(size=2, rank=1, group=None)) == sp.config.n_layer

    def state() -> tuple:
        return (sp.sequence_shard, [type(b.attn.core).__name__ for b in sp.blocks],
                [m.reduce_counts for m in sp.modules() if isinstance(m, TopKRouter)])

    sharded = state()
    assert sharded[0].count == 2 and set(sharded[1]) == {"UlyssesAttention"} and None not in sharded[2]
    with pytest.raises(ValueError, match="this model is sequence-sharded"):  # outside: refused, as before
        sp(torch.tensor([contexts(tok)[0]]), cache=sp.new_cache(1, 32, "cpu"))
    texts, _ = generate_dealt(contexts(tok), settings(), Decoder(sp), tok, lambda: None, "cpu",
                              BATCH_SIZE, tok.eos_id, 0, 1)
    assert texts == reference and len(set(texts)) == len(texts)
    assert state() == sharded
    with pytest.raises(RuntimeError, match="inside"), whole_sequences(sp):
        assert sp.sequence_shard is None and {type(b.attn.core).__name__ for b in sp.blocks} == {"AttentionCore"}
        raise RuntimeError("inside")
    assert state() == sharded

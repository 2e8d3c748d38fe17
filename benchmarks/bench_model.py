"""Forward+backward throughput of our GPTOSS vs transformers' GptOssForCausalLM, same weights and batch.

    python benchmarks/bench_model.py [--threads 2] [--steps 5]

Prints tokens/s for both and the ratio, then our MoE layer alone (grouped_mm) vs the same experts run
as a per-expert Python loop. transformers runs with its best CPU settings: GptOss does not support
SDPA, so attention is "eager"; experts use its default "grouped_mm" implementation.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GptOssForCausalLM

from pipeline.model import GPTOSS, MoE, config_to_hf, get_preset, state_dict_to_hf


class LoopExperts(torch.nn.Module):
    """The same experts run one at a time (the naive baseline)."""

    def __init__(self, experts):
        super().__init__()
        self.inner = experts

    def forward(self, x_MD, counts_E):
        return self.inner.forward_reference(x_MD, counts_E)


def timed(fns, steps: int) -> list[float]:
    """Median seconds per call of each fn, after a warm-up, run interleaved (a, b, a, b, ...) so
    that load from other processes on a shared machine affects all of them alike."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(steps):
        for fn, t in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # A small GPT-OSS: every feature of the real model (GQA, sinks, sliding/full, YaRN, biases).
    cfg = get_preset(
        "debug",
        vocab_size=8192,
        n_layer=4,
        n_embd=256,
        n_head=8,
        n_kv_head=2,
        head_dim=32,
        intermediate_size=256,
        n_experts=8,
        top_k=2,
        block_size=args.seq,
        sliding_window=64,
        rope_scaling=dict(factor=4.0, original_max_position_embeddings=args.seq // 4),
    )
    torch.manual_seed(0)
    ours = GPTOSS(cfg).train()
    hf = GptOssForCausalLM._from_config(
        config_to_hf(cfg), attn_implementation="eager", experts_implementation="grouped_mm"
    ).train()
    hf.load_state_dict(state_dict_to_hf(ours.state_dict(), cfg))
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    tokens = x.numel()

    def step_ours():
        _, loss, aux = ours(x, x)
        (loss + aux).backward()

    def step_hf():
        hf(input_ids=x, labels=x).loss.backward()

    t_ours, t_hf = timed([step_ours, step_hf], args.steps)
    print(
        f"config: {cfg.n_layer}x{cfg.n_embd}, {cfg.n_experts} experts top-{cfg.top_k}, "
        f"batch {args.batch}x{args.seq}, fp32, {args.threads} threads"
    )
    print(f"{'model fwd+bwd':<28}{'tokens/s':>12}")
    print(f"{'ours (SDPA + grouped_mm)':<28}{tokens / t_ours:>12,.0f}")
    print(f"{'transformers (eager)':<28}{tokens / t_hf:>12,.0f}")
    print(f"ratio ours / transformers: {t_hf / t_ours:.2f}x")

    moe = ours.blocks[0].ffn
    assert isinstance(moe, MoE)
    h = torch.randn(args.batch, args.seq, cfg.n_embd, requires_grad=True)

    def step_moe():
        y, loss = moe(h)
        (y.sum() + loss).backward()

    grouped, loop = moe.experts, LoopExperts(moe.experts)

    def step_moe_loop():
        moe.experts = loop
        step_moe()
        moe.experts = grouped

    t_grouped, t_loop = timed([step_moe, step_moe_loop], args.steps)
    print(f"{'MoE layer fwd+bwd':<28}{'tokens/s':>12}")
    print(f"{'grouped_mm':<28}{tokens / t_grouped:>12,.0f}")
    print(f"{'per-expert loop':<28}{tokens / t_loop:>12,.0f}")
    print(f"ratio grouped / loop: {t_loop / t_grouped:.2f}x")


if __name__ == "__main__":
    main()

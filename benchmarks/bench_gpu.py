"""Training speed of a gpt-oss-20b-shaped slice on one GPU: FlexAttention vs today's SDPA path.

    python benchmarks/bench_gpu.py [--layers 2] [--seq 4096] [--steps 10] [--warmup 3]

On CUDA (bf16): the gpt-oss-20b architecture (hidden 2880, 64 q / 8 kv heads, head_dim 64, 32
experts top-4, vocab 201,088, window 128 on even layers, sinks) cut to --layers blocks, trained
through the real DeepSpeed ZeRO-3 engine on one rank (the trainer's `build_engine`; optim.implementation
=auto: torch's fused AdamW).
For attention_backend=flex and =sdpa it prints tokens/s, model TFLOP/s and MFU (FLOPs from
pipeline/model/flops.py, peak from the GPU name), peak memory and the attention kernel that ran, then
the ratio flex / sdpa. Then the attention layer alone, forward + backward, on a full and a sliding
layer: ours (flex + sinks) vs SDPA flash attention without sinks or window (the practical limit)
vs the SDPA virtual-sink path. With ZeRO-3's fp32 master weights and Adam states (18 B/param), 2
layers (2.8 B params with the 201k vocabulary) fit an 80 GB H100; try --layers 4 on an H200.

On CPU it runs a tiny config end to end so the script stays runnable anywhere: FlexAttention has
no CPU backward in torch 2.13, so only the sdpa backend trains there, and the attention comparison
is forward only.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import socket
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.config_utils import from_dict
from pipeline.distributed.process_group import init_distributed
from pipeline.hardware import detect_peak_tflops
from pipeline.model import get_gpt_oss_20b_config, get_preset
from pipeline.model.attention import sdpa_attention_with_sinks
from pipeline.model.flex_attention import flex_attention_with_sinks
from pipeline.model.flops import flops_per_token
from pipeline.model.masks import attention_mask, block_mask
from pipeline.train.config import RunConfig
from pipeline.train.ds_config import build_ds_config
from pipeline.train.engine import build_engine, release_engine
from pipeline.train.objective import compute_loss

CUDA = torch.cuda.is_available()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slice_config(args, backend: str):
    if CUDA:
        return get_gpt_oss_20b_config(n_layer=args.layers, block_size=args.seq, attention_backend=backend)
    # Tiny GPT-OSS (GQA, sinks, sliding/full, MoE) for the CPU run.
    return get_preset(
        "debug", vocab_size=2048, n_layer=args.layers, block_size=args.seq, n_embd=128, n_head=8, n_kv_head=2,
        head_dim=16, intermediate_size=128, n_experts=4, top_k=2, sliding_window=32, attention_backend=backend,
    )


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def sdpa_kernel_for(model_cfg, seq: int, device) -> str:
    """The SDPA kernel the sdpa backend's attention call gets: try each fused one alone, then math."""
    H, G, d = model_cfg.n_head, model_cfg.kv_heads, model_cfg.head_size
    dtype = torch.bfloat16 if CUDA else torch.float32
    q = torch.randn(1, H, seq, d, device=device, dtype=dtype)
    k, v = (torch.randn(1, G, seq, d, device=device, dtype=dtype) for _ in range(2))
    mask = attention_mask(seq, seq, None, model_cfg.use_attention_sinks, device)
    sinks = torch.zeros(H, device=device) if model_cfg.use_attention_sinks else None
    for kernel in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([kernel]):
                sdpa_attention_with_sinks(q, k, v, mask, sinks, d**-0.5)
            return f"sdpa:{kernel.name.lower()}"
        except RuntimeError:
            continue
    return "sdpa:math (fp32 upcast, [B, H, T, T+1] scores)"


def train_run(args, backend: str, world: int) -> dict:
    """Steps of the real ZeRO-3 engine; tokens/s over the timed steps."""
    model_cfg = slice_config(args, backend)
    run = from_dict(RunConfig, {
        "model": {"preset": "gpt-oss-20b"},
        "data": {"train": ["unused"], "seq_len": args.seq},
        "optim": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 0, "implementation": "auto"},
        "train": {"steps": args.warmup + args.steps, "micro_batch_size": args.batch, "seed": 0},
        "parallel": {"activation_checkpointing": args.checkpointing},
        "precision": "bf16" if CUDA else "fp32",
    })
    engine = build_engine(run, model_cfg, build_ds_config(run, world), world)
    try:
        return measure(args, engine, model_cfg, backend)
    finally:
        # DeepSpeed 0.19.8 would keep this engine (~50 GB for the 20b slice) alive after `del`, and
        # the next backend's engine would not fit next to it; also after a failed run.
        release_engine(engine)


def measure(args, engine, model_cfg, backend: str) -> dict:
    device = engine.device
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model_cfg.vocab_size, (args.batch, args.seq + 1), generator=gen) for _ in range(2)]
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for step in range(args.warmup + args.steps):
        batch = batches[step % 2].to(device)
        sync()
        start = time.perf_counter()
        parts = compute_loss(engine, batch)
        engine.backward(parts.total)
        engine.step()
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        loss = parts.lm
    tokens_per_s = args.batch * args.seq / statistics.median(times)
    tflops = tokens_per_s * flops_per_token(model_cfg, args.seq)["total"] / 1e12
    peak = detect_peak_tflops()
    if engine.module.attention_backend(device) == "flex":
        kernel = "flex_attention (compiled, block-sparse)"
    else:
        kernel = sdpa_kernel_for(model_cfg, args.seq, device)
    result = {
        "backend": backend, "tokens_per_s": tokens_per_s, "tflops": tflops, "mfu": tflops / peak if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else None, "kernel": kernel,
        "loss": float(loss.detach()), "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                           for p in engine.module.parameters()),
    }
    return result


def release_engine_memory() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def time_ms(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def attention_alone(args, model_cfg, device) -> list[tuple[str, str, float]]:
    """(layer kind, implementation, ms) for one attention layer's kernel, fwd+bwd on CUDA, fwd on CPU."""
    H, G, d, T = model_cfg.n_head, model_cfg.kv_heads, model_cfg.head_size, args.seq
    dtype = torch.bfloat16 if CUDA else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(args.batch, H, T, d, device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(args.batch, G, T, d, device=device, dtype=dtype, generator=gen) for _ in range(2))
    sinks = torch.randn(H, device=device, generator=gen)
    if CUDA:
        for t in (q, k, v, sinks):
            t.requires_grad_()
    grad = torch.randn_like(q)

    def run(fn):
        def step():
            out = fn()
            if CUDA:
                torch.autograd.backward(out, grad)
        return step

    rows = []
    for kind, window in (("full", None), ("sliding", model_cfg.sliding_window)):
        bm = block_mask(window, T, device)
        mask = attention_mask(T, T, window, True, device)
        ours = run(lambda bm=bm: flex_attention_with_sinks(q, k, v, bm, sinks, d**-0.5))
        rows.append((kind, "ours: flex + sinks" + (", window" if window else ""), time_ms(ours, args.reps)))

        def flash():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if CUDA else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        rows.append((kind, "SDPA flash, no sinks, no window", time_ms(run(flash), args.reps)))
        virtual = run(lambda mask=mask: sdpa_attention_with_sinks(q, k, v, mask, sinks, d**-0.5))
        rows.append((kind, "SDPA virtual sink (sdpa backend)", time_ms(virtual, args.reps)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096 if CUDA else 256)
    parser.add_argument("--batch", type=int, default=1 if CUDA else 2)
    parser.add_argument("--steps", type=int, default=10 if CUDA else 4)
    parser.add_argument("--warmup", type=int, default=3 if CUDA else 1)
    parser.add_argument("--reps", type=int, default=20 if CUDA else 5)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    world = init_distributed().world
    if world != 1:
        raise SystemExit("bench_gpu.py measures one rank: run it with plain python")

    backends = ("flex", "sdpa") if CUDA else ("sdpa",)
    cfg = slice_config(args, "sdpa")
    device = torch.device("cuda" if CUDA else "cpu")
    where = torch.cuda.get_device_name() if CUDA else f"CPU, {torch.get_num_threads()} threads"
    print(f"model: {'gpt-oss-20b slice' if CUDA else 'tiny GPT-OSS (CPU)'}, {cfg.n_layer} layers, hidden {cfg.n_embd}, "
          f"{cfg.n_head}q/{cfg.kv_heads}kv heads x {cfg.head_size}, {cfg.n_experts} experts top-{cfg.top_k}, "
          f"vocab {cfg.vocab_size:,}, window {cfg.sliding_window}, sinks")
    print(f"DeepSpeed ZeRO-3, 1 rank, {'bf16' if CUDA else 'fp32'}, batch {args.batch} x seq {args.seq}, "
          f"median of {args.steps} steps after {args.warmup} warm-up; activation checkpointing "
          f"{'on' if args.checkpointing else 'off'}; {where}")
    if not CUDA:
        print("CPU: FlexAttention has no CPU backward in torch 2.13, so only attention_backend=sdpa trains here")
    print()
    header = (f"{'backend':<9}{'tokens/s':>11}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'loss':>9}{'M params':>10}"
              "  attention kernel")
    print(header)
    print("-" * len(header), flush=True)
    # Each backend's row is printed as soon as it is measured: a later failure (out of memory, a
    # timeout) keeps the figures already printed.
    results = []
    for backend in backends:
        try:
            r = train_run(args, backend, world)
        except Exception as e:  # noqa: BLE001 (report it, measure the rest)
            print(f"{backend:<9}FAILED {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                  flush=True)
            r = None
        release_engine_memory()  # after the except block: its traceback held the failed run's tensors
        if r is None:
            continue
        results.append(r)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        print(f"{r['backend']:<9}{r['tokens_per_s']:>11,.0f}{r['tflops']:>10.3g}{mfu:>8}{mem:>10}"
              f"{r['loss']:>9.4f}{r['params'] / 1e6:>10,.1f}  {r['kernel']}", flush=True)
    if len(results) == 2:
        print(f"\nflex / sdpa tokens/s: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x", flush=True)

    what = "forward + backward" if CUDA else "forward only (no CPU FlexAttention backward)"
    print(f"\nattention layer alone, batch {args.batch} x seq {args.seq}, {what}, median of {args.reps}:")
    rows = attention_alone(args, cfg, device)
    for kind in ("full", "sliding"):
        mine = [r for r in rows if r[0] == kind]
        flash_ms = mine[1][2]
        for _, name, ms in mine:
            print(f"  {kind:<8}{name:<36}{ms:>10.2f} ms  {ms / flash_ms:>6.2f}x flash", flush=True)
    if len(results) < len(backends):
        raise SystemExit(f"{len(backends) - len(results)} backend(s) failed (see above)")
    if not all(math.isfinite(r["loss"]) for r in results):
        raise SystemExit("non-finite loss")


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)

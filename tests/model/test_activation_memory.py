"""The activation model (pipeline/model/activation_memory.py) against what the model really keeps:
autograd's saved tensors per attention kernel, the allocator's peak inside the chunked LM loss, and
the kernel the planner assumes for each `model.attention_backend`."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from torch._C._profiler import _EventType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from pipeline.model import GPTOSS, get_preset
from pipeline.model.activation_memory import attention_kernel, chunked_loss_bytes
from pipeline.model.loss import default_chunk_rows, linear_cross_entropy
from pipeline.plan import main
from pipeline.planning import activation_memory
from tests.ranks import torchrun

TINY = {  # name: (preset, overrides)
    "debug": ("debug", {}),
    "debug-gqa6": ("debug", {"intermediate_size": 96, "n_head": 6, "head_dim": 8}),
    "debug-documents": ("debug", {"document_masking": True, "eos_token_id": 0}),
    "moe-124m": ("moe-124m", {"n_layer": 2, "n_embd": 64, "n_head": 4, "intermediate_size": 96, "vocab_size": 512}),
    "gpt2-dense": ("gpt2-dense", {"n_layer": 2, "n_embd": 64, "n_head": 4, "intermediate_size": 96, "vocab_size": 512}),
}


def saved_bytes(model: torch.nn.Module, run) -> int:
    """Bytes autograd saves for backward while `run()` executes (each storage once, parameters not)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):  # many ops save views of the same tensor
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(saved.values())


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("kernel", ["sdpa-fused", "sdpa-math"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_model_matches_saved_tensors(name, kernel, dtype):
    """The trainer's forward (chunked loss) under SDPA's fused CPU kernel and under the math kernel
    CUDA runs for SDPA with sinks (fp32 [B, H, T, T+1] scores); FlexAttention: the gpu test below."""
    preset, overrides = TINY[name]
    cfg = get_preset(preset, **overrides)
    torch.manual_seed(0)
    model = GPTOSS(cfg).to(dtype)
    B, T = 2, 128
    x = torch.randint(0, cfg.vocab_size, (B, T))
    math = sdpa_kernel(SDPBackend.MATH) if kernel == "sdpa-math" else contextlib.nullcontext()
    with math:
        measured = saved_bytes(model, lambda: model(x, x, return_logits=False))
    predicted = activation_memory(cfg, B, T, 2 if dtype == torch.bfloat16 else 4, kernel)
    assert predicted.saved_without_checkpointing == pytest.approx(measured, rel=0.02)


@pytest.mark.gpu
@pytest.mark.parametrize("backend, kernel", [("flex", "flex"), ("sdpa", "sdpa-math")])
def test_activation_model_matches_saved_tensors_on_cuda(backend, kernel):
    """What a CUDA training step keeps with each backend (FlexAttention has no CPU backward)."""
    cfg = get_preset("debug", attention_backend=backend)
    torch.manual_seed(0)
    model = GPTOSS(cfg).to("cuda", torch.bfloat16)
    B, T = 2, 128
    x = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    measured = saved_bytes(model, lambda: model(x, x, return_logits=False))
    assert attention_kernel(cfg) == kernel
    assert activation_memory(cfg, B, T, 2).saved_without_checkpointing == pytest.approx(measured, rel=0.03)


def peak_allocated(run) -> int:
    """Peak bytes the CPU allocator holds above the start while `run()` executes, from the profiler's
    allocation events (temporaries inside ops included). Scratch a matmul allocates and frees inside
    itself is left out: oneDNN's bf16 CPU GEMM takes some, cuBLAS uses a preallocated workspace."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = []  # (time, bytes, ptr, enclosing op)

    def walk(e, op):
        for child in e.children:
            if child.tag == _EventType.Allocation:
                events.append((child.start_time_ns, child.extra_fields.alloc_size, child.extra_fields.ptr, op))
            else:
                walk(child, child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, root)
    events.sort(key=lambda ev: ev[0])
    open_in_mm: dict[int, object] = {}
    scratch = set()
    for i, (_, nbytes, ptr, op) in enumerate(events):
        if nbytes > 0 and op is not None and op.name == "aten::mm":
            open_in_mm[ptr] = (i, op)
        elif nbytes < 0 and ptr in open_in_mm:
            j, mm = open_in_mm.pop(ptr)
            if mm is op:
                scratch |= {i, j}
    live = peak = 0
    for i, (_, nbytes, _, _) in enumerate(events):
        if i not in scratch:
            live += nbytes
            peak = max(peak, live)
    return peak


@pytest.mark.parametrize(
    "vocab, tokens, chunk_rows",
    [(512, 256, None), (512, 256, 64), (4096, 300, 64), (256, 3000, None)],
    ids=["one-chunk", "chunks", "big-vocab-chunks", "small-vocab"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_memory_matches_allocations(vocab, tokens, chunk_rows, dtype):
    """Forward + backward of pipeline/model/loss.py's chunked loss: what it saves, and its peak as
    the allocator sees it, at the chunk size loss.py picks (or the given one)."""
    cfg = get_preset("debug", vocab_size=vocab)
    torch.manual_seed(0)
    h = torch.randn(tokens, cfg.n_embd, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, cfg.n_embd, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    a = 2 if dtype == torch.bfloat16 else 4
    saved, peak = chunked_loss_bytes(cfg, tokens, a, chunk_rows)

    def fwd():
        return linear_cross_entropy(h, w, targets, chunk_rows)

    assert saved_bytes(torch.nn.Module(), fwd) == saved
    assert peak == pytest.approx(peak_allocated(lambda: fwd().backward()), rel=0.02)
    if chunk_rows is None:  # the planner's default: loss.py's own chunk size
        assert chunked_loss_bytes(cfg, tokens, a, default_chunk_rows(vocab)) == (saved, peak)


def test_attention_kernel_follows_the_trainers_backend_choice():
    gpt_oss = get_preset("gpt-oss-20b")  # sinks: SDPA needs head_dim + 1 columns
    assert attention_kernel(gpt_oss) == "flex"  # auto on CUDA
    assert attention_kernel(get_preset("gpt-oss-20b", attention_backend="sdpa")) == "sdpa-math"
    assert attention_kernel(get_preset("gpt-oss-20b", attention_backend="flex")) == "flex"
    assert attention_kernel(get_preset("gpt2-dense", attention_backend="sdpa")) == "sdpa-fused"
    assert attention_kernel(get_preset("gpt2-dense", dropout=0.1)) == "sdpa-fused"  # flex has no dropout


def test_activation_memory_follows_backend_and_loss():
    """At gpt-oss-20b scale: flex drops the T x T scores SDPA's math kernel keeps, and the loss keeps
    a weight-sized fp32 gradient instead of [N, V] logits."""
    B, T = 1, 4096
    cfg = get_preset("gpt-oss-20b")
    flex = activation_memory(cfg, B, T, 2)
    math = activation_memory(cfg, B, T, 2, "sdpa-math")
    H, sink = cfg.n_head, 1
    scores = 4 * B * H * T * (T + sink)  # fp32 softmax per block
    assert flex.attention_kernel == "flex" and math.attention_kernel == "sdpa-math"
    assert all(m - f > scores for f, m in zip(flex.per_block, math.per_block, strict=True))
    N, D, V = B * T, cfg.n_embd, cfg.vocab_size
    assert flex.loss_saved == 2 * N * D + 4 * V * D + 8
    assert flex.loss_peak < (2 + 12) * N * V  # plain cross_entropy: bf16 logits, fp32 log-softmax, 2 gradients
    # the weight-sized terms dominate, so twice the tokens cost little more at the loss
    assert activation_memory(cfg, 2 * B, T, 2).loss_peak < 1.1 * flex.loss_peak


def test_cli_config_reads_attention_backend(tmp_path, capsys):
    """`--config` plans with the run config's model.attention_backend."""
    runs = {}
    for backend in ("auto", "sdpa"):
        path = tmp_path / f"{backend}.yaml"
        path.write_text(f"model: {{preset: gpt-oss-20b, attention_backend: {backend}}}\ndata: {{train: [x]}}\n"
                        "parallel: {expert_parallel_size: 8, activation_checkpointing: true}\n")
        assert main(["--config", str(path), "--json"]) == 0
        runs[backend] = json.loads(capsys.readouterr().out)
        assert main(["--config", str(path)]) == 0
        text = capsys.readouterr().out
        kernel = "flex" if backend == "auto" else "sdpa-math"
        assert f"attention_backend {backend} -> {kernel} on CUDA" in text
    assert runs["auto"]["activations"]["attention_kernel"] == "flex"
    assert runs["sdpa"]["activations"]["attention_kernel"] == "sdpa-math"
    assert runs["sdpa"]["plan"]["activation_bytes"] > runs["auto"]["plan"]["activation_bytes"]


def test_sequence_parallel_activations_follow_measured_memory(tmp_path):
    """Per rank under sequence parallelism 1, 2, 4 at T = 1024 (4 gloo ranks, tests/model/scripts/sp_memory.py):
    the planner's saved tensors equal autograd's, and its activation figure falls with the SP size as
    the allocator's measured peaks do (forward, and forward + backward)."""
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "sp.json"
    proc = torchrun(4, [str(repo / "tests/model/scripts/sp_memory.py"), str(out)], timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    cfg = get_preset("debug", **report["preset"])
    measured = {int(sp): r for sp, r in report["results"].items()}
    planned = {sp: activation_memory(cfg, 1, report["T"], 4, "sdpa-fused", sp=sp) for sp in measured}
    for sp, r in measured.items():
        assert planned[sp].saved_without_checkpointing == pytest.approx(r["saved"], rel=0.01), sp
    for key in ("forward_peak", "peak"):
        for sp in (2, 4):
            got = measured[sp][key] / measured[1][key]
            want = planned[sp].total(False) / planned[1].total(False)
            assert got == pytest.approx(want, rel=0.07), (key, sp, got, want)
    assert measured[4]["peak"] < 0.45 * measured[1]["peak"]  # close to 1/N but for the whole-sequence mask

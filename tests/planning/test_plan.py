"""The planner against the real thing: model numel, DeepSpeed's ZeRO-3 partitions on 2 gloo ranks,
FlopCounterMode, autograd's saved tensors, and the CLI contract (counts, exit codes, shipped configs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model import GPTOSS, GroupedExperts, count_parameters, get_preset, list_presets
from pipeline.model.attention import attention_mask
from pipeline.model.flops import (
    active_matmul_params,
    flops_per_token,
    mean_keys_per_query,
    model_flops_utilization,
    seconds_at_mfu,
)
from pipeline.plan import main
from pipeline.planning import Planner, ZeroSettings, model_param_tensors, rank_elements, state_memory
from pipeline.planning.zero import DS_DEFAULTS
from pipeline.train.config import load_run_config
from tests.ranks import torchrun

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {"launch/configs/gpt-oss-20b-1node.yaml": 1, "launch/configs/gpt-oss-120b-8node.yaml": 8,
           "launch/configs/gpt-oss-20b-1node-128k.yaml": 1, "launch/configs/gpt-oss-120b-8node-64k.yaml": 8}


# --- parameter counts -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_presets())
def test_param_tensors_equal_model_numel(name):
    cfg = get_preset(name)
    with torch.device("meta"):  # numel of meta tensors is the real numel; nothing is allocated
        model = GPTOSS(cfg)
    tensors = model_param_tensors(cfg)
    unique = {id(p): p for p in model.parameters()}
    assert sum(t.numel for t in tensors) == sum(p.numel() for p in unique.values())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert sum(t.numel for t in tensors if t.expert) == experts
    counts = count_parameters(cfg)
    assert counts["total"] == sum(t.numel for t in tensors) and counts["expert"] == experts


def test_active_matmul_params_are_the_active_weight_matrices():
    cfg = get_preset("gpt-oss-120b")
    with torch.device("meta"):
        model = GPTOSS(cfg)
    dense = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    experts = sum(
        (m.gate_up_proj.numel() + m.down_proj.numel()) * cfg.top_k // m.num_experts
        for m in model.modules() if isinstance(m, GroupedExperts)
    )
    assert active_matmul_params(cfg)["total"] == dense + experts
    assert count_parameters(cfg)["active"] - (dense + experts) < 0.005 * (dense + experts)  # biases, norms


# --- ZeRO-3 partitions vs the DeepSpeed engine (2 gloo ranks) -----------------------------------------
CASES = [
    # the shipped recipe's dtypes, EP 2 (each expert slice partitioned over an EDP group of 1),
    # a persistence threshold that keeps biases/norms/router whole but partitions matrices
    {"ep": 2, "precision": "bf16", "grad_accum_dtype": "fp32", "persistence_threshold": 1000},
    # no EP, fp32, odd sizes (padding), small optimizer sub-groups
    {"ep": 1, "precision": "fp32", "persistence_threshold": 0, "sub_group_size": 5000,
     "model": {"n_embd": 63, "intermediate_size": 63, "vocab_size": 509}},
]


@pytest.fixture(scope="module")
def engine_state():
    proc = torchrun(2, [str(REPO / "tests/planning/scripts/zero3_state.py"), json.dumps(CASES)], check=False)
    lines = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    return lines


@pytest.mark.parametrize("case_idx", range(len(CASES)))
def test_zero3_state_equals_deepspeed_engine(engine_state, case_idx):
    sys.path.insert(0, str(REPO / "tests/planning/scripts"))
    from zero3_state import ds_config

    case = CASES[case_idx]
    cfg = get_preset("debug", **case.get("model", {}))
    zero = ZeroSettings.from_ds_config(ds_config(case))
    el = rank_elements(model_param_tensors(cfg), zero, world=2, ep=case["ep"])
    rows = state_memory(el, zero).rows

    def gpu_bytes(prefix: str) -> int:
        return next(gpu for label, gpu, _ in rows if label.startswith(prefix))

    for rank in engine_state:
        real = rank["results"][case_idx]
        assert real["partition"] == el.partition
        assert real["expert_partition"] == (el.expert_partition if case["ep"] > 1 else 0)
        assert real["expert_group_sizes"] == ([2 // case["ep"]] if case["ep"] > 1 else [])
        assert real["padding"] == el.padding
        assert real["persistent_count"] == el.persistent_count
        assert real["persistent_elements"] == el.full_params
        assert real["master_elements"] == el.partition and not real["master_is_param_buffer"]
        assert real["adam_elements"] == 2 * el.partition
        assert max(real["sub_groups"]) == el.optimizer_sub_group
        assert real["param_bytes"] == gpu_bytes("parameters: ZeRO-3 partition")
        assert real["grad_bytes"] == gpu_bytes("gradients: partition")
        assert real["master_bytes"] == gpu_bytes("optimizer: fp32 master")
        assert real["adam_bytes"] == gpu_bytes("optimizer: Adam")
        # one reduce bucket per partition group (pipeline/train/zero3_buckets.py): EP adds the experts'
        assert real["gradient_buckets"] == el.gradient_buckets == (2 if case["ep"] > 1 else 1)
        assert real["bucket_bytes"] == el.gradient_buckets * zero.reduce_bucket_size * zero.param_bytes
        # the trainer hooks whole blocks (train/engine.py hook_blocks_not_submodules): one gathers a block
        assert real["largest_hook_unit"] == el.largest_module
    if case["ep"] == 1:
        assert el.padding > 0  # the odd sizes really exercise the padding rule
    else:
        assert 0 < el.persistent_count < len(model_param_tensors(cfg))


def test_ds_defaults_match_deepspeed():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    parsed = DeepSpeedZeroConfig()
    assert parsed.param_persistence_threshold == DS_DEFAULTS["stage3_param_persistence_threshold"]
    assert parsed.model_persistence_threshold == DS_DEFAULTS["stage3_model_persistence_threshold"]
    assert parsed.sub_group_size == DS_DEFAULTS["sub_group_size"]
    assert parsed.reduce_bucket_size == DS_DEFAULTS["reduce_bucket_size"]
    assert parsed.prefetch_bucket_size == DS_DEFAULTS["stage3_prefetch_bucket_size"]
    assert parsed.max_live_parameters == DS_DEFAULTS["stage3_max_live_parameters"]
    assert parsed.contiguous_gradients == DS_DEFAULTS["contiguous_gradients"]


# --- FLOPs ---------------------------------------------------------------------------------------------
def test_flops_match_flop_counter():
    """FlopCounterMode has no formula for grouped_mm or CPU flash attention, so experts run their
    per-expert matmul path (n_embd 66 is not 16-byte aligned) and SDPA its math kernel, which it
    counts as bmm. The math kernel computes every (query, key) pair of the sink-widened q/k/v, so the
    counted attention is the full [T, T+1] rectangle at head_dim + 1; everything else must match
    6 x active matmul params exactly."""
    cfg = get_preset("debug", n_embd=66, intermediate_size=66)
    torch.manual_seed(0)
    model = GPTOSS(cfg)
    B, T = 2, 64
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss, aux = model(x, x)
        (loss + aux).backward()
    f = flops_per_token(cfg, T)
    rectangle = 12 * B * cfg.n_head * (cfg.head_size + 1) * T * (T + 1) * cfg.n_layer
    assert counter.get_total_flops() == pytest.approx(B * T * f["matmul"] + rectangle, rel=0.01)


def test_attention_flops_count_the_keys_the_mask_allows():
    cfg = get_preset("debug")  # window 32 on even blocks, full attention on odd ones
    for T in (16, 32, 100):
        visible = 0
        for i in range(cfg.n_layer):  # the model's own mask; column 0 is the sink
            visible += int(attention_mask(T, T, cfg.layer_window(i), True, torch.device("cpu"))[:, 1:].sum())
        expected = 12 * cfg.n_head * cfg.head_size * visible / T  # per token
        assert flops_per_token(cfg, T)["attention"] == pytest.approx(expected, rel=1e-12)
    assert mean_keys_per_query(4096, None) == pytest.approx(4097 / 2)
    assert mean_keys_per_query(4096, 128) == pytest.approx((128 * 129 / 2 + (4096 - 128) * 128) / 4096)


def test_model_flops_utilization():
    f = flops_per_token(get_preset("gpt-oss-20b"), 4096)
    assert model_flops_utilization(1000.0, f, 989.4e12) == pytest.approx(1000 * f["total"] / 989.4e12)
    assert model_flops_utilization(2.0, 3.0, 12.0) == 0.5
    assert seconds_at_mfu(2.0, 3.0, 12.0, 0.5) == 1.0
    assert seconds_at_mfu(1000.0, f, 989.4e12, 0.28) == pytest.approx(1000 * f["total"] / (989.4e12 * 0.28))


def test_planner_step_compute_is_the_trainers_mfu_inverted():
    """The trainer's MFU of a step that took the planner's compute time is the planner's --mfu."""
    run = load_run_config(REPO / "launch/configs/gpt-oss-20b-1node.yaml", [])
    plan = Planner(run, mfu=0.4).plan(2)
    peak = plan.world * plan.gpu.peak(run.precision)
    achieved = model_flops_utilization(plan.tokens_per_step / plan.compute_s, plan.flops_per_token, peak)
    assert achieved == pytest.approx(0.4, rel=1e-12)


# --- CLI ---------------------------------------------------------------------------------------------
def test_cli_preset_prints_model_card_counts(capsys):
    assert main(["--preset", "gpt-oss-120b", "--ep", "8", "--nodes", "8"]) == 0
    out = capsys.readouterr().out
    assert "total 116.83B  active 5.13B" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "debug", "--ep", "3"], "n_experts (4) must be divisible by parallel.expert_parallel_size (3)"),
        (["--preset", "gpt-oss-20b", "--ep", "16", "--nodes", "1"], "world size (8) must be divisible"),
        (["--preset", "debug", "--micro-batch", "0"], "train.micro_batch_size (0) must be >= 1"),
        (["--preset", "gpt-oss-20b", "--ep", "8", "--zero-stage", "2"], "needs ZeRO stage 3"),
    ],
)
def test_cli_refuses_configs_the_trainer_refuses(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_module_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: gpt-oss-20b}\ndata: {train: [x]}\nparallel: {expert_parallel_size: 5}\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.plan", "--config", str(bad)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "n_experts (32) must be divisible by parallel.expert_parallel_size (5)" in proc.stderr


@pytest.mark.parametrize("path, nodes", SHIPPED.items())
def test_shipped_configs_fit(capsys, path, nodes):
    assert main(["--config", str(REPO / path), "--nodes", str(nodes), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    plan = report["plan"]
    assert plan["fits"] and plan["world"] == 8 * nodes and plan["zero_stage"] == 3
    assert plan["gpu_bytes"] <= plan["usable_bytes"]


@pytest.mark.parametrize("path, nodes", SHIPPED.items())
def test_docs_hold_current_planner_output(capsys, monkeypatch, path, nodes):
    """docs/plan_output.md must be what the planner prints today (regenerate: see the file's top)."""
    monkeypatch.chdir(REPO)
    main(["--config", path, "--nodes", str(nodes)])
    assert capsys.readouterr().out.strip() in (REPO / "docs/plan_output.md").read_text()


def test_cli_offload_moves_optimizer_state_to_host(capsys):
    main(["--preset", "gpt-oss-20b", "--ep", "8", "--json"])
    on_gpu = json.loads(capsys.readouterr().out)["plan"]
    main(["--preset", "gpt-oss-20b", "--ep", "8", "--offload", "cpu", "--json"])
    offloaded = json.loads(capsys.readouterr().out)["plan"]
    adam = "optimizer: Adam exp_avg + exp_avg_sq (fp32)"
    assert offloaded["memory_bytes"][adam]["host"] == on_gpu["memory_bytes"][adam]["gpu"] > 0
    assert offloaded["gpu_bytes"] < on_gpu["gpu_bytes"]

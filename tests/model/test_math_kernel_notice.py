"""A CUDA training run on SDPA's math kernel is told so at start, with the cost the activation model
gives for the fp32 [B, H, T, T+1] scores; runs on FlexAttention or a fused SDPA kernel are not."""

from __future__ import annotations

from pipeline.model import get_preset
from pipeline.model.activation_memory import activation_memory, math_kernel_notice


def test_notice_names_the_cause_and_the_activation_cost():
    cfg = get_preset("gpt-oss-20b", n_layer=2, attention_backend="sdpa")
    line = math_kernel_notice(cfg, 1, 4096, 2)
    extra = (activation_memory(cfg, 1, 4096, 2, kernel="sdpa-math").per_block[1]
             - activation_memory(cfg, 1, 4096, 2, kernel="flex").per_block[1])
    assert extra > 4 * 2**30  # 64 x 4096 x 4097 fp32 scores alone are 4.3 GB
    assert "math kernel" in line and "attention_backend=sdpa" in line and f"{extra / 2**30:.2f} GiB" in line
    assert "[1, 64, 4096, 4097]" in line and "\n" not in line

    dropout = math_kernel_notice(cfg.replace(attention_backend="auto", dropout=0.1), 1, 4096, 2)
    assert "dropout=0.1" in dropout


def test_no_notice_for_flex_or_fused_sdpa():
    cfg = get_preset("gpt-oss-20b", n_layer=2)
    assert math_kernel_notice(cfg.replace(attention_backend="auto"), 1, 4096, 2) is None  # flex
    no_sinks = cfg.replace(attention_backend="sdpa", use_attention_sinks=False)  # head_dim 64: flash
    assert math_kernel_notice(no_sinks, 1, 4096, 2) is None

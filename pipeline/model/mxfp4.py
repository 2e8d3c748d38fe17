"""MXFP4 (OCP Microscaling FP4) expert weights as the released gpt-oss checkpoints store them.

A checkpoint tensor `W` [E, in, out] (our / transformers' input-major expert layout) is stored as
`W_blocks` uint8 [E, out, in / 32, 16] and `W_scales` uint8 [E, out, in / 32]: each row of `out`
is cut into blocks of 32 input values sharing one power-of-two scale (`2 ** (scale - 127)`); a byte
packs two FP4 (E2M1) codes, the low nibble first. Dequantising is a table lookup and an ldexp, so a
rank can dequantise just its experts' slice of a layer (`get_slice` on the stored tensors).
"""

from __future__ import annotations

import torch

# E2M1 code -> value: sign bit 3, two exponent bits, one mantissa bit.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [E, out, G, 16] uint8, scales [E, out, G] uint8 -> weights [E, G * 32, out] in `dtype`.

    Computed in fp32 (every FP4 value times a power of two is exact in fp32), then cast once.
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match "
                         f"([..., G, {BLOCK // 2}] and [..., G])")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = blocks.to(torch.uint8)
    values = torch.stack([lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]], dim=-1)  # [E, out, G, 16, 2]
    values = values.flatten(-2)  # [E, out, G, 32]: low nibble first, as packed
    exponent = scales.to(torch.int32) - 127
    w = torch.ldexp(values, exponent.unsqueeze(-1))  # [E, out, G, 32]
    return w.flatten(-2).transpose(-1, -2).contiguous().to(dtype)  # [E, in, out]


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weights [E, in, out] -> (blocks, scales), round-to-nearest per OCP MX: each block's scale is
    2 ** (floor(log2(amax)) - 2), the largest power of two that keeps amax within FP4's +-6 range."""
    E, n_in, n_out = w.shape
    if n_in % BLOCK:
        raise ValueError(f"input width {n_in} is not a multiple of the MXFP4 block size {BLOCK}")
    x = w.float().transpose(1, 2).reshape(E, n_out, n_in // BLOCK, BLOCK)  # [E, out, G, 32]
    amax = x.abs().amax(-1)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0 ** -126))) - 2, torch.zeros_like(amax))
    exponent = exponent.clamp(-127, 127)
    scaled = torch.ldexp(x, -exponent.to(torch.int32).unsqueeze(-1))
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (scaled.unsqueeze(-1) - lut).abs().argmin(-1).to(torch.uint8)  # [E, out, G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()

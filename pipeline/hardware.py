"""The one GPU table: memory and peak FLOP/s per part, for the planner (`--gpu`) and the trainer's
MFU (looked up from the device name unless train.peak_tflops is set)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError

MiB = 1024**2


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: int
    """Total device memory as nvidia-smi reports it."""
    peak_bf16: float
    """Dense (no sparsity) bf16 tensor-core peak, FLOP/s."""
    peak_fp32: float
    """Non-tensor-core fp32 peak, FLOP/s (PyTorch does not use TF32 for matmuls by default)."""
    device_name: str
    """What `torch.cuda.get_device_name()` contains for this part."""

    def peak(self, precision: str) -> float:
        return self.peak_bf16 if precision == "bf16" else self.peak_fp32


GPUS = {
    "h100-80gb": GPUSpec("h100-80gb", 81559 * MiB, 989.4e12, 66.9e12, "H100"),  # SXM5 datasheet
    "h200-141gb": GPUSpec("h200-141gb", 143771 * MiB, 989.4e12, 66.9e12, "H200"),
    "h800-80gb": GPUSpec("h800-80gb", 81559 * MiB, 989.4e12, 66.9e12, "H800"),
    "a100-80gb": GPUSpec("a100-80gb", 81920 * MiB, 312e12, 19.5e12, "A100"),
    "a100-40gb": GPUSpec("a100-40gb", 40960 * MiB, 312e12, 19.5e12, "A100"),
    "a800-80gb": GPUSpec("a800-80gb", 81920 * MiB, 312e12, 19.5e12, "A800"),
    "l40s-48gb": GPUSpec("l40s-48gb", 46068 * MiB, 362.05e12, 91.6e12, "L40S"),
}


def get_gpu(name: str) -> GPUSpec:
    if name not in GPUS:
        raise ConfigError(f"unknown --gpu {name!r}; choose one of {', '.join(sorted(GPUS))}")
    return GPUS[name]


def gpu_from_device(device_name: str, memory_bytes: int) -> GPUSpec | None:
    """The table's entry for a device (name as torch reports it; of several, the closest memory)."""
    matches = [g for g in GPUS.values() if g.device_name in device_name]
    return min(matches, key=lambda g: abs(g.memory_bytes - memory_bytes), default=None)


def detect_peak_tflops() -> float | None:
    """Dense bf16 peak of this process's GPU in TFLOP/s, or None (no GPU, or one not in the table)."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    gpu = gpu_from_device(props.name, props.total_memory)
    return None if gpu is None else gpu.peak_bf16 / 1e12

"""A training plan for a run config on N nodes: memory per GPU, tokens, FLOPs, step time, fit.

Everything is derived from what the trainer really runs: the model is built from the run config's
preset (on the meta device), the DeepSpeed JSON is the one `pipeline.train.ds_config.build_ds_config`
produces, and the expert-parallel checks are the trainer's own `check_expert_parallel_size`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.distributed.expert_parallel import check_expert_parallel_size
from pipeline.distributed.sequence_parallel import check_sequence_parallel_size
from pipeline.errors import ConfigError
from pipeline.hardware import GPUS, GPUSpec
from pipeline.model import GPTOSSConfig, count_parameters
from pipeline.model.activation_memory import ActivationMemory, activation_memory, attention_kernel
from pipeline.model.flops import flops_per_token, seconds_at_mfu
from pipeline.planning.comm import (
    Communication,
    Links,
    StartupMemory,
    checkpoint_snapshot_bytes,
    communication,
    startup_memory,
)
from pipeline.planning.zero import (
    ParamTensor,
    RankElements,
    StateMemory,
    ZeroSettings,
    model_param_tensors,
    rank_elements,
    state_memory,
)
from pipeline.train.config import RunConfig, resolve_model_config
from pipeline.train.ds_config import build_ds_config

GiB = 1024**3

DEFAULT_MFU = 0.28
"""NeMo AutoModel's published gpt-oss-20b pretraining throughput on 8 x H100 is ~28% MFU (and
Megatron-Bridge reports ~16% for gpt-oss-120b across nodes). Those end-to-end figures include their
own exposed communication, so as a compute-only efficiency 28% is on the safe side for one node."""


def model_config(run: RunConfig) -> GPTOSSConfig:
    """The model the trainer builds (vocab_size from the preset unless model.vocab_size is set)."""
    return resolve_model_config(run, from_data=False)


_TABLES: dict[str, tuple[list[ParamTensor], dict]] = {}


def _model_tables(config: GPTOSSConfig) -> tuple[list[ParamTensor], dict]:
    """Parameter list and counts of a model (built on meta), once per config: --search plans one
    model under dozens of layouts."""
    key = repr(config)
    if key not in _TABLES:
        _TABLES[key] = (model_param_tensors(config), count_parameters(config))
    return _TABLES[key]


@dataclass(frozen=True)
class Plan:
    nodes: int
    gpus_per_node: int
    world: int
    ep: int
    sp: int
    """Sequence-parallel ranks per sample (1 = off)."""
    zero: ZeroSettings
    elements: RankElements
    state: StateMemory
    activations: ActivationMemory
    activation_bytes: int
    """Peak activation bytes per GPU for one micro-batch under the run's checkpointing setting."""
    alternative: tuple[str, str, int] | None
    """(attention_backend, kernel, activation bytes) with the other backend (flex <-> sdpa), or None
    where it cannot run (flex has no dropout)."""
    tokens_per_step: int
    flops_per_token: dict
    step_time_s: float
    tokens_per_s: float
    gpu: GPUSpec
    mfu: float
    usable_bytes: int
    host_bytes_per_node: int
    snapshot_host_bytes: int
    """Host bytes per rank of the asynchronous checkpoint buffers (train.async_save)."""
    comm: Communication
    startup: StartupMemory
    compute_s: float
    """Compute time of one optimizer step at the stated MFU."""
    attention_backend: str
    """model.attention_backend as configured (auto / sdpa / flex); `activations.attention_kernel` is
    what it runs on CUDA."""

    @property
    def gpu_bytes(self) -> int:
        return self.state.gpu + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.gpu_bytes <= self.usable_bytes

    @property
    def edp(self) -> int:
        return self.world // self.ep

    @property
    def dp(self) -> int:
        """Data-parallel ranks: distinct samples per micro-batch step."""
        return self.world // self.sp

    @property
    def bound(self) -> str:
        """What sets the step time: compute, or the ZeRO traffic that prefetch cannot hide behind it."""
        return "compute" if self.compute_s >= self.comm.seconds(overlapped=True) else "communication"


@dataclass
class Planner:
    """Plans for one run config at any node count (the model and its parameter list are built once)."""

    run: RunConfig
    gpus_per_node: int = 8
    gpu: GPUSpec = GPUS["h100-80gb"]
    mfu: float = DEFAULT_MFU
    headroom: float = 0.10
    """Fraction of GPU memory kept free for the CUDA context, NCCL buffers and fragmentation."""
    links: Links = Links()

    def __post_init__(self):
        if self.gpus_per_node < 1:
            raise ConfigError(f"--gpus-per-node ({self.gpus_per_node}) must be >= 1")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"--mfu ({self.mfu}) must be in (0, 1]")
        if not 0 <= self.headroom < 1:
            raise ConfigError(f"--headroom ({self.headroom}) must be in [0, 1)")
        self.config = model_config(self.run)
        self.ep = self.run.parallel.expert_parallel_size
        if self.config.num_moe_layers:
            # The trainer's check; world size is checked per node count in `plan`.
            check_expert_parallel_size(self.ep, self.ep, self.config.n_experts)
        elif self.ep != 1:
            raise ConfigError(f"parallel.expert_parallel_size ({self.ep}) must be 1 for a model without MoE layers")
        self.sp = self.run.parallel.sequence_parallel_size
        check_sequence_parallel_size(self.sp, self.sp, self.config, self.run.data.seq_len)
        self.params, self.counts = _model_tables(self.config)
        t = self.run.train
        act_bytes = 2 if self.run.precision == "bf16" else 4
        self.activations = activation_memory(self.config, t.micro_batch_size, self.run.data.seq_len, act_bytes,
                                             sp=self.sp)
        # The same micro-batch under the other backend, for the report's comparison line.
        other = "sdpa" if self.activations.attention_kernel == "flex" else "flex"
        self.alternative = None
        if other == "sdpa" or self.config.dropout == 0:
            alt_config = dataclasses.replace(self.config, attention_backend=other)
            self.alternative = (other, attention_kernel(alt_config), activation_memory(
                alt_config, t.micro_batch_size, self.run.data.seq_len, act_bytes, sp=self.sp))
        self.flops = flops_per_token(self.config, self.run.data.seq_len)
        build_ds_config(self.run, world_size=self.ep, use_cuda=True)  # refuse bad DeepSpeed JSON up front

    def plan(self, nodes: int) -> Plan:
        if nodes < 1:
            raise ConfigError(f"node count ({nodes}) must be >= 1")
        world = nodes * self.gpus_per_node
        if self.config.num_moe_layers:
            check_expert_parallel_size(self.ep, world, self.config.n_experts)
        check_sequence_parallel_size(self.sp, world, self.config, self.run.data.seq_len)
        ds = build_ds_config(self.run, world_size=world, use_cuda=True)
        zero = ZeroSettings.from_ds_config(ds)
        elements = rank_elements(self.params, zero, world, self.ep)
        state = state_memory(elements, zero)
        ckpt = self.run.parallel.activation_checkpointing
        activation_bytes = self.activations.total(ckpt)
        alternative = None
        if self.alternative:
            backend, kernel, memory = self.alternative
            alternative = (backend, kernel, memory.total(ckpt))
        t = self.run.train
        tokens = t.micro_batch_size * t.grad_accum_steps * (world // self.sp) * self.run.data.seq_len
        peak = self.gpu.peak(self.run.precision)
        compute = seconds_at_mfu(tokens, self.flops, world * peak, self.mfu)
        comm = communication(
            self.config, self.params, zero, world=world, ep=self.ep, gpus_per_node=self.gpus_per_node,
            micro_batch=t.micro_batch_size, seq_len=self.run.data.seq_len, grad_accum=t.grad_accum_steps,
            checkpointing=ckpt, links=self.links, sp=self.sp,
        )
        # ZeRO gathers / reduce-scatters overlap compute (prefetch, overlap_comm); the expert and
        # sequence-parallel all-to-alls are synchronous inside their layers, so they add.
        step_time = max(compute, comm.seconds(overlapped=True)) + comm.seconds(overlapped=False)
        return Plan(
            nodes=nodes,
            gpus_per_node=self.gpus_per_node,
            world=world,
            ep=self.ep,
            sp=self.sp,
            zero=zero,
            elements=elements,
            state=state,
            activations=self.activations,
            activation_bytes=activation_bytes,
            alternative=alternative,
            tokens_per_step=tokens,
            flops_per_token=self.flops,
            step_time_s=step_time,
            tokens_per_s=tokens / step_time,
            gpu=self.gpu,
            mfu=self.mfu,
            usable_bytes=int(self.gpu.memory_bytes * (1 - self.headroom)),
            host_bytes_per_node=state.host * self.gpus_per_node,
            snapshot_host_bytes=checkpoint_snapshot_bytes(self.params, world),
            comm=comm,
            startup=startup_memory(self.params, zero, elements.partition, self.ep, self.config.n_experts),
            compute_s=compute,
            attention_backend=self.config.attention_backend,
        )

    def try_plan(self, nodes: int) -> Plan | str:
        """A plan, or why this node count cannot run (e.g. EP does not divide the world size)."""
        try:
            return self.plan(nodes)
        except ConfigError as e:
            return str(e)

    def smallest_fitting(self, max_nodes: int = 1024) -> Plan | None:
        """The fewest nodes whose plan fits in GPU memory (memory per GPU only falls with more nodes)."""
        for nodes in range(1, max_nodes + 1):
            result = self.try_plan(nodes)
            if isinstance(result, Plan) and result.fits:
                return result
        return None

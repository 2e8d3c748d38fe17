"""Per-parameter access to a DeepSpeed engine's training state: fp32 master weight, Adam moments,
working (bf16/fp32) copy and the optimizer step count, whatever the ZeRO stage and expert layout.

This is the one module that reaches into DeepSpeed's optimizer internals for checkpoint state
(as `expert_parallel.py` is for the expert-placement tags). Reading uses DeepSpeed's public
`safe_get_full_fp32_param` / `safe_get_full_optimizer_state`, which under ZeRO-3 all-gather over
each parameter's own partition group, so expert slices are assembled over the expert-data-parallel
group and non-expert tensors over all ranks. Writing does not use `safe_set_full_*`: in 0.19.8
their ZeRO-3 path (a) narrows the unpadded value at `partition_numel * rank`, which runs past
the end on the last rank whenever the tensor does not split evenly, and (b) updates only the
fp32 master, leaving the working copy the forward pass reads at its old value. `set_full_state`
writes this rank's partition of both, zero-padded like DeepSpeed's own partitions.

Only one tensor is ever gathered at a time: no rank holds the full model or optimizer state.
"""

from __future__ import annotations

import torch

from pipeline.distributed.collectives import all_gather_into
from pipeline.distributed.ranks import current, group_rank, group_size, initialized

OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer over DeepSpeed's flat fp32 partitions."""
    return engine.optimizer.optimizer


def get_full_state(param: torch.nn.Parameter, key: str | None, on_host: bool = True) -> torch.Tensor:
    """The full fp32 master weight (key None) or optimizer state of one parameter, on the CPU
    (`on_host` False: where DeepSpeed gathered it, for a caller that copies it into pinned memory).

    Collective: every rank of the parameter's partition group must call it, in the same order.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    full = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if full is None:
        raise RuntimeError(f"DeepSpeed holds no fp32 state {key or 'weight'} for a parameter of shape "
                           f"{tuple(param.shape)}; only ZeRO stages 1-3 are supported")
    full = full.detach().float()
    return full.cpu() if on_host else full


class GatherBuffer:
    """Gathers a parameter's full fp32 state into one flat buffer reused for every parameter and
    every save (grown to the largest parameter once). DeepSpeed's ZeRO-3 gather (`_fp32_state_allgather`)
    allocates a new full-size tensor per call: at every save the whole state passes through fresh
    pages (measured: allocation + copies 6-10x one copy into memory already mapped). The tensor
    returned is a view of the buffer (or, for a partition group of one rank, of the live partition),
    valid until the next `gather` or optimizer step: copy what you keep. Same values
    as `get_full_state` (an all-gather of the same partitions); other ZeRO stages and NVMe-swapped
    sub-groups go through it."""

    def __init__(self):
        self.flat: torch.Tensor | None = None

    def gather(self, param: torch.nn.Parameter, key: str | None) -> torch.Tensor:
        """Collective over the parameter's partition group, like get_full_state."""
        opt = getattr(param, "_z3_optimizer", None)
        if opt is None or opt._swappable_optimizer_subgroup(opt.grad_position[opt.get_param_id(param)][0]):
            return get_full_state(param, key, on_host=False)
        part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
        group = opt._get_param_partition_group(param)
        ranks = group_size(group, current().world) if initialized() else 1
        if ranks == 1:  # one rank holds it all (one rank, or experts with ep = world)
            return part[: param.ds_numel].view(param.ds_shape)
        numel = part.numel() * ranks
        if self.flat is None or self.flat.numel() < numel or self.flat.device != part.device:
            self.flat = torch.empty(numel, dtype=torch.float32, device=part.device)
        out = self.flat[:numel]
        all_gather_into(out, part.float().contiguous(), group)
        return out[: param.ds_numel].view(param.ds_shape)


def set_full_state(param: torch.nn.Parameter, full: torch.Tensor, key: str | None) -> None:
    """Write this rank's share of `full` (the whole tensor) into the fp32 master (key None, which
    also refreshes the working copy) or into optimizer state `key`. Local: no communication."""
    if hasattr(param, "ds_id"):  # ZeRO-3: param.ds_tensor is this rank's padded 1/N of the flat tensor
        opt = param._z3_optimizer
        group, offset, numel = opt.grad_position[opt.get_param_id(param)]
        if opt._swappable_optimizer_subgroup(group):
            raise NotImplementedError("loading reshardable checkpoints with NVMe optimizer offload is not supported")
        flat = opt.fp32_partitioned_groups_flat[group]
        target = (flat if key is None else opt.optimizer.state[flat][key]).narrow(0, offset, numel)
        rank = group_rank(opt._get_param_partition_group(param), 0)
        chunk = full.reshape(-1)[rank * numel:(rank + 1) * numel]  # shorter (or empty) on the last ranks
        padded = torch.zeros(numel, dtype=torch.float32)
        padded[: chunk.numel()] = chunk
        target.data.copy_(padded)
        if key is None:
            param.ds_tensor.data.copy_(padded.view(param.ds_tensor.shape).to(param.ds_tensor.dtype))
            if param.data.numel() == param.ds_numel:  # persistent (small) params also keep a full copy
                param.data.copy_(full.view(param.ds_shape).to(param.dtype))
    elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2: full working copy, fp32 fragment per rank
        param.set_full_hp_param(full.to(param.device), key)
        if key is None:
            param.data.copy_(full.view(param.shape).to(param.dtype))
    else:
        raise RuntimeError(f"parameter of shape {tuple(param.shape)} is not managed by a ZeRO optimizer")


def _flat_params(engine) -> list[tuple[dict, torch.Tensor]]:
    """(param group, flat fp32 tensor) pairs the inner optimizer steps. ZeRO-3 keeps its param
    groups empty and puts one sub-group's flat tensor in for the duration of each step."""
    ds_opt, opt = engine.optimizer, inner_optimizer(engine)
    if hasattr(ds_opt, "fp32_partitioned_groups_flat"):
        return [(opt.param_groups[ds_opt.sub_group_to_group_id[i]], flat)
                for i, flat in enumerate(ds_opt.fp32_partitioned_groups_flat)]
    return [(g, p) for g in opt.param_groups for p in g["params"]]


def ensure_optimizer_state(engine) -> None:
    """Create Adam's moment buffers if no step has run yet (torch's AdamW creates them lazily; ZeRO-3
    does not pre-create them), so loaded moments have somewhere to go. One optimizer step with zero
    gradients at lr 0 and weight decay 0 leaves the weights unchanged."""
    opt = inner_optimizer(engine)
    for group, flat in _flat_params(engine):
        if opt.state.get(flat):
            continue
        saved = {k: group[k] for k in ("params", "lr", "weight_decay") if k in group}
        group.update(params=[flat], lr=0.0, **({"weight_decay": 0.0} if "weight_decay" in group else {}))
        flat.grad = torch.zeros_like(flat)
        try:
            opt.step()
        finally:
            flat.grad = None
            group.update(saved)
    link_optimizer_state(engine)


def link_optimizer_state(engine) -> None:
    """ZeRO-1/2 map each parameter onto its slice of Adam's moments once, right after the first
    optimizer.step() of param group 0, before the other groups' moments exist; so the params of
    later groups (our no-decay group) would have none to read or write. Re-link now that all exist."""
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def optimizer_step_count(engine) -> int:
    """Adam's bias-correction step (0 before the first step); equal on every rank."""
    opt = inner_optimizer(engine)
    for group, flat in _flat_params(engine):
        if "step" in group:  # DeepSpeed FusedAdam keeps it per group
            return int(group["step"])
        step = opt.state.get(flat, {}).get("step")
        if step is not None:
            return int(step)
    return 0


def set_optimizer_step_count(engine, step: int) -> None:
    opt = inner_optimizer(engine)
    for group, flat in _flat_params(engine):
        if "step" in group:
            group["step"] = step
        state = opt.state.get(flat)
        if state and "step" in state:
            old = state["step"]
            state["step"] = torch.full_like(old, step) if torch.is_tensor(old) else step


def set_engine_counters(engine, step: int, samples: int, grad_accum_steps: int) -> None:
    """DeepSpeed's own step/sample counters, so its logs and boundaries continue where the run was."""
    engine.global_steps = step
    engine.global_samples = samples
    engine.micro_steps = step * grad_accum_steps

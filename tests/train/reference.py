"""Single-process, plain-PyTorch reference for a run config: same model init, same samples per
step (every rank's micro-batches, in one process), same optimizer and schedule, no DeepSpeed."""

from __future__ import annotations

import torch

from pipeline.data import MicroBatchIterator, build_dataset
from pipeline.model import GPTOSS, MoE
from pipeline.train.config import load_run_config, resolve_model_config
from pipeline.train.optim import lr_at, make_torch_adamw
from pipeline.train.single_process import plain_train_step


def reference_run(config_path, world: int, overrides: list[str] = ()) -> tuple[dict[int, dict], GPTOSS]:
    """Returns ({step: {"total", "lm", "grad_norm"[, "expert_bias"]}}, trained model) for `world`
    simulated ranks."""
    cfg = load_run_config(config_path, list(overrides))
    torch.manual_seed(cfg.train.seed)
    model = GPTOSS(resolve_model_config(cfg))
    optimizer = make_torch_adamw(model, cfg.optim)
    data = build_dataset(cfg.data.train, "train", cfg.data.seq_len, cfg.data.seed)
    iters = [MicroBatchIterator(data, cfg.train.micro_batch_size, r, world, 0) for r in range(world)]
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    rate = model.config.load_balance_bias_rate
    tokens_LE = torch.zeros(len(moes), model.config.n_experts)

    def count(module, _inputs, _output):  # every micro-batch's expert load, as the trainer sums it
        tokens_LE[moes.index(module)] += module.last_stats.tokens_per_expert

    for m in moes:
        m.register_forward_hook(count)
    results = {}
    for step in range(cfg.train.steps):
        micro = [it.next() for _ in range(cfg.train.grad_accum_steps) for it in iters]
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        tokens_LE.zero_()
        results[step + 1] = plain_train_step(model, optimizer, micro, lr, cfg.optim.grad_clip)
        if rate > 0:  # aux-loss-free balancing after every optimizer step
            for m, tokens_E in zip(moes, tokens_LE, strict=True):
                m.router.update_expert_bias(tokens_E, rate)
            results[step + 1]["expert_bias"] = [m.router.expert_bias.tolist() for m in moes]
    return results, model

"""Plain-PyTorch training on one process: the design documents' `train_model` API.

It is built from the same parts as the DeepSpeed trainer (param groups, LR schedule, loss), and
`plain_train_step` is also the single-process reference the expert-parallel equivalence tests and
the trainer benchmark compare against: one optimizer step over a list of micro-batches, each
weighted 1 / len(micro_batches), exactly as data-parallel ranks x gradient accumulation average.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.train.config import OptimConfig
from pipeline.train.optim import compute_loss, lr_at, make_torch_adamw


def plain_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[torch.Tensor],
    lr: float,
    grad_clip: float,
) -> dict[str, float]:
    """micro_batches: list of [mbs, T + 1]; returns mean total / lm losses and the grad norm."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    total = lm = 0.0
    for batch in micro_batches:
        parts = compute_loss(model, batch)
        (parts.total / len(micro_batches)).backward()
        total += parts.total.item() / len(micro_batches)
        lm += parts.lm.item() / len(micro_batches)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    return {"total": total, "lm": lm, "grad_norm": float(norm)}


def _windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """1-D token ids -> non-overlapping [N, seq_len + 1] samples (targets overlap by one token)."""
    n = (tokens.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"need more than seq_len + 1 = {seq_len + 1} tokens, got {tokens.numel()}")
    return torch.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


@torch.no_grad()
def evaluate_loss(model: nn.Module, samples: torch.Tensor, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    losses = [
        compute_loss(model, samples[i : i + batch_size]).lm.item() for i in range(0, len(samples), batch_size)
    ]
    model.train(was_training)
    return sum(losses) / len(losses)


def train_model(
    model: nn.Module,
    train_data,
    val_data=None,
    seq_len: int = 128,
    batch_size: int = 32,
    num_epochs: int = 1,
    learning_rate: float = 3e-4,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    warmup_steps: int = 0,
    seed: int = 0,
    verbose: bool = True,
) -> nn.Module:
    """Train `model` on token-id lists (or 1-D tensors); prints train loss and validation perplexity.

    Returns the trained model (the same object). Samples are shuffled each epoch from `seed`.
    """
    device = next(model.parameters()).device
    train = _windows(torch.as_tensor(train_data, dtype=torch.long), seq_len)
    val = _windows(torch.as_tensor(val_data, dtype=torch.long), seq_len) if val_data is not None else None
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = steps_per_epoch * num_epochs
    optim = OptimConfig(
        lr=learning_rate,
        min_lr=learning_rate * 0.1,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
    )
    optimizer = make_torch_adamw(model, optim)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    for epoch in range(num_epochs):
        order = torch.randperm(len(train), generator=generator)
        epoch_loss = 0.0
        for i in range(0, len(train), batch_size):
            batch = train[order[i : i + batch_size]].to(device)
            out = plain_train_step(model, optimizer, [batch], lr_at(step, optim, total_steps), grad_clip)
            epoch_loss += out["lm"]
            step += 1
        line = f"epoch {epoch + 1}/{num_epochs} | train loss {epoch_loss / steps_per_epoch:.4f}"
        if val is not None:
            val_loss = evaluate_loss(model, val.to(device), batch_size)
            line += f" | val loss {val_loss:.4f} | val ppl {math.exp(val_loss):.2f}"
        if verbose:
            print(line, flush=True)
    return model

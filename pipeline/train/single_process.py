"""Plain-PyTorch training on one process: the design documents' `train_model` API.

`python -m pipeline.train.single_process` is the second document's `python train.py`: a byte-level GPT
(`create_gpt_oss_20b`, scaled to CPU size) trained on a train/validation split of a built-in text
(the interpreter's standard-library sources), perplexity printed per epoch, then a sample.

It is built from the same parts as the DeepSpeed trainer (param groups, LR schedule, loss), and
`plain_train_step` is also the single-process reference the expert-parallel equivalence tests and
the trainer benchmark compare against: one optimizer step over a list of micro-batches, each
weighted 1 / len(micro_batches), exactly as data-parallel ranks x gradient accumulation average.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from pipeline.cli import user_errors_exit_2
from pipeline.errors import ConfigError
from pipeline.model import create_gpt_oss_20b
from pipeline.train.config import OptimConfig
from pipeline.train.objective import compute_loss
from pipeline.train.optim import lr_at, make_torch_adamw


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


# --- `python -m pipeline.train.single_process` ----------------------------------------------------------


def builtin_text(max_bytes: int) -> bytes:
    """The first max_bytes of the standard-library sources (sorted files): real text on every machine."""
    from pipeline.data.readers import stdlib_sources

    chunks, size = [], 0
    for path in stdlib_sources():
        data = Path(path).read_bytes()
        chunks.append(data[: max_bytes - size])
        size += len(chunks[-1])
        if size >= max_bytes:
            break
    return b"".join(chunks)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train.single_process",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("--max-bytes", type=int, default=200_000, help="size of the built-in text (bytes = tokens)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="tail of the text held out for validation")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128, help="context of the model, trained at every position")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.0, help="0: a few epochs of a tiny model do not overfit")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--max-new-tokens", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.val_fraction < 1:
        raise ConfigError(f"--val-fraction ({args.val_fraction}) must be in (0, 1)")
    torch.manual_seed(args.seed)
    # Bytes are the tokens (vocabulary 256): no tokenizer to train or download.
    tokens = list(builtin_text(args.max_bytes))
    split = int(len(tokens) * (1 - args.val_fraction))
    train_tokens, val_tokens = tokens[:split], tokens[split:]
    if min(len(train_tokens), len(val_tokens)) <= args.seq_len + 1:
        raise ConfigError(f"--max-bytes ({args.max_bytes}) leaves fewer than --seq-len + 2 ({args.seq_len + 2}) "
                          "tokens for training or validation; raise --max-bytes or lower --seq-len")
    prompt = list(args.prompt.encode())
    if not prompt or len(prompt) + args.max_new_tokens > args.seq_len:
        raise ConfigError(f"the prompt ({len(prompt)} bytes) + --max-new-tokens ({args.max_new_tokens}) must fit "
                          f"--seq-len ({args.seq_len}), the positions the model is trained on; give a non-empty "
                          "--prompt")
    model = create_gpt_oss_20b(vocab_size=256, max_seq_len=args.seq_len, d_model=args.d_model,
                               num_layers=args.num_layers, num_heads=args.num_heads, dropout=args.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"text: {len(tokens):,} bytes of standard-library source -> {len(train_tokens):,} train / "
          f"{len(val_tokens):,} validation tokens; model: {n_params:,} parameters", flush=True)
    t0 = time.perf_counter()
    train_model(model, train_tokens, val_tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                num_epochs=args.epochs, learning_rate=args.learning_rate, warmup_steps=10, seed=args.seed)
    print(f"trained in {time.perf_counter() - t0:.0f}s", flush=True)
    model.eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, temperature=0.8, top_k=40)
    print("sample:\n" + bytes(out[0].tolist()).decode("utf-8", errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

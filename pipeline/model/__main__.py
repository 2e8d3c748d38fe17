"""`python -m pipeline.model`: the first design document's `python MoE.py` example.

Prints the parameter counts of the released architectures (built on the meta device, so nothing is
allocated), then builds the example MoE GPT (preset `moe-124m`: the document's 12 x 768 config with 8
experts, top-2), runs a forward pass with LM loss and load-balancing aux loss, a backward pass, and a
KV-cached generation. About a minute on 2 CPU cores; `--preset debug` takes seconds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from pipeline.cli import user_errors_exit_2
from pipeline.errors import ConfigError
from pipeline.model.gpt_oss import GPTOSS
from pipeline.model.params import count_module_parameters, count_parameters
from pipeline.model.presets import get_preset, list_presets

RELEASED = ("gpt-oss-20b", "gpt-oss-120b")
PROMPT_LEN = 10


def fmt_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="moe-124m", help=f"example model ({', '.join(list_presets())})")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = get_preset(args.preset)
    if not (1 <= args.seq_len <= config.block_size and PROMPT_LEN + args.max_new_tokens <= config.block_size
            and args.batch_size >= 1):
        raise ConfigError(f"--seq-len ({args.seq_len}) and {PROMPT_LEN} prompt tokens + --max-new-tokens "
                          f"({args.max_new_tokens}) must fit the preset's block_size ({config.block_size}); "
                          "--batch-size >= 1")
    torch.manual_seed(args.seed)

    for name in RELEASED:
        counts = count_parameters(get_preset(name))
        print(f"{name:>13}: {fmt_count(counts['total'])} parameters, {fmt_count(counts['active'])} active per token")

    t0 = time.perf_counter()
    model = GPTOSS(config)
    counts = count_module_parameters(model)
    print(
        f"{args.preset:>13}: {counts['total']:,} parameters ({counts['active']:,} active per token, "
        f"{counts['expert']:,} in experts); {config.n_layer} layers, {config.n_experts} experts top-{config.top_k} "
        f"in {config.num_moe_layers} MoE layers; built in {time.perf_counter() - t0:.1f}s"
    )

    # Random tokens: the example shows the mechanics; the loss starts near ln(vocab_size).
    tokens_BT1 = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1))
    input_ids, targets = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
    t0 = time.perf_counter()
    logits, loss, aux_loss = model(input_ids, targets)  # [B, T, V], LM loss, weighted router loss
    total = loss + aux_loss
    print(f"forward: logits {list(logits.shape)}, loss {loss.item():.4f} (ln(vocab) = "
          f"{math.log(config.vocab_size):.4f}), aux loss {aux_loss.item():.6f} in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    print(f"backward: gradient norm {grad_norm.item():.4f} in {time.perf_counter() - t0:.1f}s")

    model.eval()
    t0 = time.perf_counter()
    prompt = input_ids[:1, :PROMPT_LEN]
    generated = model.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=0.8, top_k=50)
    print(f"generate: {generated.shape[1]} tokens ({prompt.shape[1]} prompt + {generated.shape[1] - prompt.shape[1]} "
          f"new) in {time.perf_counter() - t0:.1f}s: {generated[0, prompt.shape[1]:].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

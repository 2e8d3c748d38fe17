"""Sample text from an exported model: `python -m pipeline.generate --model DIR --prompt TEXT`.

DIR is what `python -m pipeline.export` wrote (a transformers GptOss folder or our native
format); its `tokenizer/` copy encodes the prompt and decodes the sample unless --tokenizer is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipeline.cli import user_errors_exit_2
from pipeline.errors import ConfigError


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                  top_k: int | None = 50, top_p: float | None = None, seed: int = 0) -> str:
    """prompt -> prompt + continuation (decoded), stopping at the tokenizer's EOS."""
    ids = tokenizer.encode(prompt)
    if tokenizer.bos_id is not None and not ids:
        ids = [tokenizer.bos_id]
    if not ids:
        raise ConfigError("the prompt encodes to no tokens; give a non-empty --prompt")
    budget = model.config.block_size - len(ids)
    if budget < 1:
        raise ConfigError(f"the prompt is {len(ids)} tokens, at least the model's context ({model.config.block_size})")
    torch.manual_seed(seed)
    out = model.generate(torch.tensor([ids]), min(max_new_tokens, budget), temperature=temperature,
                         top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id)
    new = [t for t in out[0, len(ids):].tolist() if t != tokenizer.eos_id]
    return prompt + tokenizer.decode(new)


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported model dir (python -m pipeline.export)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: MODEL/tokenizer)")
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from pipeline.data import load_tokenizer
    from pipeline.model import GPTOSS

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} holds no exported model (config.json); run python -m pipeline.export")
    tokenizer = load_tokenizer(args.tokenizer or model_dir / "tokenizer")
    model = GPTOSS.from_hf(model_dir).eval()  # either export format
    text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                         args.top_k or None, args.top_p, args.seed)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

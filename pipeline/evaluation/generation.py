"""Generation for lm-eval's `generate_until` requests: batched KV-cached decoding dealt over the ranks.

    settings = GenerationSettings.from_gen_kwargs(request.args[1], eos_text)
    texts = generate_dealt(contexts, settings, decoder, tokenizer, ...)   # every rank; texts on rank 0

The result of each request is what lm-eval's Hugging Face backend (`HFLM.generate_until`) returns:
the context left-truncated to `max_length - max_gen_toks` tokens, at most `max_gen_toks` new tokens,
generation of a row ends at EOS or once its decoded text holds a stop string (`until`, plus the EOS
text as the harness adds it), the text is decoded without special tokens and cut before the first
stop string. Greedy unless the task samples (`do_sample`, `temperature`, `top_p`, `top_k`); a
sampled request draws from its own generator seeded by `seed` and its place in the length-sorted
request list, so samples do not depend on the number of ranks or the batch size.

Batching: requests sorted longest first (as HFLM) and dealt round-robin over the ranks; a batch's
prompts are left-padded to one length (`DecodeCache.pad_B` masks the padding and shifts positions),
one prefill forward, then one forward per new token with the KV cache. Under ZeRO-3 every forward
gathers parameters collectively and expert parallelism exchanges tokens over all ranks, so every
rank runs the same number of forwards: after each token the ranks agree (one all-reduce of a flag)
whether any row anywhere still generates, and a rank without rows left runs a one-token dummy forward.
With sequence parallelism the model is put back to whole sequences while it decodes
(`sequence_parallel.whole_sequences`): every rank decodes its own requests, as without SP.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.data.tokenizer import Tokenizer
from pipeline.distributed.collectives import any_rank, gather_objects
from pipeline.distributed.sequence_parallel import whole_sequences
from pipeline.model.gpt_oss import sample_next_token

SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k")
SUPPORTED_GEN_KWARGS = ("until", "max_gen_toks", "max_new_tokens", *SAMPLING_KEYS)
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval HFLM's default
DEFAULT_SEED = 1234  # lm-eval's default torch seed


@dataclass(frozen=True)
class GenerationSettings:
    """One task's generation kwargs, normalised as the harness does (`normalize_gen_kwargs`)."""

    until: tuple[str, ...]
    max_gen_toks: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int = DEFAULT_SEED

    @classmethod
    def from_gen_kwargs(cls, gen_kwargs: dict, eos_text: str | None,
                        default_max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> GenerationSettings:
        unknown = sorted(set(gen_kwargs) - set(SUPPORTED_GEN_KWARGS))
        if unknown:
            raise ValueError(f"generation_kwargs {', '.join(unknown)} are not supported (only "
                             f"{', '.join(SUPPORTED_GEN_KWARGS)})")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if eos_text and eos_text not in until:
            until.append(eos_text)  # as lm-eval's handle_stop_sequences
        max_gen_toks = int(gen_kwargs.get("max_gen_toks") or gen_kwargs.get("max_new_tokens") or default_max_gen_toks)
        temperature = float(gen_kwargs.get("temperature", 0.0))
        do_sample = gen_kwargs.get("do_sample")
        if do_sample is False or (do_sample is None and temperature == 0.0):
            temperature = 0.0
        elif temperature == 0.0:  # do_sample with no temperature: transformers samples at 1.0
            temperature = 1.0
        top_p, top_k = gen_kwargs.get("top_p"), gen_kwargs.get("top_k")
        return cls(tuple(until), max_gen_toks, temperature, None if top_p is None else float(top_p),
                   None if top_k is None else int(top_k))


class Decoder:
    """How generation runs a model: `step(ids [B, T], cache) -> logits [B, 1, V]` through the module's
    forward (`call`: the module, or the DeepSpeed engine wrapping it, so ZeRO-3 gathers parameters)
    and `new_cache` from the module (GPTOSS.new_cache)."""

    def __init__(self, module, call: Callable | None = None):
        self.module = module
        self.call = call if call is not None else module

    def new_cache(self, batch: int, max_len: int, device: torch.device, pad_B: torch.Tensor):
        return self.module.new_cache(batch, max_len, device, pad_B)

    def step(self, ids_BT: torch.Tensor, cache) -> torch.Tensor:
        return self.call(ids_BT, cache=cache)[0]


def stop_text(text: str, until: tuple[str, ...]) -> str:
    """The text before the first occurrence of any stop string (lm-eval's postprocess_generated_text)."""
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


class _Rows:
    """The rows of one batch on one rank: their new tokens and whether each has finished."""

    def __init__(self, tokenizer: Tokenizer, settings: GenerationSettings, seeds: list[int], device):
        self.tok, self.settings = tokenizer, settings
        self.skip = {t for t in (tokenizer.eos_id, tokenizer.bos_id) if t is not None}
        self.tokens: list[list[int]] = [[] for _ in seeds]
        self.done = [False] * len(seeds)
        self.generators = None
        if settings.temperature > 0:
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def text(self, b: int) -> str:
        return self.tok.decode([t for t in self.tokens[b] if t not in self.skip])  # special tokens skipped, as HFLM

    def next_tokens(self, logits_BV: torch.Tensor) -> torch.Tensor:
        """[B, 1] next tokens, recorded for the rows still generating."""
        s = self.settings
        if self.generators is None:
            next_B1 = sample_next_token(logits_BV, 0.0, None, None)
        else:
            next_B1 = torch.cat([sample_next_token(logits_BV[b:b + 1], s.temperature, s.top_k, s.top_p, generator=g)
                                 for b, g in enumerate(self.generators)])
        for b, token in enumerate(next_B1[:, 0].tolist()):  # one host read per step
            if self.done[b]:
                continue
            self.tokens[b].append(token)
            text = self.text(b)
            self.done[b] = (token == self.tok.eos_id or len(self.tokens[b]) >= s.max_gen_toks
                            or any(term and term in text for term in s.until))
        return next_B1


def generate_dealt(contexts: list[list[int]], settings: GenerationSettings, decoder: Decoder,
                   tokenizer: Tokenizer, dummy_forward: Callable[[], None], device: torch.device,
                   batch_size: int, pad_id: int, rank: int, world: int) -> tuple[list[str] | None, int]:
    """Every rank: generate for `contexts` (token lists, already truncated), this rank's share.
    `dummy_forward` runs the model on one token without a cache (and, under sequence parallelism,
    without the SP group: it runs inside `whole_sequences` too). Returns (the texts in request order
    on rank 0, None elsewhere; the forwards this rank ran)."""
    order = sorted(range(len(contexts)), key=lambda i: (-len(contexts[i]), contexts[i]))
    mine = order[rank::world]
    n_batches = math.ceil(math.ceil(len(contexts) / world) / batch_size)  # rank 0's count: the most
    texts, forwards = [], 0
    with whole_sequences(decoder.module):  # a KV cache holds whole sequences: no sequence shards meanwhile
        for b in range(n_batches):
            ks = range(b * batch_size, min((b + 1) * batch_size, len(mine)))  # mine[k] is order[rank + k * world]
            batch = [contexts[mine[k]] for k in ks]
            rows = _Rows(tokenizer, settings, [settings.seed + rank + k * world for k in ks], device)
            forwards += _generate_batch(batch, rows, decoder, dummy_forward, device, pad_id)
            texts += [stop_text(rows.text(i), settings.until) for i in range(len(batch))]
    gathered = gather_objects(texts, dst=0)
    if gathered is None:
        return None, forwards
    out: list = [None] * len(contexts)
    for r, part in enumerate(gathered):
        for k, text in enumerate(part):
            out[order[r + k * world]] = text
    return out, forwards


@torch.no_grad()
def _generate_batch(batch: list[list[int]], rows: _Rows, decoder: Decoder, dummy_forward: Callable[[], None],
                    device: torch.device, pad_id: int) -> int:
    """Decode one batch (possibly empty on this rank) in step with the other ranks; returns forwards run."""
    max_gen = rows.settings.max_gen_toks
    cache = None
    if batch:
        L = max(len(c) for c in batch)
        pad_B = torch.tensor([L - len(c) for c in batch])
        prompt_BL = torch.full((len(batch), L), pad_id, dtype=torch.long)
        for b, context in enumerate(batch):
            prompt_BL[b, L - len(context):] = torch.tensor(context)
        cache = decoder.new_cache(len(batch), L + max_gen, device, pad_B)
        logits_B1V = decoder.step(prompt_BL.to(device), cache)
    else:
        dummy_forward()
    forwards = 1
    for _ in range(max_gen):
        next_B1 = rows.next_tokens(logits_B1V[:, 0].float()) if batch else None
        if not any_rank(batch and not all(rows.done), device):
            break
        if batch and not all(rows.done):  # finished rows keep feeding their token; their output is ignored
            logits_B1V = decoder.step(next_B1, cache)
        else:
            dummy_forward()
        forwards += 1
    return forwards

"""The GPT-OSS model: embeddings, a stack of `Block`s (attention + MoE or dense FFN), LM head.

`GPTOSS.forward(input_ids, targets)` returns `(logits, loss, aux_loss)`; the training objective is
`loss + aux_loss`. Trainers pass `return_logits=False` to get the loss from the chunked LM head
(pipeline/model/loss.py) without materialising [B, T, V] logits. Infrastructure is applied from
outside: `pipeline/train` may set
`model.checkpoint_fn` (activation checkpointing), swap `block.ffn.experts` (expert parallelism), and
set `model.sequence_shard` plus every `block.attn.core` (sequence parallelism, see `SequenceShard`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from pipeline.model.attention import Attention, DecodeCache, KVCache
from pipeline.model.config import GPTOSSConfig
from pipeline.model.flex_attention import resolve_attention_backend
from pipeline.model.init import new_init_seed, seeded_normal_
from pipeline.model.loss import LMHead
from pipeline.model.masks import attention_mask, block_mask, document_ids, document_positions
from pipeline.model.mlp import MLP
from pipeline.model.moe import GroupedExperts, MoE, RouterStats, TopKRouter
from pipeline.model.rope import RotaryEmbedding


@dataclass(frozen=True)
class SequenceShard:
    """This model instance computes shard `index` of `count` equal contiguous shards of every sequence.

    The forward still receives whole sequences (input_ids and targets [B, T]): document ids, RoPE
    positions and attention masks are derived from the whole sequence, then only tokens
    [index * T / count, (index + 1) * T / count) are embedded and run through the blocks. Attention
    needs every position, so each `Attention.core` must then be one that gathers the sequence (the
    Ulysses core of pipeline/distributed/sequence_parallel.py). The returned LM loss is this shard's
    share, scaled so that the mean over the `count` shards equals the loss of the whole sequence.
    """

    index: int
    count: int

    def slice(self, T: int) -> slice:
        if T % self.count:
            raise ValueError(f"sequence length {T} is not divisible into {self.count} sequence-parallel shards")
        n = T // self.count
        return slice(self.index * n, (self.index + 1) * n)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as transformers' GptOssRMSNorm (stable under bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32).to(x.dtype)


def make_norm(config: GPTOSSConfig) -> nn.Module:
    if config.use_rms_norm:
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    """Pre-norm transformer block. forward -> (x, router_loss); router_loss is 0 for dense FFNs."""

    def __init__(self, config: GPTOSSConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = make_norm(config)
        self.ffn = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        mask: torch.Tensor | BlockMask | None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        out, router_loss = self.ffn(self.ffn_norm(h))
        return h + out, router_loss


class GPTOSS(nn.Module):
    def __init__(self, config: GPTOSSConfig):
        super().__init__()
        self.config = config
        # Drawn before any submodule exists: their constructors consume the global RNG on a real
        # device but not on meta, and the seed must not depend on where the model is built.
        self.init_seed = new_init_seed()
        # Where init_weights draws (None: on each tensor's own device). The trainer sets its GPU, so
        # weights are drawn there fast, also those that live on the CPU until DeepSpeed moves them.
        self.init_device: torch.device | None = None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_embed = (
            nn.Embedding(config.block_size, config.n_embd) if config.position_embedding == "learned" else None
        )
        self.rope = (
            RotaryEmbedding(config.head_size, config.rope_theta, config.rope_scaling)
            if config.position_embedding == "rope"
            else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = LMHead(config.n_embd, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Set by the trainer, e.g. functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False);
        # called as checkpoint_fn(block, x, cos, sin, mask) for every block while training.
        self.checkpoint_fn: Callable | None = None
        # Set by sequence parallelism (pipeline/distributed/sequence_parallel.py); None = whole sequences.
        self.sequence_shard: SequenceShard | None = None
        self.init_weights()

    # --- init / counting -----------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, only: Collection[nn.Module] | None = None) -> None:
        """GPT-2 init: N(0, init_std), zero biases, residual output projections scaled by 1/sqrt(2L).

        Every tensor is drawn from its own generator keyed by `self.init_seed` and its name (experts
        by layer and global expert id, see pipeline/model/init.py), so the values do not depend on
        the device, the visiting order, or which experts this process holds. `only`: initialise just
        these modules' own tensors (the trainer materialises and partitions a model module by module).
        """
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        residual = {id(b.attn.o_proj) for b in self.blocks}
        residual |= {id(b.ffn.down_proj) for b in self.blocks if isinstance(b.ffn, MLP)}
        for name, module in self.named_modules():
            if only is not None and module not in only:
                continue
            if isinstance(module, nn.Linear):
                std_ = resid_std if id(module) in residual else std
                seeded_normal_(module.weight, std_, self.init_seed, name, self.init_device)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                seeded_normal_(module.weight, std, self.init_seed, name, self.init_device)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Attention) and module.sinks is not None:
                nn.init.zeros_(module.sinks)  # a sink logit of 0 = one extra key with score 0
            elif isinstance(module, TopKRouter) and module.expert_bias is not None:
                module.expert_bias.zero_()  # balancing starts neutral (and to_empty left garbage)
        # Experts are keyed by layer, not module path: an expert-parallel wrapper may sit in between.
        for i, block in enumerate(self.blocks):
            for module in block.modules():
                if isinstance(module, GroupedExperts) and (only is None or module in only):
                    module.reset_parameters(self.init_seed, f"blocks.{i}.experts", self.init_device)

    def materialize(self, device: torch.device | str = "cpu") -> GPTOSS:
        """Allocate a model built under `torch.device("meta")` on `device` and initialise it exactly as
        a model built there directly (same init_seed) would be. Returns self."""
        self.to_empty(device=device)
        if self.config.tie_word_embeddings:  # to_empty gives the two modules separate tensors
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()
        return self

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (nanoGPT semantics): with non_embedding, position embeddings are left out,
        and so is the input token embedding unless it is tied to the LM head (then it is used as the
        output projection and counts)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
            if not self.config.tie_word_embeddings:
                n -= self.embed_tokens.weight.numel()
        return n

    # --- forward ---------------------------------------------------------------------------------
    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True,
        cache: DecodeCache | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """input_ids [B, T] -> (logits [B, T, V], LM loss or None, weighted router loss).

        targets [B, T] are the next tokens (already shifted); -100 positions are ignored. The router
        loss is averaged over MoE blocks (a 0-dim zero for dense models). With targets and
        return_logits=False the logits are None and the loss comes from the chunked linear +
        cross-entropy (same value and gradients, no [B*T, V] fp32 tensor).

        With a `cache` (from `new_cache`) this is one step of incremental decoding: input_ids [B, T]
        continue the cached sequence and only the last position's logits [B, 1, V] are returned (a
        prompt's [B, T, V] logits would be gigabytes at V = 201,088). Through the module's own
        forward, so a ZeRO-3 engine gathers the parameters as for any forward.
        """
        if cache is not None:
            if targets is not None:
                raise ValueError("a forward with a KV cache decodes; it takes no targets")
            if self.sequence_shard is not None:  # the attention cores would split the sequence over ranks
                raise ValueError("KV-cache decoding needs whole sequences; this model is sequence-sharded")
            x, aux_loss = self._trunk(input_ids, cache)
            return self.lm_head(x[:, -1:]), None, aux_loss  # [B, 1, V]
        x, aux_loss = self._trunk(input_ids, cache=None, documents=self.config.document_masking)
        denominator = None  # the number of valid targets the loss is averaged over; None = this call's
        if targets is not None and self.sequence_shard is not None:
            # A shard's loss sum over the whole sequence's valid targets, times the shard count:
            # its mean over the shards is the whole sequence's mean, masked targets included.
            denominator = (targets != -100).sum() / self.sequence_shard.count
            targets = targets[:, self.sequence_shard.slice(targets.shape[1])]  # [B, T / count]
        if targets is not None and not return_logits:
            return None, self.lm_head(x, targets, denominator), aux_loss
        logits = self.lm_head(x)  # [B, T, V] (T / count with a sequence shard)
        loss = None
        if targets is not None:
            flat_logits, flat_targets = logits.float().view(-1, logits.shape[-1]), targets.reshape(-1)
            if denominator is None:
                loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
            else:
                loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="sum") / denominator
        return logits, loss, aux_loss

    def _trunk(
        self, input_ids: torch.Tensor, cache: DecodeCache | None, documents: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-normed hidden states [B, T, D] and the mean router loss.

        documents: mask attention and restart positions at document boundaries (EOS). Only `forward`
        asks for it: generation, cached or not, treats its context as one sequence."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        pad_B = cache.pad_B if cache is not None else None
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than block_size ({self.config.block_size})"
            )
        device = input_ids.device
        shard = self.sequence_shard if cache is None else None
        doc_BT = None
        if documents:
            if cache is not None:
                raise ValueError("document masking needs the whole sequence; it cannot run with a KV cache")
            doc_BT = document_ids(input_ids, self.config.eos_token_id)  # [B, T]
            positions = document_positions(doc_BT)  # [B, T]
        else:
            positions = torch.arange(past, past + T, device=device)  # [T]
            if pad_B is not None:  # left-padded rows count from their first real token
                positions = (positions[None] - pad_B[:, None]).clamp(min=0)  # [B, T]
        if shard is not None:
            # Positions and document ids above are the whole sequence's; only this shard's tokens
            # are computed. Masks below stay whole-sequence: the attention core sees all positions.
            local = shard.slice(T)
            input_ids, positions = input_ids[:, local], positions[..., local]  # [B, T / count]
        x = self.embed_tokens(input_ids)  # [B, T, D]
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = self.drop(x)
        cos = sin = None
        if self.rope is not None:
            cos, sin = self.rope(positions, x.dtype)  # [T, hd/2] or [B, T, hd/2]
            if positions.dim() == 2:
                cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, hd/2]: broadcast over heads
        masks = self._masks(T, past, device, doc_BT, pad_B)

        router_losses = []
        for i, block in enumerate(self.blocks):
            mask = masks[block.attn.window]
            if self.checkpoint_fn is not None and self.training:
                x, router_loss = self.checkpoint_fn(block, x, cos, sin, mask)
            else:
                x, router_loss = block(x, cos, sin, mask, cache.layers[i] if cache is not None else None)
            if isinstance(block.ffn, MoE):
                router_losses.append(router_loss)
        aux_loss = (
            torch.stack(router_losses).mean() if router_losses else x.new_zeros((), dtype=torch.float32)
        )
        return self.norm(x), aux_loss

    def router_stats(self) -> RouterStats | None:
        """Statistics of every MoE layer in the latest forward (load balance, z-loss, tokens per
        expert, dropped tokens), stacked in layer order; None for a dense model. Under activation
        checkpointing the recomputation in backward writes the same values again."""
        stats = [m.last_stats for m in self.modules() if isinstance(m, MoE)]
        return RouterStats.stack(stats) if stats else None

    def attention_backend(self, device: torch.device) -> str:
        """The backend this model runs on `device` now: "flex" or "sdpa" (ConfigError if impossible)."""
        training = self.training and torch.is_grad_enabled()
        return resolve_attention_backend(self.config.attention_backend, device, training, self.config.dropout)

    def _masks(self, T: int, past: int, device: torch.device, doc_BT: torch.Tensor | None,
               pad_B: torch.Tensor | None = None) -> dict:
        """One mask per distinct window, shared by all blocks with that window: a BlockMask for flex,
        a boolean tensor (or None) for SDPA. KV-cache decoding steps (past > 0) always use SDPA: one
        query row per step gains nothing from a fused kernel, and a BlockMask per length would pile up.
        Left-padded batches (pad_B) also use SDPA: the static BlockMasks know no padding."""
        windows = {self.config.layer_window(i) for i in range(self.config.n_layer)}
        if past == 0 and pad_B is None and self.attention_backend(device) == "flex":
            return {w: block_mask(w, T, device, doc_BT) for w in windows}
        sinks = self.config.use_attention_sinks
        return {w: attention_mask(T, past + T, w, sinks, device, doc_BT, pad_B) for w in windows}

    # --- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Extend prompt [B, T] by up to max_new_tokens -> [B, T + n].

        temperature 0 is greedy. With a KV cache only the new token is run per step. Rows that emitted
        eos_id (default config.eos_token_id) keep emitting it; generation stops when all rows did.
        """
        if prompt.shape[1] + max_new_tokens > self.config.block_size:
            raise ValueError(
                f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds block_size "
                f"({self.config.block_size})"
            )
        eos_id = self.config.eos_token_id if eos_id is None else eos_id
        cache = self.new_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens, prompt.device) if use_cache else None
        tokens, step_input = prompt, prompt
        finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        for _ in range(max_new_tokens):
            hidden, _ = self._trunk(step_input, cache)
            logits = self.lm_head(hidden[:, -1]).float()  # [B, V]
            next_B1 = sample_next_token(logits, temperature, top_k, top_p)
            if eos_id is not None:
                next_B1 = torch.where(finished[:, None], torch.full_like(next_B1, eos_id), next_B1)
                finished |= next_B1[:, 0] == eos_id
            tokens = torch.cat([tokens, next_B1], dim=1)
            step_input = next_B1 if use_cache else tokens
            if eos_id is not None and bool(finished.all()):
                break
        return tokens

    def new_cache(self, batch: int, max_len: int, device: torch.device | str,
                  pad_B: torch.Tensor | None = None) -> DecodeCache:
        """An empty KV cache for `batch` rows of up to `max_len` slots (padding included); pad_B [B]:
        left-padding slots per row. Allocates only the cache (no parameter is read, so it works on a
        ZeRO-3-partitioned module too)."""
        cfg = self.config
        dtype = self.embed_tokens.weight.dtype
        layers = [KVCache(batch, cfg.kv_heads, max_len, cfg.head_size, dtype=dtype, device=device)
                  for _ in range(cfg.n_layer)]
        return DecodeCache(layers, None if pad_B is None else pad_B.to(device))

    # --- transformers interop --------------------------------------------------------------------
    @classmethod
    def from_hf(cls, directory: str | Path, **config_overrides) -> GPTOSS:
        """Load a local transformers GPT-OSS folder (config.json + safetensors), or a native export."""
        from pipeline.model.hf import load_folder  # conversion lives beside the model, not in it

        return load_folder(cls, directory, **config_overrides)

    def save_hf(self, directory: str | Path) -> None:
        """Write a folder that `GptOssForCausalLM.from_pretrained` loads."""
        from pipeline.model.hf import save_hf

        save_hf(self, directory)


def sample_next_token(
    logits_BV: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row [B, 1]: greedy when temperature == 0, else top-k / nucleus sampling
    (drawn from `generator`, default the global RNG)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        kth = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, sorted_idx = torch.sort(logits_BV, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the top token always stays).
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p
        drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return torch.multinomial(torch.softmax(logits_BV, dim=-1), num_samples=1, generator=generator)

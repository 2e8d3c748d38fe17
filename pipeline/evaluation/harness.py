"""lm-evaluation-harness adapter: our model and tokenizer as an `lm_eval` language model.

    lm = PipelineLM(Scorer(forward, device), tokenizer, max_length=model_cfg.block_size)
    lm_eval.simple_evaluate(model=lm, tasks=[...])

`PipelineLM` implements the harness's likelihood requests (`loglikelihood`, which multiple-choice
tasks use, and `loglikelihood_rolling`) exactly as the harness's own Hugging Face backend
(`lm_eval.models.huggingface.HFLM`) does: the same encoding of (context, continuation) pairs (the
harness's `TemplateLM._encode_pair`), the same left-truncation to `max_length + 1` tokens that
keeps the continuation, the same rolling windows, log-softmax in fp32. Tests hold the two equal per
request. Generation (`generate_until`) returns what the HF backend's returns (pipeline/evaluation/
generation.py: batched KV-cached decoding); tests hold the greedy strings equal.

Distribution (`Scorer`): the harness runs on rank 0 only (it sees one process, so its few-shot
sampling and metrics are those of a single-process run). Every batch of token requests it asks
for is broadcast to all ranks; each rank scores every `world`-th request of the length-sorted list
and all ranks run the same number of forwards (short ranks run a one-token dummy forward), because
under ZeRO-3 every forward gathers parameters collectively and expert parallelism exchanges tokens
over all ranks. The other ranks wait in `Scorer.serve()` until rank 0 says it is done. With
sequence parallelism the unit is an SP group instead of a rank: its ranks score the same requests
(`pipeline.distributed.sequence_parallel.whole_sequence_forward` gives each the whole logits).
Generation requests are dealt over ranks the same way (`Scorer.generate`), with a `Decoder` for
KV-cached steps; with sequence parallelism over all ranks, not SP groups: while it decodes, the model
computes whole sequences on every rank (`sequence_parallel.whole_sequences`), so each rank decodes
its own requests as without SP.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from pipeline.data.tokenizer import Tokenizer
from pipeline.distributed.collectives import from_rank0, gather_objects
from pipeline.distributed.ranks import RankView, current
from pipeline.distributed.sequence_parallel import data_parallel_coords
from pipeline.evaluation.generation import Decoder, GenerationSettings, generate_dealt

# A request as the scorer sees it: the model's input window (at most max_length + 1 tokens, the last
# one only a target) and how many of its final tokens are the continuation to score.
TokenRequest = tuple[list[int], int]


class Scorer:
    """Sum of continuation log-probs (fp32) and "is greedy" for token requests, on every rank of
    the default process group. `forward(ids [B, T]) -> logits [B, T, V]` runs in eval mode, no grad.
    Generation (`generate`) needs a `decoder` and the `tokenizer` (for stop strings) on every rank."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str,
                 batch_size: int = 16, pad_id: int = 0, sequence_parallel: int = 1,
                 decoder: Decoder | None = None, tokenizer: Tokenizer | None = None):
        self.forward = forward
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.decoder, self.tokenizer = decoder, tokenizer
        view: RankView = current()
        self.distributed = view.distributed
        self.rank, self.world = (view.rank, view.world) if self.distributed else (0, 1)
        # With sequence parallelism the `sequence_parallel` consecutive ranks of a group run the same
        # requests (each computes a slice of every sequence; `forward` returns whole-sequence logits on
        # each), so requests are dealt to groups and the group's first rank reports them.
        self.sp = sequence_parallel
        self.deal_index, self.deal_count = data_parallel_coords(self.rank, self.world, self.sp)
        self.forwards = 0  # run by this rank, dummies included (tests check every rank ran as many)

    # --- rank 0 ---------------------------------------------------------------------------------
    def score(self, requests: list[TokenRequest]) -> list[tuple[float, bool]]:
        """On rank 0: the result of every request, in order. The other ranks are in `serve()`."""
        self._send(("score", requests))
        return self._score(requests)

    def generate(self, contexts: list[list[int]], settings: GenerationSettings) -> list[str]:
        """On rank 0: the generated text of every context (token lists), in order."""
        self._send(("generate", (contexts, settings)))
        return self._generate(contexts, settings)

    def stop(self, error: str | None = None) -> None:
        """On rank 0: release the ranks in `serve()`; with `error` they raise it too."""
        self._send(("error", error) if error else ("stop", None))

    # --- the other ranks --------------------------------------------------------------------------
    def serve(self) -> None:
        """On ranks > 0: score what rank 0 sends until it stops; raises if rank 0 failed."""
        while True:
            command, payload = from_rank0(None)
            if command == "stop":
                return
            if command == "error":
                raise RuntimeError(f"downstream evaluation failed on rank 0: {payload}")
            if command == "generate":
                self._generate(*payload)
            else:
                self._score(payload)

    # --- every rank -------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        from_rank0(message)

    @torch.no_grad()
    def _generate(self, contexts: list[list[int]], settings: GenerationSettings) -> list[str] | None:
        if self.decoder is None or self.tokenizer is None:
            raise RuntimeError("this Scorer was built without a decoder and tokenizer: it cannot generate")
        texts, forwards = generate_dealt(contexts, settings, self.decoder, self.tokenizer, self._dummy_decode,
                                         self.device, self.batch_size, self.pad_id, self.rank, self.world)
        self.forwards += forwards
        return texts

    def _dummy_forward(self) -> None:
        """A one-token forward: keeps this rank's collectives in step when it has nothing to compute."""
        self.forward(torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device))

    def _dummy_decode(self) -> None:
        """Generation's one-token forward, through the decoder: under sequence parallelism `forward`
        all-gathers over the SP group, whose other ranks decode requests of their own meanwhile."""
        self.decoder.step(torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device), None)

    @torch.no_grad()
    def _score(self, requests: list[TokenRequest]) -> list[tuple[float, bool]]:
        # Longest first (as the HF backend), dealt round-robin: every rank gets a similar share of
        # tokens, and batches hold requests of similar length (little padding).
        order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][0]), requests[i][0]))
        mine = order[self.deal_index::self.deal_count]
        n_forwards = math.ceil(math.ceil(len(requests) / self.deal_count) / self.batch_size)  # rank 0's count
        results: list[tuple[float, bool]] = []
        for b in range(n_forwards):
            batch = [requests[i] for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]
            results += self._score_batch(batch)
        gathered = gather_objects(results if self.rank % self.sp == 0 else [], dst=0)
        if gathered is None:  # ranks > 0: rank 0 holds every result
            return []
        out: list = [None] * len(requests)
        for r, part in enumerate(gathered):  # only each group's first rank sent its part
            for k, res in enumerate(part):
                out[order[r // self.sp + k * self.deal_count]] = res
        return out

    def _score_batch(self, batch: list[TokenRequest]) -> list[tuple[float, bool]]:
        self.forwards += 1
        if not batch:  # this rank has run out
            self._dummy_forward()
            return []
        T = max(len(tokens) - 1 for tokens, _ in batch)
        ids_BT = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        for b, (tokens, _) in enumerate(batch):
            ids_BT[b, :len(tokens) - 1] = torch.tensor(tokens[:-1])  # right padding: causal rows are unaffected
        logits_BTV = self.forward(ids_BT.to(self.device))
        logprob_sums, greedy = [], []
        for b, (tokens, n_cont) in enumerate(batch):
            end = len(tokens) - 1
            logprobs_CV = logits_BTV[b, end - n_cont:end].float().log_softmax(-1)  # [n_cont, V]
            target_C = torch.tensor(tokens[-n_cont:], device=logprobs_CV.device)
            logprob_sums.append(logprobs_CV.gather(1, target_C[:, None])[:, 0].sum())
            greedy.append((logprobs_CV.argmax(-1) == target_C).all())
        # One host read per batch (two per request would stall a GPU once per request).
        return list(zip(torch.stack(logprob_sums).tolist(), torch.stack(greedy).tolist(), strict=True))


@register_model("gpt-oss-pipeline")
class PipelineLM(TemplateLM):
    """The harness's view of our model: one process (rank 0), likelihood requests only.

    `prefix_token_id` conditions an empty context and starts rolling windows: the harness uses BOS
    when the tokenizer has one; our documents start with BOS only when the data was prepared with
    `--bos`, so the caller passes BOS then and EOS (the document separator) otherwise.
    """

    def __init__(self, scorer: Scorer, tokenizer: Tokenizer, max_length: int, prefix_token_id: int | None = None,
                 name: str = "gpt-oss-pipeline"):
        super().__init__()
        self.scorer = scorer
        self.tok = tokenizer
        self._max_length = max_length
        self._prefix = tokenizer.eos_id if prefix_token_id is None else prefix_token_id
        self.name = name

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"{self.tok.kind}-{self.tok.sha256[:12]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)  # never adds BOS/EOS: the prefix token is explicit

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) | None, context_enc, continuation_enc) -> (log p, is greedy)."""
        windows: list[TokenRequest] = []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc or len(continuation_enc) > self.max_length:
                raise ValueError(f"cannot score a request with {len(context_enc)} context and "
                                 f"{len(continuation_enc)} continuation tokens (max_length {self.max_length})")
            # As the HF backend: keep the last max_length + 1 tokens (left truncation keeps the
            # continuation); the last one is only a target.
            windows.append(((context_enc + continuation_enc)[-(self.max_length + 1):], len(continuation_enc)))
        return self.scorer.score(windows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint windows of max_length, each with as much context
        as fits (the harness's `get_rolling_token_windows`, as the HF backend), one scorer call."""
        windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            rolling = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows += [(None, ctx, cont) for ctx, cont in rolling]
            counts.append(len(rolling))
        scores = self._loglikelihood_tokens(windows)
        out, start = [], 0
        for n in counts:
            out.append(sum(ll for ll, _ in scores[start:start + n]))
            start += n
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """requests: (context, gen_kwargs) -> generated text, as the HF backend: requests grouped by
        their gen_kwargs, the context left-truncated to max_length - max_gen_toks tokens (an empty
        one is the prefix token), one scorer call per group (see generation.py)."""
        eos_text = self.tok.decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        for indices in groups.values():
            settings = GenerationSettings.from_gen_kwargs(requests[indices[0]].args[1], eos_text)
            budget = check_generation_fits(settings, self.max_length)
            contexts = [(self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-budget:] for i in indices]
            for i, text in zip(indices, self.scorer.generate(contexts, settings), strict=True):
                out[i] = text
        return out

    def get_model_info(self) -> dict:
        return {"model": self.name, "max_length": self.max_length, "tokenizer": self.tok.identity()}


def check_generation_fits(settings: GenerationSettings, max_length: int) -> int:
    """Tokens of context left beside max_gen_toks new ones (ValueError when none)."""
    if settings.max_gen_toks >= max_length:
        raise ValueError(f"max_gen_toks ({settings.max_gen_toks}) must be less than the context length "
                         f"({max_length}); lower the task's generation_kwargs.max_gen_toks")
    return max_length - settings.max_gen_toks

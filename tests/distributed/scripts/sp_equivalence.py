"""Rank script for tests/distributed/test_sequence_parallel.py: sequence parallelism (with and without
expert parallelism) against the unsplit model in the same process, without DeepSpeed's engine, so
every parameter's gradient can be compared exactly.

    torchrun --standalone --nproc_per_node 4 tests/distributed/scripts/sp_equivalence.py OUT.json [DATA_DIR]

Per case (SP size, sequence length, document masking, EP size) every rank builds the same seeded
model twice: the reference runs the whole batch; the other gets Ulysses attention (and EP experts)
and computes its sequence shard. The data-parallel mean of the shard losses must equal the
reference loss, and each parameter's gradient, summed over the ranks that hold it and divided by the
world size (what DeepSpeed's averaging does), must equal the reference gradient. A packed sample's
sharded logits, gathered, must equal each document's logits when it is run alone.
With DATA_DIR (a prepared dir: its tokenizer), the shipped tiny lm-eval tasks are scored by the same
seeded model unsplit (requests dealt over all ranks) and with SP 2 and 4 (each SP group's ranks
share its requests), with a context length that is a multiple of neither; the greedy generation
task runs too (each rank decodes requests of its own, also under SP).
Rank 0 writes the largest differences (and the downstream per-request log-likelihoods and
generations) to OUT.json.
"""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from pipeline.distributed.expert_parallel import apply_expert_parallel, create_expert_groups, is_expert_parameter
from pipeline.distributed.process_group import quiet_library_warnings
from pipeline.distributed.sequence_parallel import apply_sequence_parallel, create_sequence_groups
from pipeline.model import GPTOSS, MoE, get_preset

EOS = 1
CASES = [  # (sp, seq_len, document_masking, ep, MoE token chunk); the debug preset's sliding window is 32
    (2, 128, False, 1, None),  # window (32) smaller than a shard (64)
    (2, 128, True, 2, 24),  # MoE tiled: 3 chunks of 24 tokens (and one of 56) per rank, EP exchanges per chunk
    (4, 64, True, 1, None),  # window spans shards (16 tokens each); 4 > 2 KV heads: KV heads repeated
    (4, 64, False, 2, None),
]


def batch(seq_len: int, seed: int) -> torch.Tensor:
    """[2, seq_len + 1] tokens with EOS at places that end documents inside and across shards."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, 512, (2, seq_len + 1), generator=g)
    for b, cuts in enumerate(([5, seq_len // 4, seq_len // 2 + 3], [seq_len // 2 - 1, seq_len - 7])):
        x[b, cuts] = EOS
    return x


def build(doc: bool, seed: int = 11, backend: str = "auto") -> GPTOSS:
    torch.manual_seed(seed)
    model = GPTOSS(get_preset("debug", document_masking=doc, eos_token_id=EOS, aux_loss_weight=0.1,
                              router_z_loss_weight=0.01, attention_backend=backend, block_size=256))
    with torch.no_grad():  # sinks start at 0; distinct per head, a sink given to the wrong head shows
        for block in model.blocks:
            block.attn.sinks.copy_(torch.linspace(-2.0, 2.0, block.attn.n_head))
    return model


def run_case(sp: int, seq_len: int, doc: bool, ep: int, chunk: int | None, world: int) -> dict:
    x = batch(seq_len, seed=sp * 1000 + seq_len)
    inputs, targets = x[:, :-1], x[:, 1:]
    ref = build(doc)
    _, ref_lm, ref_aux = ref(inputs, targets, return_logits=False)
    (ref_lm + ref_aux).backward()

    model = build(doc)
    if ep > 1:
        apply_expert_parallel(model, create_expert_groups(ep))
    apply_sequence_parallel(model, create_sequence_groups(sp))
    if chunk is not None:
        for m in model.modules():
            if isinstance(m, MoE):
                m.token_chunk = chunk
    _, lm, aux = model(inputs, targets, return_logits=False)
    (lm + aux).backward()

    losses = torch.stack([lm.detach(), aux.detach()])
    dist.all_reduce(losses)
    losses /= world
    out = {"lm_diff": abs(float(losses[0] - ref_lm.detach())), "aux_diff": abs(float(losses[1] - ref_aux.detach())),
           "lm": float(ref_lm.detach()), "grad_diff": 0.0, "worst": None, "params": 0}
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.detach().clone()
        if is_expert_parameter(p) or ".experts.local." in name:
            local = model.get_submodule(name.rsplit(".", 1)[0])  # ...experts.local
            start = local.expert_offset
            ref_grad = ref_params[name.replace(".experts.local.", ".experts.")].grad[start:start + local.num_experts]
            edp = create_expert_groups(ep).edp_group
            dist.all_reduce(grad, group=edp)
        else:
            ref_grad = ref_params[name].grad
            dist.all_reduce(grad)
        diff = float((grad / world - ref_grad).abs().max())
        out["params"] += 1
        if diff >= out["grad_diff"]:
            out["grad_diff"], out["worst"] = diff, name
    return out


@torch.no_grad()
def document_logits_case(sp: int, seq_len: int, backend: str) -> float:
    """Largest |logit difference| between a packed, sharded sample and its documents run alone (SDPA).
    backend "flex": the sharded model runs FlexAttention with whole-sequence BlockMasks (CPU has its
    eager forward, no backward)."""
    model = build(doc=True, backend=backend).eval()
    alone = build(doc=True).eval()
    apply_sequence_parallel(model, create_sequence_groups(sp))
    x = batch(seq_len, seed=7)[:1, :-1]  # [1, T]
    local, _, _ = model(x)  # [1, T / sp, V]
    parts = [torch.empty_like(local) for _ in range(sp)]
    dist.all_gather(parts, local.contiguous(), group=create_sequence_groups(sp).group)
    packed = torch.cat(parts, dim=1)[0]  # [T, V]
    ends = (x[0] == EOS).nonzero().flatten().tolist()
    worst, start = 0.0, 0
    for end in [*ends, seq_len - 1]:
        if end < start:
            continue
        doc_logits, _, _ = alone(x[:, start : end + 1])
        worst = max(worst, float((packed[start : end + 1] - doc_logits[0]).abs().max()))
        start = end + 1
    return worst


@torch.no_grad()
def downstream_case(data_dir: str) -> dict | None:
    """{sp: {"loglikelihoods": per request, "metrics": the harness's, "generations": pycode_gen's
    texts}} for SP 1, 2 and 4 on rank 0."""
    from pipeline.distributed.ranks import current
    from pipeline.distributed.sequence_parallel import whole_sequence_forward
    from pipeline.evaluation.config import EvalConfig
    from pipeline.evaluation.downstream import DownstreamEvaluator, data_tokenizer
    from pipeline.evaluation.generation import Decoder
    from tests.evaluation.conftest import TASKS_DIR, TINY_TASKS, per_request

    tok, prefix = data_tokenizer(data_dir)
    # pycode_gen: 8 requests, 2 per rank in one batch of 3 (ranks of an SP group decode different ones)
    cfg = EvalConfig(tasks=[*TINY_TASKS, "pycode_gen"], task_paths=[str(TASKS_DIR)], num_fewshot=2, limit=9,
                     batch_size=3)
    # 23: 2-shot prompts are truncated, rolling windows are cut, and no length is a multiple of 2 or 4.
    evaluator = DownstreamEvaluator(cfg, tok, prefix, 23, current(), log_samples=True)
    out = {}
    for sp in (1, 2, 4):
        model = build(doc=True).eval()
        forward = lambda ids, model=model: model(ids)[0]  # noqa: E731
        if sp > 1:
            apply_sequence_parallel(model, create_sequence_groups(sp))
            forward = whole_sequence_forward(forward, create_sequence_groups(sp))
        results = evaluator.evaluate(forward, "cpu", sequence_parallel=sp, decoder=Decoder(model))
        if results is not None:
            lls = [ll for task in TINY_TASKS for ll in per_request(results, task)]
            metrics = {f"{t}/{k}": v for t in TINY_TASKS for k, v in results["results"][t].items()
                       if isinstance(v, float)}
            texts = [s["resps"][0][0] for s in sorted(results["samples"]["pycode_gen"], key=lambda s: s["doc_id"])]
            out[sp] = {"loglikelihoods": lls, "metrics": metrics, "generations": texts}
    return out or None


def main() -> None:
    quiet_library_warnings()
    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    results = {"cases": {}, "documents": {}}
    for sp, seq_len, doc, ep, chunk in CASES:
        name = f"sp{sp}_T{seq_len}_doc{int(doc)}_ep{ep}" + (f"_chunk{chunk}" if chunk else "")
        results["cases"][name] = run_case(sp, seq_len, doc, ep, chunk, world)
    for sp, seq_len, backend in ((2, 64, "auto"), (4, 64, "auto"), (2, 256, "flex")):
        results["documents"][f"sp{sp}_T{seq_len}_{backend}"] = document_logits_case(sp, seq_len, backend)
    if len(sys.argv) > 2:
        results["downstream"] = downstream_case(sys.argv[2])
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    from pipeline.cli import run_and_exit

    run_and_exit(main)  # no interpreter teardown with gloo threads alive (see run_and_exit)

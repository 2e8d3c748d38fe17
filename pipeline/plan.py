"""Plan a training run before renting GPUs: memory per GPU, tokens, FLOPs, step time, nodes needed.

    python -m pipeline.plan --config launch/configs/gpt-oss-120b-8node.yaml --nodes 8
    python -m pipeline.plan --config RUN.yaml train.micro_batch_size=2 --nodes 1 2 4 8 16
    python -m pipeline.plan --preset gpt-oss-20b --seq-len 4096 --ep 8 --activation-checkpointing
    python -m pipeline.plan --config launch/configs/gpt-oss-120b-8node.yaml --nodes 8 --search

It reads exactly the run configs the trainer reads (`pipeline.train.config.load_run_config`, same
`key=value` overrides) and the DeepSpeed JSON the trainer would build from them. Flags such as
--seq-len are shorthands for those overrides. Exit status 2 on a config the trainer would refuse.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from pipeline.cli import user_errors_exit_2
from pipeline.errors import ConfigError
from pipeline.hardware import GPUS, get_gpu
from pipeline.planning.comm import Links
from pipeline.planning.planner import DEFAULT_MFU, Planner
from pipeline.planning.report import plan_to_dict, render_text
from pipeline.planning.search import render_search, search
from pipeline.train.config import RunConfig, load_run_config
from pipeline.train.ds_config import load_ds_json

DEFAULT_TABLE_NODES = (1, 2, 4, 8, 16, 32)


def _node_list(values: list[str]) -> list[int]:
    out = []
    for v in values:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(int(part))
                except ValueError:
                    raise ConfigError(f"--nodes takes integers, got {part!r}") from None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="run config YAML/JSON (the file pipeline.train takes)")
    src.add_argument("--preset", help="model preset; with bf16 and ds_configs/zero3.json unless flags say otherwise")
    p.add_argument("overrides", nargs="*", help="run-config overrides key=value (e.g. train.micro_batch_size=2)")
    p.add_argument("--nodes", nargs="+", default=["1"], help="node count(s); the first gets the detailed report")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS))
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                   help="model FLOPs utilization of the compute (default 0.28: NeMo AutoModel, gpt-oss-20b, 8xH100)")
    p.add_argument("--nvlink-gbps", type=float, default=Links.nvlink / 1e9,
                   help="GB/s per GPU inside a node (default: H100 NVLink, NCCL all-gather bus bandwidth)")
    p.add_argument("--network-gbps", type=float, default=Links.network / 1e9,
                   help="GB/s per GPU between nodes (default: one 400 Gb/s NIC per GPU)")
    p.add_argument("--search", action="store_true",
                   help="try every EP size, SP size, micro-batch and checkpointing choice on the first --nodes; "
                   "print the fastest layouts that fit")
    p.add_argument("--top", type=int, default=10, help="rows --search prints")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of GPU memory kept free")
    p.add_argument("--max-nodes", type=int, default=1024, help="search limit for the smallest fitting count")
    p.add_argument("--table-nodes", default=",".join(map(str, DEFAULT_TABLE_NODES)),
                   help="comma-separated node counts for the comparison table (plus --nodes)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    g = p.add_argument_group("shorthands for run-config overrides")
    g.add_argument("--seq-len", type=int, help="data.seq_len")
    g.add_argument("--micro-batch", type=int, help="train.micro_batch_size")
    g.add_argument("--grad-accum", type=int, help="train.grad_accum_steps")
    g.add_argument("--ep", type=int, help="parallel.expert_parallel_size")
    g.add_argument("--sp", type=int, help="parallel.sequence_parallel_size")
    g.add_argument("--precision", choices=["fp32", "bf16"], help="precision")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="parallel.activation_checkpointing")
    g.add_argument("--zero-stage", type=int, choices=[2, 3], help="zero_optimization.stage of the DeepSpeed JSON")
    g.add_argument("--offload", choices=["none", "cpu"], help="zero_optimization.offload_optimizer.device")
    return p.parse_args(argv)


def load_run(args: argparse.Namespace, tmpdir: Path) -> tuple[RunConfig, str]:
    shorthands = {
        "data.seq_len": args.seq_len,
        "train.micro_batch_size": args.micro_batch,
        "train.grad_accum_steps": args.grad_accum,
        "parallel.expert_parallel_size": args.ep,
        "parallel.sequence_parallel_size": args.sp,
        "precision": args.precision,
        "parallel.activation_checkpointing": args.activation_checkpointing,
    }
    overrides = list(args.overrides) + [
        f"{k}={json.dumps(v)}" for k, v in shorthands.items() if v is not None
    ]
    if args.config:
        run, source = load_run_config(args.config, overrides), args.config
    else:
        # Plan-only run config: the data path is never read.
        tree_overrides = [f"model.preset={args.preset}", "data.train=[plan-only]", "precision=bf16",
                          "deepspeed_config=ds_configs/zero3.json"]
        run, source = load_run_config(None, tree_overrides + overrides), f"--preset {args.preset}"
    if args.zero_stage is not None or args.offload is not None:
        original = run.deepspeed_config
        ds = load_ds_json(original)
        zero = ds.setdefault("zero_optimization", {})
        if args.zero_stage is not None:
            zero["stage"] = args.zero_stage
        if args.offload is not None:
            zero["offload_optimizer"] = {"device": args.offload, "pin_memory": True}
        path = tmpdir / "ds_config.json"
        path.write_text(json.dumps(ds))
        run = dataclasses.replace(run, deepspeed_config=str(path))
        source += f" (DeepSpeed JSON {original} with --zero-stage/--offload applied)"
    else:
        source += f" (DeepSpeed JSON {run.deepspeed_config})"
    return run, source


@user_errors_exit_2
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run, source = load_run(args, Path(tmp))
        nodes = _node_list(args.nodes)
        if args.nvlink_gbps <= 0 or args.network_gbps <= 0:
            raise ConfigError("--nvlink-gbps and --network-gbps must be > 0")
        planner = Planner(run, gpus_per_node=args.gpus_per_node, gpu=get_gpu(args.gpu), mfu=args.mfu,
                          headroom=args.headroom,
                          links=Links(nvlink=args.nvlink_gbps * 1e9, network=args.network_gbps * 1e9))
        if args.search:
            print(render_search(search(planner, nodes[0]), nodes[0], args.gpus_per_node, args.top))
            return 0
        plan = planner.plan(nodes[0])  # the requested layout must be runnable: errors exit 2
        table_nodes = sorted(set(_node_list([args.table_nodes])) | set(nodes))
        table = [planner.try_plan(n) for n in table_nodes]
        smallest = planner.smallest_fitting(args.max_nodes)
    if args.json:
        print(json.dumps(plan_to_dict(planner, plan, smallest, table), indent=2))
    else:
        print(render_text(planner, plan, source, table, smallest, args.max_nodes))
        if not plan.fits:
            print(f"\nwarning: does not fit on {plan.nodes} node(s); see the table above", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

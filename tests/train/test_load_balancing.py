"""Aux-loss-free balancing in the real trainer: under expert parallelism (2 ranks, ep=2) the run
equals the single-process reference with the bias update, the bias is identical on every rank, it
is saved with DeepSpeed's ZeRO-3 checkpoint and restored on resume (the resumed run still equals
the reference), and it is logged per layer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from tests.ranks import torchrun
from tests.runs import losses, read_metrics, write_run_config
from tests.train.reference import reference_run

SCRIPTS = Path(__file__).parent / "scripts"

RATE = 0.01


def inspect(run_dir, config, *overrides) -> list[dict]:
    torchrun(2, [str(SCRIPTS / "train_inspect.py"), "--config", str(config), *overrides])
    return [json.loads((run_dir / f"inspect_rank{r}.json").read_text()) for r in range(2)]


def test_bias_is_exact_under_ep_equal_on_ranks_and_survives_resume(prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_run_config(
        tmp_path / "run.yaml", prepared_data, run_dir,
        model={"preset": "debug", "use_aux_loss": False, "load_balance_bias_rate": RATE},
        # decay_steps fixed: the schedule must not depend on train.steps, which the resume raises.
        optim={"lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": 2, "decay_steps": 10},
        train={"steps": 4, "save_interval": 2},
    )
    ref, _ = reference_run(cfg, world=2, overrides=["train.steps=6"])

    first = inspect(run_dir, cfg)  # steps 1-4, checkpoint at 4
    resumed = inspect(run_dir, cfg, "train.steps=6")  # resumes from step_4
    for reports, step in ((first, 4), (resumed, 6)):
        assert reports[0]["expert_bias"] == reports[1]["expert_bias"]  # bit-identical on every rank
        got = torch.tensor(reports[0]["expert_bias"])
        assert got.shape == (4, 4) and got.abs().max() > 0  # 4 MoE layers x 4 experts, and it moved
        torch.testing.assert_close(got, torch.tensor(ref[step]["expert_bias"]), rtol=0, atol=1e-6)
    got = losses(run_dir)
    for step in range(1, 7):
        assert math.isclose(got[step], ref[step]["total"], rel_tol=0, abs_tol=1e-5), (step, got[step], ref[step])
    logged = {r["step"]: r for r in read_metrics(run_dir)}
    assert logged[6]["moe/expert_bias"] == resumed[0]["expert_bias"]
    assert logged[6]["moe/expert_bias_absmax/layer_0"] == max(abs(b) for b in resumed[0]["expert_bias"][0])


def test_export_drops_the_bias_with_a_warning(tmp_path, capsys):
    """transformers' GptOss has no selection-only bias: the export keeps every weight, drops the bias."""
    from pipeline.checkpoint.hf_export import load_exported, write_export
    from pipeline.model import GPTOSS, get_preset

    cfg = get_preset("debug", load_balance_bias_rate=RATE)
    model = GPTOSS(cfg)
    with torch.no_grad():
        model.blocks[0].ffn.router.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.25, -0.25]))
    # As gather_state_dict produces it (parameters), plus the bias should a gatherer include buffers.
    bias = model.blocks[0].ffn.router.expert_bias
    state = {**dict(model.named_parameters()), "blocks.0.ffn.router.expert_bias": bias}
    assert write_export(state, cfg, tmp_path / "hf", None) == "hf-gpt-oss"
    assert "the per-expert routing bias is not exported" in capsys.readouterr().err
    exported = load_exported(tmp_path / "hf")
    assert exported.config.load_balance_bias_rate == 0.0
    assert not any(k.endswith("expert_bias") for k in exported.state_dict())
    for name, p in model.named_parameters():
        torch.testing.assert_close(exported.get_parameter(name), p, rtol=0, atol=0)

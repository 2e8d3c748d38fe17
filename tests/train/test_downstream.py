"""Downstream (lm-eval) evaluation in the training loop and from `python -m pipeline.evaluate`.

One 2-rank ZeRO-3 + EP 2 run evaluates the shipped tiny tasks (multiple choice, perplexity and a
greedy generation task) at step 3, checkpoints, and is resumed to evaluate again at step 6. Its
results equal the single-process CLI on the step-6 checkpoint, the CLI under torchrun (the run's own
engine) and the CLI on the export (generations compared through the task's fingerprint metric); its
training losses equal those of the same run without evaluation (with dropout on, so a disturbed RNG
would show). A generation task asking for what we do not implement stops a 2-rank start with one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO_ROOT
from tests.evaluation.conftest import TASKS_DIR, TINY_TASKS, assert_same_scores, downstream, write_bad_tasks
from tests.ranks import rank_env, torchrun
from tests.runs import losses, train, write_run_config

GEN_TASK = "pycode_gen"
EVAL = {"tasks": [*TINY_TASKS, GEN_TASK], "task_paths": [str(TASKS_DIR)], "downstream_interval": 3, "limit": 8,
        "num_fewshot": 1, "batch_size": 8}


def evaluate_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.evaluate", *args]
    proc = subprocess.run(cmd, env=rank_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_in_loop_equals_single_process_cli_and_export(prepared_data, tmp_path):
    # decay_steps fixed: the schedule does not depend on train.steps, so a run stopped at step 3
    # and resumed to 6 trains as one run of 6 steps.
    common = {"model": {"preset": "debug", "dropout": 0.1}, "optim": {"decay_steps": 4},
              "train": {"steps": 6, "save_interval": 3}}
    cfg = write_run_config(tmp_path / "a.yaml", prepared_data, tmp_path / "a", eval=EVAL, **common)
    plain = write_run_config(tmp_path / "b.yaml", prepared_data, tmp_path / "b", **common)
    first = train(2, cfg, "train.steps=3")
    resumed = train(2, cfg)
    assert "resumed from" in resumed.stdout
    train(2, plain)

    # Training state untouched: the same losses as without evaluation, step for step, also after
    # resuming from the checkpoint written right after an evaluation.
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert len(losses(tmp_path / "a")) == 6
    # Logged on rank 0 to the console, metrics.jsonl, TensorBoard, and the harness's JSON per step;
    # the resumed run continues the series.
    for proc, step in ((first, 3), (resumed, 6)):
        assert len(re.findall(rf"^downstream step +{step} \| pycode_tiny/acc ", proc.stdout, re.M)) == 1, proc.stdout
    records = [r for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
               if "downstream/seconds" in r]
    assert [r["step"] for r in records] == [3, 6]
    events = EventAccumulator(str(tmp_path / "a" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("downstream/pycode_tiny/acc")] == [3, 6]
    in_loop = downstream(tmp_path / "a" / "downstream" / "step_6.json")
    assert f"downstream/{GEN_TASK}/fingerprint" in in_loop
    assert in_loop == {k: v for k, v in records[-1].items() if k in in_loop}

    # The same weights in one process (checkpoint read whole), under torchrun (the run's ZeRO-3 +
    # EP 2 engine), and as an export: the same scores.
    evaluate_cli("--run-dir", str(tmp_path / "a"), "--step", "6", "--output", str(tmp_path / "one.json"))
    assert_same_scores(downstream(tmp_path / "one.json"), in_loop)
    torchrun(2, ["-m", "pipeline.evaluate", "--run-dir", str(tmp_path / "a"), "--output", str(tmp_path / "two.json")])
    assert_same_scores(downstream(tmp_path / "two.json"), in_loop)
    subprocess.run([sys.executable, "-m", "pipeline.export", "--run-dir", str(tmp_path / "a"), "--output",
                    str(tmp_path / "export")], env=rank_env(), cwd=REPO_ROOT, check=True, capture_output=True)
    out = evaluate_cli("--model", str(tmp_path / "export"), "--tasks", *TINY_TASKS, GEN_TASK,
                       "--task-path", str(TASKS_DIR), "--limit", "8", "--num-fewshot", "1")
    assert "pycode_tiny" in out.stdout
    assert_same_scores(downstream(tmp_path / "export" / "lm_eval_results.json"), in_loop)


def test_unsupported_generation_task_stops_two_ranks_at_start(prepared_data, tmp_path):
    bad = write_bad_tasks(tmp_path / "tasks")
    bad_eval = {**EVAL, "tasks": ["pycode_tiny", "gen_task"], "task_paths": [str(TASKS_DIR), str(bad)]}
    cfg = write_run_config(tmp_path / "run.yaml", prepared_data, tmp_path / "run", eval=bad_eval)
    proc = train(2, cfg, check=False, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: eval.tasks: gen_task: generation_kwargs num_beams are not supported (only until, "
                      "max_gen_toks, max_new_tokens, do_sample, temperature, top_p, top_k)"], proc.stderr[-3000:]
    assert len(re.findall(r"exitcode\s*:\s*2 ", proc.stderr)) >= 1, proc.stderr[-3000:]  # every rank: exit 2
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before any step

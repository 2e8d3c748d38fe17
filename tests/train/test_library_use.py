"""The Trainer as a library: a user's torchrun script (scripts/library_use.py) that leaves a
`with Trainer(cfg)` block and returns normally ends with exit 0 on both ranks, its final checkpoint
saved, also when a collective left in flight finishes just as the script ends (the case that
aborted a rank with "terminate called without an active exception" before Trainer.close() installed
the teardown-free exit: 4 runs of 4, against 0 of 4 with it)."""

from __future__ import annotations

from pathlib import Path

from tests.ranks import torchrun
from tests.runs import write_run_config

SCRIPTS = Path(__file__).parent / "scripts"


def run_library_script(prepared_data, tmp_path, name: str) -> None:
    run_dir = tmp_path / name
    config = write_run_config(tmp_path / f"{name}.yaml", prepared_data, run_dir,
                              train={"steps": 2, "log_interval": 1, "eval_iters": 0})
    proc = torchrun(2, [str(SCRIPTS / "library_use.py"), "--config", str(config)], timeout=300)  # exit 0 checked
    assert "terminate called" not in proc.stderr
    for rank in (0, 1):
        assert f"rank {rank}: script returned" in proc.stdout
    assert (run_dir / "checkpoints" / "step_2").is_dir()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_2"


def test_library_script_returning_normally_exits_0(prepared_data, tmp_path):
    for i in range(2):  # the natural abort is rare (0 of 22 runs here): these runs check the ending itself
        run_library_script(prepared_data, tmp_path, f"run{i}")


def test_collective_finishing_as_the_script_ends_does_not_abort(prepared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LATE_COLLECTIVE", "1")  # read by the ranks (torchrun passes the environment on)
    run_library_script(prepared_data, tmp_path, "late")

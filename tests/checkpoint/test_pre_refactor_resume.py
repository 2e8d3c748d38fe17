"""A run dir written before the checkpoint package refactor (issue 16) still resumes, exactly.

`fixtures/pre_refactor_run/` was written by the code of commit 694ae7a: 2 ranks, expert-parallel 2,
a 2-layer debug model on a tiny prepared corpus (`data/`, with its tokenizer), stopped after step 2.
`uninterrupted_losses.json` holds the losses of the same run trained to step 4 without stopping.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.checkpoint.hf_export import export, load_exported
from tests.runs import losses, train

FIXTURE = Path(__file__).parent / "fixtures" / "pre_refactor_run"


def copy_fixture(tmp_path: Path, steps: int) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "fx")
    text = (FIXTURE / "run.yaml").read_text().replace("FIXTURE", str(tmp_path / "fx"))
    config = tmp_path / "run.yaml"
    config.write_text(text.replace("steps: 2,", f"steps: {steps},"))
    return config


def test_old_run_dir_resumes_exactly(tmp_path):
    config = copy_fixture(tmp_path, steps=4)
    proc = train(2, config)
    assert f"resumed from {tmp_path / 'fx' / 'run' / 'checkpoints' / 'step_2'} at step 2" in proc.stdout
    want = json.loads((FIXTURE / "uninterrupted_losses.json").read_text())["uninterrupted_loss_total"]
    got = losses(tmp_path / "fx" / "run")
    assert [got[s] for s in (3, 4)] == [want[str(s)] for s in (3, 4)]


def test_old_checkpoint_exports(tmp_path):
    copy_fixture(tmp_path, steps=2)
    out = export(tmp_path / "fx" / "run", tmp_path / "out")
    model = load_exported(out)
    assert model.config.n_layer == 2 and model.config.vocab_size == 384

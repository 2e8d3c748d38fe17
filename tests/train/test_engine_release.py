"""A finished ZeRO-3 engine can be freed within the process (bench_gpu.py trains one engine per
attention backend on one GPU): DeepSpeed 0.19.8 keeps it alive after `del`, release_engine frees it.
The first engine trains with the optimizer implementation=auto picks on CUDA (torch's fused AdamW)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.ranks import torchrun

SCRIPTS = Path(__file__).parent / "scripts"


def test_release_engine_frees_the_module_deepspeed_keeps(tmp_path):
    out = tmp_path / "alive.json"
    torchrun(1, [str(SCRIPTS / "engine_release.py"), str(out)])
    alive = json.loads(out.read_text())
    assert alive["plain_del"], "DeepSpeed no longer leaks the engine: release_engine's workaround can go"
    assert not alive["released"], "release_engine left the ZeRO-3 module alive"
    assert alive["fused"] is True  # DeepSpeed handed optim.implementation=auto's `fused` to torch AdamW

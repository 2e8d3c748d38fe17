"""Every code block of the two original design documents (docs/design/, verbatim copies) runs against
this package with only the import lines changed.

Python blocks run in order in one namespace per document, as a reader pasting them into one session
would (later blocks use `config` and `model` from earlier ones). Sizes are scaled down only where a
block needs a GPU-sized model, each listed in SCALE_DOWN with the reason. Shell blocks map to our
commands in SHELL: `python MoE.py` -> `python -m pipeline.model`, `python train.py` ->
`python -m pipeline.train.single_process` (run here with small sizes; README's sandbox test runs them too).
"""

from __future__ import annotations

import hashlib
import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline.model import GPTOSS, count_module_parameters, create_gpt_oss_20b
from tests.conftest import REPO_ROOT
from tests.ranks import rank_env

DESIGN = REPO_ROOT / "docs" / "design"
MOE_DOC = DESIGN / "000_f665e8c191df4ce9.txt"  # "GPT-OSS: Open Source GPT with Mixture of Experts" (MoE.py)
DENSE_DOC = DESIGN / "004_41a6d109ceb631ed.txt"  # "GPT-OSS-20B Transformer Architecture" (model.py, train.py)

IMPORTS = {
    "from MoE import": "from pipeline.model import",
    "from model import": "from pipeline.model import",
    "from train import": "from pipeline.train.single_process import",
}
# (document, python block index) -> [(text, replacement)], each with why.
SCALE_DOWN = {
    # A 0.75B-parameter MoE (12 x 768, 8 experts of 4 x 768) that block 2 trains on 4 x 512 tokens:
    # ~3 TFLOP and ~7 GB per step, minutes on 2 CPU cores. Same code at 2 x 64 wide (vocab, context,
    # experts and top-k as written).
    (MOE_DOC.name, 0): [("n_layer=12", "n_layer=2"), ("n_head=12", "n_head=4"), ("n_embd=768", "n_embd=64")],
    # The 124M-parameter default model trained for 10 epochs of 32 x 128 tokens: ~3 TFLOP per step.
    # A 2 x 64 model of the same family on a byte vocabulary; the data placeholders `[...]` become
    # real token lists (one batch per epoch, so the 10 epochs are 10 steps).
    (DENSE_DOC.name, 1): [
        ("create_gpt_oss_20b()", "create_gpt_oss_20b(vocab_size=256, d_model=64, num_layers=2, num_heads=4)"),
        ("train_tokens = [...]", "train_tokens = TRAIN_TOKENS"),
        ("val_tokens = [...]", "val_tokens = VAL_TOKENS"),
    ],
}
# Not scaled: block 1 of the MoE document builds the real gpt-oss-20b and -120b (84 / 467 GB in fp32),
# so it runs as written under `torch.device("meta")`: the full architectures, no memory.
ON_META = {(MOE_DOC.name, 1)}
SHELL = {
    "pip install torch>=2.0.0": None,  # CI installs requirements.txt (torch 2.13)
    "pip install -r requirements.txt": None,
    "python MoE.py": "python -m pipeline.model --preset debug",
    "python train.py": "python -m pipeline.train.single_process --max-bytes 12000 --epochs 2 --max-new-tokens 40",
}


def code_blocks(path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, also indented ones (inside numbered lists)."""
    blocks = re.findall(r"^([ \t]*)```(\w*)\n(.*?)^\1```", path.read_text(), re.M | re.S)
    return [(lang, textwrap.dedent(code)) for _, lang, code in blocks]


def run_python_blocks(path, namespace: dict) -> list[str]:
    """Runs the document's python blocks in order; returns the code as run."""
    ran = []
    blocks = [code for lang, code in code_blocks(path) if lang == "python"]
    for i, code in enumerate(blocks):
        for old, new in IMPORTS.items():
            code = code.replace(old, new)
        for old, new in SCALE_DOWN.get((path.name, i), []):
            assert old in code, f"{path.name} block {i} no longer contains {old!r}"
            code = code.replace(old, new)
        assert "from MoE" not in code and "from model" not in code and "from train" not in code
        if (path.name, i) in ON_META:
            with torch.device("meta"):
                exec(compile(code, f"{path.name}[python block {i}]", "exec"), namespace)  # noqa: S102
        else:
            exec(compile(code, f"{path.name}[python block {i}]", "exec"), namespace)  # noqa: S102
        ran.append(code)
    return ran


def test_moe_document_blocks_run(capsys):
    torch.manual_seed(0)
    namespace: dict = {}
    run_python_blocks(MOE_DOC, namespace)
    out = capsys.readouterr().out
    model, config = namespace["model"], namespace["config"]
    assert isinstance(model, GPTOSS) and (config.vocab_size, config.n_experts, config.top_k) == (50304, 8, 2)
    assert f"Model has {model.get_num_params():,} parameters" in out
    # The pre-configured models are the released architectures (model card counts).
    counts_20b = count_module_parameters(namespace["model_20b"])
    counts_120b = count_module_parameters(namespace["model_120b"])
    assert (round(counts_20b["total"] / 1e9, 2), round(counts_20b["active"] / 1e9, 2)) == (20.91, 3.61)
    assert (round(counts_120b["total"] / 1e9, 2), round(counts_120b["active"] / 1e9, 2)) == (116.83, 5.13)
    # Training example: LM loss near ln(vocab) at init, a load-balancing aux loss, gradients everywhere.
    loss, aux_loss = namespace["loss"], namespace["aux_loss"]
    assert namespace["logits"].shape == (4, 512, 50304)
    assert abs(loss.item() - math.log(50304)) < 0.5 and 0 < aux_loss.item() < 1
    assert all(p.grad is not None for p in model.parameters())
    assert namespace["generated"].shape == (1, 110) and "Generated 110 tokens" in out


def test_dense_document_blocks_run(capsys):
    torch.manual_seed(0)
    text = list((REPO_ROOT / "README.md").read_bytes())  # real text, bytes as token ids
    namespace: dict = {"TRAIN_TOKENS": text[: 32 * 128 + 1], "VAL_TOKENS": text[-(2 * 128 + 1) :]}
    run_python_blocks(DENSE_DOC, namespace)
    out = capsys.readouterr().out
    # The default create_gpt_oss_20b() is the document's configuration dict, ~124M parameters.
    assert "Model has 124,439,808 parameters" in out
    with torch.device("meta"):
        from_dict = create_gpt_oss_20b(**namespace["config"]).config
        default = create_gpt_oss_20b().config
    assert from_dict == default
    assert (default.n_embd, default.n_layer, default.n_head, default.intermediate_size, default.dropout) == (
        768, 12, 12, 3072, 0.1)
    # Custom training: 10 epochs, perplexity each epoch, the trained model returned.
    epochs = re.findall(r"epoch (\d+)/10 \| train loss (\S+) \| val loss \S+ \| val ppl (\S+)", out)
    assert [int(e) for e, _, _ in epochs] == list(range(1, 11))
    assert float(epochs[-1][1]) < float(epochs[0][1])
    assert namespace["trained_model"].config.n_embd == 64  # block 2 rebound `model` to a fresh default one
    generated = re.search(r"Generated tokens: \[([\d, ]+)\]", out)[1].split(", ")
    assert len(generated) == 55 and generated[:5] == ["1", "2", "3", "4", "5"]


def shell_blocks() -> list[str]:
    return [line.strip() for path in (MOE_DOC, DENSE_DOC) for lang, code in code_blocks(path) if lang == "bash"
            for line in code.splitlines() if line.strip()]


def run_command(command: str) -> str:
    proc = subprocess.run(command.split(), cwd=REPO_ROOT, env=rank_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_shell_blocks_have_our_equivalents():
    commands = shell_blocks()
    assert sorted(set(commands)) == sorted(SHELL), commands
    ours = {doc: SHELL[doc] for doc in commands if SHELL[doc]}
    model_out = run_command(ours["python MoE.py"].replace("python", sys.executable, 1))
    assert "gpt-oss-20b: 20.91B parameters, 3.61B active per token" in model_out
    assert "gpt-oss-120b: 116.83B parameters, 5.13B active per token" in model_out
    forward = re.search(r"forward: logits \[2, 64, 512\], loss (\S+) \(ln\(vocab\) = (\S+)\), aux loss (\S+)",
                        model_out)
    assert abs(float(forward[1]) - float(forward[2])) < 0.5 and float(forward[3]) > 0, model_out
    assert re.search(r"backward: gradient norm \d", model_out)
    assert "generate: 30 tokens (10 prompt + 20 new)" in model_out

    train_out = run_command(ours["python train.py"].replace("python", sys.executable, 1))
    assert re.search(r"-> [\d,]+ train / [\d,]+ validation tokens", train_out)
    ppl = [float(p) for p in re.findall(r"epoch \d/2 \| train loss \S+ \| val loss \S+ \| val ppl (\S+)", train_out)]
    # Improving, and at the end well below the 256 of a uniform guess over bytes.
    assert len(ppl) == 2 and ppl[1] < ppl[0] and ppl[1] < 64, train_out
    assert re.search(r"sample:\ndef ", train_out)


@pytest.mark.parametrize("doc", [MOE_DOC, DENSE_DOC], ids=lambda p: p.name)
def test_design_documents_are_verbatim(doc):
    """The copies are the documents users have: what runs is extracted from them, never edited to pass."""
    sha256 = {
        MOE_DOC.name: "2ebd81441c52855e4fd9d49810a1f23b1135a8f15be8a5514cfe06fd799cb440",
        DENSE_DOC.name: "6053a03a9315420864f7f6feccc2254076a5f0eed9209babe0b631d51f9d7a70",
    }
    assert hashlib.sha256(doc.read_bytes()).hexdigest() == sha256[doc.name]
    assert len([lang for lang, _ in code_blocks(doc) if lang == "python"]) == 4

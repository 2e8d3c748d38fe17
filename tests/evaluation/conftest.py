"""Fixtures for downstream-evaluation tests: the shipped tiny tasks and a real HF tokenizer."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

TASKS_DIR = Path(__file__).parent / "tasks"
TINY_TASKS = ["pycode_tiny", "pycode_tiny_ppl"]
GEN_TASKS = ["pycode_gen", "pycode_gen_sampled"]  # greedy; sampled (seeded)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE `tokenizers` tokenizer (vocab 512) trained on stdlib source, saved like an HF repo."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    std = Path(sysconfig.get_paths()["stdlib"])
    docs = [p.read_text(errors="replace") for p in sorted((std / "json").glob("*.py"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    d = tmp_path_factory.mktemp("tokenizer") / "hf_bpe"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return d


def per_request(results: dict, task: str) -> list[float]:
    """Log-likelihood of every request of `task` in the harness's results (log_samples), in document
    and choice order."""
    out = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        for resp in sample["resps"]:
            value = resp[0]
            out.append(float(value[0] if isinstance(value, (list, tuple)) else value))
    return out


def downstream(path: Path) -> dict[str, float]:
    """A downstream result JSON's metrics as the trainer logs them ({"downstream/<task>/<metric>": v})."""
    from pipeline.evaluation.downstream import flat_metrics

    return flat_metrics(json.loads(path.read_text()))


def assert_same_scores(ours: dict[str, float], reference: dict[str, float], rel: float = 1e-5) -> None:
    assert ours.keys() == reference.keys() and any(k.endswith("/acc") for k in ours)
    for key, value in reference.items():
        if key.endswith(("/acc", "/acc_norm", "/exact_match", "/fingerprint")):
            # fractions of a few examples (exactly equal or a flipped choice), or the crc32 of the
            # generated strings (any change shows)
            assert ours[key] == value, key
        else:
            assert ours[key] == pytest.approx(value, rel=rel), key


def write_bad_tasks(folder: Path) -> Path:
    """Task YAMLs that must be refused at start: `gone_data` (its data file does not exist) and
    `gen_task` (a generation task asking for beam search, which we do not implement)."""
    folder.mkdir(parents=True)
    (folder / "gone.yaml").write_text("task: gone_data\ndataset_path: json\ndataset_kwargs:\n  data_files: "
                                      f"{{test: {folder}/absent.jsonl}}\noutput_type: multiple_choice\n"
                                      "test_split: test\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n")
    (folder / "gen.yaml").write_text("task: gen_task\ncustom_dataset: !function loader.load\n"
                                     "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{context}}'\n"
                                     "doc_to_target: label\ngeneration_kwargs: {until: [x], num_beams: 4}\n")
    (folder / "loader.py").write_text((TASKS_DIR / "pycode_tiny" / "loader.py").read_text().replace(
        'Path(__file__).with_name("pycode_tiny.jsonl")', f'Path("{TASKS_DIR}/pycode_tiny/pycode_tiny.jsonl")'))
    return folder

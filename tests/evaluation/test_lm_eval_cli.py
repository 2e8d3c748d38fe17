"""`python -m pipeline.evaluate` with lm-eval's spellings writes what `lm_eval run --output_path
--log_samples` writes: one export scored by our CLI and by the harness's Hugging Face backend (saved
by lm_eval's EvaluationTracker, as its CLI does), with a task YAML file in --tasks, --include_path,
--num_fewshot, --batch_size, a fractional --limit. Same folder and file names, the same top-level
keys, the same documents and prompts (task hashes), and per-request log-likelihoods to 1e-5;
lm-eval's own result-file helpers and `datasets` read our files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.loggers import EvaluationTracker
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_file_task_name, get_results_filenames, get_sample_results_filenames
from transformers import GptOssForCausalLM, PreTrainedTokenizerFast

from pipeline.data import load_tokenizer
from pipeline.errors import ConfigError
from pipeline.evaluate import main, parse_args
from pipeline.evaluation.lm_eval_output import LmEvalOutput
from pipeline.model import GPTOSS, get_preset
from tests.evaluation.conftest import TASKS_DIR

MAX_LENGTH = 24
TASK_FILE = str(TASKS_DIR / "pycode_tiny" / "pycode_tiny.yaml")


def test_lm_eval_spellings_parse_as_ours(tmp_path):
    theirs = parse_args(["--model", "m", "--tasks", f"{TASK_FILE},pycode_tiny_ppl", "--include_path", "d",
                         "--num_fewshot", "2", "--batch_size", "4", "--limit", "0.25", "--log_samples",
                         "--output_path", "out"])
    ours = parse_args(["--model", "m", "--tasks", TASK_FILE, "pycode_tiny_ppl", "--task-path", "d",
                       "--num-fewshot", "2", "--batch-size", "4", "--limit", "0.25", "--log-samples",
                       "--output-path", "out"])
    assert vars(theirs) == vars(ours)
    assert theirs.tasks == [TASK_FILE, "pycode_tiny_ppl"] and theirs.task_path == ["d"] and theirs.limit == 0.25
    assert parse_args(["--model", "m", "--include-path", "d"]).task_path == ["d"]
    assert parse_args(["--model", "m", "--limit", "8"]).limit == 8  # a count stays an int, as in lm_eval
    assert parse_args(["--model", "m", "--batch_size", "auto"]).batch_size == "auto"
    # An output path that cannot be a folder is one line before any evaluation.
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^--output_path .*/file/out: cannot create .*; give a writable folder$"):
        LmEvalOutput(str(tmp_path / "file" / "out"), "m")


def newest(folder: Path) -> dict[str, Path]:
    """{"results" | task name: file} of an lm_eval output folder, found with lm_eval's own helpers."""
    files = [str(p) for p in folder.rglob("*.json*")]
    found = {"results": Path(get_results_filenames(files)[0])}
    for f in get_sample_results_filenames(files):
        found[get_file_task_name(Path(f).stem)] = Path(f)
    return found


def test_output_path_layout_equals_lm_eval_hf_backend(hf_tokenizer_dir, tmp_path):
    export = tmp_path / "export"
    tok = load_tokenizer(hf_tokenizer_dir)
    torch.manual_seed(0)
    GPTOSS(get_preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, init_std=0.05)).save_hf(export)
    shutil.copytree(hf_tokenizer_dir, export / "tokenizer")

    assert main(["--model", str(export), "--max-length", str(MAX_LENGTH), "--tasks", f"{TASK_FILE},pycode_tiny_ppl",
                 "--include_path", str(TASKS_DIR), "--num_fewshot", "2", "--batch_size", "5", "--limit", "0.25",
                 "--output_path", str(tmp_path / "ours"), "--log_samples"]) == 0

    # What `lm_eval run --model hf --model_args pretrained=EXPORT ... --output_path --log_samples` does.
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(hf_tokenizer_dir / "tokenizer.json"), eos_token="<|endoftext|>")
    hflm = HFLM(pretrained=GptOssForCausalLM.from_pretrained(export, dtype=torch.float32).eval(), tokenizer=hf_tok,
                batch_size=3, max_length=MAX_LENGTH, device="cpu")
    tracker = EvaluationTracker(output_path=str(tmp_path / "theirs"))
    theirs = lm_eval.simple_evaluate(model=hflm, tasks=[TASK_FILE, "pycode_tiny_ppl"], num_fewshot=2, limit=0.25,
                                     log_samples=True, evaluation_tracker=tracker,
                                     task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    tracker.general_config_tracker.log_experiment_args("hf", {"pretrained": str(export)}, None, None, None)
    samples = theirs.pop("samples")
    tracker.save_results_aggregated(results=theirs, samples=samples)
    for task in theirs["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])

    ours_files, their_files = newest(tmp_path / "ours"), newest(tmp_path / "theirs")
    assert ours_files.keys() == their_files.keys() == {"results", "pycode_tiny", "pycode_tiny_ppl"}
    for key, path in ours_files.items():  # OUT/<sanitized export path>/results_<time>.json, samples_<task>_<time>
        theirs_path = their_files[key]
        assert path.parent.name == theirs_path.parent.name == str(export).replace("/", "__")
        assert path.name.split("_20")[0] == theirs_path.name.split("_20")[0], (path.name, theirs_path.name)
    ours = json.loads(ours_files["results"].read_text())
    assert ours.keys() == theirs.keys()
    assert ours["config"].keys() >= {"model", "model_args", "batch_size", "batch_sizes", "device", "use_cache", "limit",
                                     "bootstrap_iters", "gen_kwargs", "random_seed", "numpy_seed", "torch_seed",
                                     "fewshot_seed"}
    # --limit 0.25 means lm_eval's fraction (8 of 32), and the same documents and prompts were scored.
    assert ours["n-samples"] == theirs["n-samples"] == {t: {"original": 32, "effective": 8}
                                                       for t in ("pycode_tiny", "pycode_tiny_ppl")}
    assert ours["task_hashes"] == theirs["task_hashes"] and ours["n-shot"] == theirs["n-shot"]
    assert ours["results"]["pycode_tiny"]["acc,none"] == theirs["results"]["pycode_tiny"]["acc,none"]

    import datasets  # what lm_eval's hub tooling loads the sample files with

    for task in ("pycode_tiny", "pycode_tiny_ppl"):
        a = datasets.load_dataset("json", data_files=str(ours_files[task]), split="train")
        b = datasets.load_dataset("json", data_files=str(their_files[task]), split="train")
        assert a.column_names == b.column_names and a["doc_id"] == b["doc_id"]
        for x, y in zip(a["resps"], b["resps"], strict=True):  # per document: [[ll, greedy]] or [ll] per request
            for rx, ry in zip(x, y, strict=True):
                ll_ours, ll_theirs = (float(r[0][0] if isinstance(r[0], list) else r[0]) for r in (rx, ry))
                assert abs(ll_ours - ll_theirs) <= 1e-5 + 2e-7 * abs(ll_theirs), (task, rx, ry)

"""Training on Megatron preprocess_data.py output as it is (prefixes + data.tokenizer, no manifest) with real
ranks: the model takes the tokenizer's vocabulary, each shard's id range is read once and reused from its
sidecar on the next start, a resume on other data is refused, an out-of-range id is one line; export
and evaluation of such a run find the tokenizer."""

from __future__ import annotations

import json
import math

from pipeline.checkpoint.hf_export import checkpoint_model, export
from pipeline.checkpoint.run_state import RunState
from pipeline.data.megatron_sources import SIDECAR_SUFFIX
from pipeline.evaluation.downstream import data_tokenizer
from tests.data.conftest import make_docs
from tests.data.megatron_util import SHIPPED_TOKENIZER, write_megatron_prefix
from tests.runs import losses, read_metrics, train, write_run_config
from tests.train.test_run_safety import errors, run_single


def test_two_ranks_train_on_megatron_prefixes_and_a_resume_on_other_data_is_refused(tmp_path):
    corpus = tmp_path / "megatron"
    web = write_megatron_prefix(corpus / "web_text_document", make_docs(seed=3, n=120))
    held_out = write_megatron_prefix(corpus / "held_out_text_document", make_docs(seed=4, n=20))
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", web, run_dir,
                           train={"steps": 3, "save_interval": 3, "eval_interval": 3, "eval_iters": 1})
    data = (f"data.valid=[{held_out}]", f"data.tokenizer={SHIPPED_TOKENIZER}")
    proc = train(2, cfg, *data)
    assert sorted(losses(run_dir)) == [1, 2, 3] and all(math.isfinite(v) for v in losses(run_dir).values())
    assert any("eval/loss" in json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert "token-id ranges of 2 Megatron shard(s) read" in proc.stdout
    assert "vocab_size: 384" in (run_dir / "config.yaml").read_text()  # the tokenizer's vocabulary, no manifest
    [source] = RunState.read(run_dir / "checkpoints" / "step_3").data["sources"]
    assert source["tokenizer"]["vocab_size"] == 384 and source["tokenizer"]["type"] == "sentencepiece"
    assert sorted(source["shards"]) == [f"{web}.bin", f"{web}.idx"]
    sidecars = {p: (corpus / f"{p.name}{SIDECAR_SUFFIX}").stat().st_mtime_ns for p in (web, held_out)}
    assert read_metrics(run_dir)[-1]["step"] == 3
    # Export and `pipeline.evaluate --run-dir` take the tokenizer from data.tokenizer (no data dir to copy it from).
    out = export(run_dir, tmp_path / "hf")
    assert (out / "tokenizer" / "tokenizer.model").read_bytes() == SHIPPED_TOKENIZER.read_bytes()
    tokenizer, prefix_token = data_tokenizer(checkpoint_model(run_dir)[3])
    assert (tokenizer.vocab_size, prefix_token) == (384, 2)

    # The same prefix rewritten with other documents: refused; the unchanged held-out shard's range is reused.
    write_megatron_prefix(web, make_docs(seed=5, n=120))
    proc = train(2, cfg, *data, "train.steps=6", check=False)
    assert proc.returncode != 0
    assert errors(proc) == [
        f"error: {run_dir / 'checkpoints' / 'step_3'} was trained on other data: data.train[0] ({web}) holds other "
        f"shards (changed {web}.bin, {web}.idx); resume with the data it was trained on, or set "
        "train.allow_data_change=true to continue on this data"]
    assert (corpus / f"held_out_text_document{SIDECAR_SUFFIX}").stat().st_mtime_ns == sidecars[held_out]
    assert (corpus / f"web_text_document{SIDECAR_SUFFIX}").stat().st_mtime_ns != sidecars[web]


def test_an_out_of_range_token_id_is_one_line_before_training(tmp_path):
    bad = write_megatron_prefix(tmp_path / "megatron" / "web_text_document", make_docs(seed=3, n=60),
                                extra_ids=(7, 384, 9))
    cfg = write_run_config(tmp_path / "run.yaml", bad, tmp_path / "run")
    proc = run_single(cfg, f"data.tokenizer={SHIPPED_TOKENIZER}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors(proc) == [
        f"error: {bad}.bin holds token id 384, outside the vocabulary of size 384 (ids 2..384): it was made with "
        "another tokenizer than data.tokenizer, or model.vocab_size is too small; point data.tokenizer at the "
        "tokenizer given to preprocess_data.py"]
    assert not (tmp_path / "run" / "checkpoints").exists()

"""`python -m pipeline.evaluate --output_path`: results written the way `lm_eval --output_path`
writes them, by the harness's own `EvaluationTracker`, so lm-eval's result tools (and anything that
globs `results_*.json` / `samples_<task>_*.jsonl`) read ours:

    OUTPUT/<model name, sanitized>/results_<ISO time>.json            OUTPUT a folder
    OUTPUT/<model name, sanitized>/samples_<task>_<ISO time>.jsonl    with --log_samples
    OUTPUT_<ISO time>.json, samples beside it                         OUTPUT ending in .json

The model name is what --model / --run-dir named (for lm_eval the `pretrained=` model arg), so an
export evaluated by both lands in the same folder. The JSON holds lm_eval's top-level keys next to
the harness's results (environment, tokenizer and timing fields, task hashes, `model_*`), and its
`config` the keys lm_eval's has plus ours.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import ConfigError

MODEL_SOURCE = "gpt-oss-pipeline"  # lm_eval's `model_source` (its --model, e.g. "hf")


class LmEvalOutput:
    """Made before the evaluation (the tracker times it), `save` after it, on rank 0."""

    def __init__(self, output_path: str, model_name: str):
        from lm_eval.loggers import EvaluationTracker

        self.output_path = Path(output_path)
        self.model_name = model_name
        folder = self.output_path.parent if self.output_path.suffix == ".json" else self.output_path
        try:  # now, not after the evaluation: the tracker only logs a warning when it cannot write
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--output_path {output_path}: cannot create {folder} ({e.strerror}); "
                              "give a writable folder") from None
        self.start_date = time.time()
        self.tracker = EvaluationTracker(output_path=str(self.output_path))
        self.tracker.general_config_tracker.log_experiment_args(
            model_source=MODEL_SOURCE, model_args={"pretrained": model_name}, system_instruction=None,
            chat_template=None, fewshot_as_multiturn=None)

    def save(self, results: dict, tokenizer: Tokenizer, device: str) -> Path:
        """Write `results` (the evaluator's; its samples, if any, go to the per-task files) and
        return the results file."""
        from lm_eval.loggers.utils import add_env_info, get_git_commit_hash

        samples = results.pop("samples", None)
        # Ours (max_length, tokenizer, ...) with lm_eval's run config keys: `model` is the backend (its
        # --model), the name is in `model_args` as lm_eval's `pretrained=`.
        results["config"] = {**results["config"], "model": MODEL_SOURCE, "model_args": {"pretrained": self.model_name},
                             "batch_sizes": [], "device": device, "use_cache": None, "gen_kwargs": None}
        results["git_hash"] = get_git_commit_hash()
        results["date"] = self.start_date
        add_env_info(results)
        eos = [tokenizer.decode([tokenizer.eos_id]), str(tokenizer.eos_id)]
        bos = [None if tokenizer.bos_id is None else tokenizer.decode([tokenizer.bos_id]), str(tokenizer.bos_id)]
        results.update({"tokenizer_pad_token": eos,  # requests are padded with EOS (as HF backends without a pad)
                        "tokenizer_eos_token": eos, "tokenizer_bos_token": bos, "eot_token_id": tokenizer.eos_id,
                        "max_length": results["config"]["max_length"]})
        self.tracker.save_results_aggregated(results=results, samples=samples)
        written = self._results_file()
        if not written.is_file():
            raise ConfigError(f"--output_path {self.output_path}: could not write {written}; check the folder is "
                              "writable and has space")
        for task in results["configs"] if samples else ():
            self.tracker.save_results_samples(task_name=task, samples=samples[task])
        return written

    def _results_file(self) -> Path:
        """Where the tracker's save_results_aggregated wrote (its naming, lm_eval 0.4.13)."""
        date_id = self.tracker.date_id
        if self.output_path.suffix == ".json":
            return self.output_path.with_name(f"{self.output_path.stem}_{date_id}.json")
        return self.output_path / self.tracker.general_config_tracker.model_name_sanitized / f"results_{date_id}.json"

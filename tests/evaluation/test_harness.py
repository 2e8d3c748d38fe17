"""Our lm-eval adapter against the harness's own Hugging Face backend (HFLM) on the same weights:
per-request log-likelihoods to 1e-5 in fp32 and identical task metrics, with few-shot prompts
longer than the context (left truncation) and rolling windows (perplexity task); generated strings
identical under greedy decoding (batched, left-padded, left-truncated contexts, stop strings)."""

from __future__ import annotations

import re

import lm_eval
import pytest
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import GptOssForCausalLM, PreTrainedTokenizerFast

from pipeline.data import load_tokenizer
from pipeline.errors import ConfigError
from pipeline.evaluation.config import EvalConfig
from pipeline.evaluation.downstream import DownstreamEvaluator
from pipeline.evaluation.generation import Decoder
from pipeline.model import GPTOSS, get_preset
from pipeline.train.config import load_run_config
from tests.conftest import REPO_ROOT
from tests.evaluation.conftest import GEN_TASKS, TASKS_DIR, TINY_TASKS, per_request, write_bad_tasks

MAX_LENGTH = 24  # shorter than a 2-shot prompt: exercises the left truncation and rolling windows


def test_adapter_equals_hf_backend(hf_tokenizer_dir, tmp_path):
    tok = load_tokenizer(hf_tokenizer_dir)
    torch.manual_seed(0)
    model = GPTOSS(get_preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, init_std=0.05)).eval()
    model.save_hf(tmp_path / "hf")

    cfg = EvalConfig(tasks=TINY_TASKS, task_paths=[str(TASKS_DIR)], num_fewshot=2, batch_size=5)
    ours = DownstreamEvaluator(cfg, tok, tok.eos_id, MAX_LENGTH, log_samples=True).evaluate(
        lambda ids: model(ids)[0], "cpu")

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(hf_tokenizer_dir / "tokenizer.json"), eos_token="<|endoftext|>")
    hf_model = GptOssForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hflm = HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=3, max_length=MAX_LENGTH,
                prefix_token_id=tok.eos_id, device="cpu")
    theirs = lm_eval.simple_evaluate(model=hflm, tasks=TINY_TASKS, num_fewshot=2, bootstrap_iters=0,
                                     task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))

    worst = 0.0
    for task in TINY_TASKS:
        a, b = per_request(ours, task), per_request(theirs, task)
        assert len(a) == len(b) == (32 * 4 if task == "pycode_tiny" else 32)
        diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
        print(f"{task}: max |log-likelihood difference| {diff:.2e} (largest |value| {max(map(abs, b)):.1f})")
        worst = max(worst, diff)
        # 1e-5 plus fp32 rounding of the value: both sides sum per-token log-probs in fp32, and a
        # document's sum reaches -189, where one fp32 step is 1.5e-5 (2e-7 relative = ~2 steps).
        for x, y in zip(a, b, strict=True):
            assert abs(x - y) <= 1e-5 + 2e-7 * abs(y), (task, x, y)
        for key, value in theirs["results"][task].items():
            if isinstance(value, float):
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-6, abs=0), (task, key)
    print(f"max |log-likelihood difference| = {worst:.2e}")
    # The prompts really were truncated: a 2-shot prompt alone is longer than MAX_LENGTH tokens.
    prompt = theirs["samples"]["pycode_tiny"][0]["arguments"][0][0]
    assert len(tok.encode(prompt)) > MAX_LENGTH
    assert ours["results"]["pycode_tiny"]["acc,none"] == theirs["results"]["pycode_tiny"]["acc,none"]


def generated(results: dict, task: str) -> list[str]:
    return [s["resps"][0][0] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_generation_equals_hf_backend(hf_tokenizer_dir, tmp_path):
    tok = load_tokenizer(hf_tokenizer_dir)
    torch.manual_seed(0)
    model = GPTOSS(get_preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, init_std=0.05)).eval()
    model.save_hf(tmp_path / "hf")
    max_length = 20  # minus max_gen_toks 16: contexts are left-truncated to their last 4 tokens

    def ours(tasks, batch_size):
        cfg = EvalConfig(tasks=tasks, task_paths=[str(TASKS_DIR)], batch_size=batch_size)
        return DownstreamEvaluator(cfg, tok, tok.eos_id, max_length, log_samples=True).evaluate(
            lambda ids: model(ids)[0], "cpu", decoder=Decoder(model))

    mine = ours(GEN_TASKS, batch_size=3)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(hf_tokenizer_dir / "tokenizer.json"), eos_token="<|endoftext|>")
    hf_model = GptOssForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hflm = HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=3, max_length=max_length,
                prefix_token_id=tok.eos_id, device="cpu")
    theirs = lm_eval.simple_evaluate(model=hflm, tasks=["pycode_gen"], bootstrap_iters=0,
                                     task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    greedy = generated(mine, "pycode_gen")
    print("greedy:", greedy)
    assert greedy == generated(theirs, "pycode_gen")
    assert len(greedy) == 8 and len(set(greedy)) == 8
    assert min(map(len, greedy)) <= 2  # a row that stopped at "\n" early (the others ran 16 tokens)
    assert mine["results"]["pycode_gen"]["exact_match,none"] == theirs["results"]["pycode_gen"]["exact_match,none"]
    # Sampling (temperature 0.8, top_p 0.9) is seeded per request: the same samples at another
    # batch size (other batches, other padding), and not the greedy strings.
    sampled = generated(mine, "pycode_gen_sampled")
    assert sampled == generated(ours(["pycode_gen_sampled"], batch_size=8), "pycode_gen_sampled")
    assert sum(a != b[:len(a)] for a, b in zip(sampled, greedy, strict=True)) >= 4


def test_bad_tasks_are_one_line_errors(tmp_path):
    # The `eval` section is typed and validated like every other section.
    for override, message in (("eval.limit=0", "eval.limit (0) must be >= 1"),
                              ("eval.tasks=hellaswag", "config key eval.tasks = 'hellaswag' must be a list"),
                              ("eval.limit=1.5", "eval.limit (1.5) must be >= 1"),
                              ("eval.num_fewshot=two", "config key eval.num_fewshot = 'two' is not a valid int")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_run_config(None, ["data.train=[d]", "eval.tasks=[pycode_tiny]", override])
    # lm-eval's meaning of limit: a count, or below 1.0 a fraction of each task's examples.
    assert load_run_config(None, ["data.train=[d]", "eval.limit=0.25"]).eval.limit == 0.25
    assert load_run_config(None, ["data.train=[d]", "eval.limit=8"]).eval.limit == 8
    # In-loop evaluation runs with sequence parallelism (tests/distributed/test_sequence_parallel.py):
    # the shipped quickstart config with SP 2 is accepted as is.
    quick = load_run_config(REPO_ROOT / "launch" / "configs" / "quickstart.yaml", ["parallel.sequence_parallel_size=2"])
    assert quick.eval.tasks == ["pycode_tiny"] and quick.parallel.sequence_parallel_size == 2
    assert load_run_config(None, ["data.train=[d]", "eval.downstream_interval=1e3"]).eval.downstream_interval == 1000
    tok_dir = None  # the checks run before any model or tokenizer is used
    cases = {
        "unknown task(s) no_such_task": EvalConfig(tasks=["no_such_task"], task_paths=[str(TASKS_DIR)]),
        "eval.task_paths: /nope does not exist": EvalConfig(tasks=["pycode_tiny"], task_paths=["/nope"]),
        "eval.tasks: task file /nope/t.yaml does not exist": EvalConfig(tasks=["/nope/t.yaml"]),
    }
    missing = write_bad_tasks(tmp_path / "tasks")
    cases["task gone_data could not load its data"] = EvalConfig(tasks=["gone_data"], task_paths=[str(missing)])
    cases["gen_task: generation_kwargs num_beams are not supported"] = EvalConfig(
        tasks=["gen_task"], task_paths=[str(missing)])
    cases["pycode_gen: max_gen_toks (16) must be less than the context length (16)"] = EvalConfig(
        tasks=["pycode_gen"], task_paths=[str(TASKS_DIR)])
    for expected, cfg in cases.items():
        with pytest.raises(ConfigError) as e:
            DownstreamEvaluator(cfg, tok_dir, 0, 16)
        assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)

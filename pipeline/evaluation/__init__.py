"""Downstream evaluation with lm-evaluation-harness (the optional `eval` extra).

config.py: EvalConfig, the run config's `eval` section (and `python -m pipeline.evaluate`'s flags).
harness.py: our model and tokenizer as an lm_eval language model, requests split over ranks.
generation.py: generate_until requests: batched KV-cached decoding, dealt over ranks in step.
downstream.py: tasks checked at start, run in the training loop or on a checkpoint, metrics logged.
lm_eval_output.py: `python -m pipeline.evaluate --output_path`, written in lm-eval's own layout.
Takes a model (a forward), a tokenizer and a RankView; imports nothing of pipeline.train.
lm_eval itself is imported only when `eval.tasks` is set or `python -m pipeline.evaluate` runs.
"""

"""Downstream evaluation with lm-evaluation-harness (the optional `eval` extra).

harness.py: our model and tokenizer as an lm_eval language model, requests split over ranks.
downstream.py: tasks checked at start, run in the training loop or on a checkpoint, metrics logged.
Nothing here is imported unless `eval.tasks` is set or `python -m pipeline.evaluate` runs.
"""

"""Training: run config, DeepSpeed engine, expert parallelism, checkpoints, metrics."""

"""Checkpoints: the on-disk format (format.py), ZeRO state access (zero_state.py), which checkpoint
to save, keep and resume (manager.py), and starting a run from a weights folder (init_from.py)."""

"""Data side of the pipeline: corpus -> tokenizer -> .bin/.idx shards -> training samples.

Public API (used by the trainer and the text generator)::

    load_tokenizer(path) -> Tokenizer
    load_manifest(data_dir) -> Manifest
    check_vocab_compatible(data_dirs, model_vocab_size) -> None
    build_dataset(sources, split, seq_len, seed, cache=None, order=ORDER_SCHEME) -> dataset
    MicroBatchIterator(dataset, micro_batch_size, dp_rank, dp_world, consumed_samples=0, prefetch=0)
    MMapIndexedDataset(prefix)
"""

from pipeline.data.dataset import build_dataset, source_paths
from pipeline.data.indexed import MMapIndexedDataset
from pipeline.data.manifest import Manifest, check_vocab_compatible, load_manifest
from pipeline.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "source_paths",
    "load_tokenizer",
    "load_manifest",
    "check_vocab_compatible",
    "build_dataset",
    "MicroBatchIterator",
    "MMapIndexedDataset",
    "Manifest",
    "Tokenizer",
]


def __getattr__(name):
    # torch is imported only by whoever asks for the iterator: `python -m pipeline.prepare`
    # and its worker processes never need it.
    if name == "MicroBatchIterator":
        from pipeline.data.sampler import MicroBatchIterator

        return MicroBatchIterator
    raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")

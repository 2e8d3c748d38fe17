"""Data of the `pycode_gen` tasks, read from the JSONL file beside this module (whatever the working
directory): 8 test items, no few-shot pool. Scored by `process_results`."""

import json
import zlib
from pathlib import Path

DATA = Path(__file__).with_name("pycode_gen.jsonl")


def load(**_metadata):
    import datasets

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc, results):
    """exact_match of the stripped generation, and a fingerprint of the generated string (crc32 in
    [0, 1)) whose mean changes when any generation changes: tests compare generations by the metrics
    that training runs log."""
    text = results[0]
    return {"exact_match": float(text.strip() == doc["target"]), "fingerprint": zlib.crc32(text.encode()) / 2**32}

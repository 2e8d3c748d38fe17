"""Data of the `pycode_gen` tasks, read from the JSONL file beside this module (whatever the working
directory): 8 test items, no few-shot pool."""

import json
from pathlib import Path

DATA = Path(__file__).with_name("pycode_gen.jsonl")


def load(**_metadata):
    import datasets

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

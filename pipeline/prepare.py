"""`python -m pipeline.prepare`: corpus -> tokenizer + .bin/.idx shards + manifest.json.

Thin entry point; the pipeline lives in `pipeline.data` (cli.py parses, prepare.py runs).
"""

import sys

from pipeline.data.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""The earlier name of pipeline/train/single_process.py, kept because earlier READMEs and scripts
import `pipeline.train.simple` and run `python -m pipeline.train.simple`: the same module object
(so patching either name patches both), and the same command."""

import sys

from pipeline.train import single_process

if __name__ == "__main__":
    sys.exit(single_process.main())
else:
    sys.modules[__name__] = single_process

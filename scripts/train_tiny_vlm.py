#!/usr/bin/env python
"""Train the tiny-shapes LLaVA on CPU (same as ``python -m feather_export.quality.train``).

The committed checkpoint feather_export/assets/tiny-shapes was made with the defaults
(``--snapshots`` only also writes the weights at each evaluation into the partial directory):

    python scripts/train_tiny_vlm.py --out feather_export/assets/tiny-shapes --snapshots

(seed 0, 2 torch threads, 1000 vision-probe steps then 3500 steps of 32 five-turn conversations,
keeping the weights of the best validation evaluation; about 45 minutes on 2 CPU cores). Its
training.json records the options, the wall time and the validation accuracy at every evaluation.
The same options, seed, thread count and torch version give the same weights, byte for byte
(checked on short runs by tests/test_train_tiny.py; the full run was not repeated).
"""
import sys

from feather_export.quality.train import main

if __name__ == "__main__":
    sys.exit(main())

"""Test set-up: import the repository's packages and scripts; keep torch to one thread (CI has 2
cores and the subprocess tests run two processes)."""

import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
torch.set_num_threads(1)

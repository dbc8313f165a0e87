"""Test set-up: keep torch to one thread (CI has 2 cores and the subprocess tests run two
processes). The packages come from the installed repository (``pip install -e .[train,test]``,
which requirements.txt does); nothing is put on sys.path by hand."""

import torch

torch.set_num_threads(1)

"""Shared test settings: keep XLA and PyTorch inside the CI machine's 2 cores."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

"""Test set-up: Triton's interpreter on machines without a GPU (it must be set before
any Triton kernel is defined), and the devices tests run on."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

"""Test-run set-up shared by every test file.

* Without a CUDA device, TRITON_INTERPRET=1 is set for the whole run before any Triton kernel is
  defined (armnet_ops imports its Triton modules lazily), so the Triton kernels run on CPU tensors
  in the interpreter. With a device they run compiled, on CUDA tensors.
* `needs_cuda` tests are skipped, with a reason, when no CUDA device is visible.
"""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

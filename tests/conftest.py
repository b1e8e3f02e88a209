import os
import tempfile

import pytest

# Triton reads this when kernels are decorated, so it must be set before any kernel module is imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# self-check verdicts (kernels/self_check.py) go to a fresh folder: tests never read or write ~/.cache
os.environ.setdefault("ARCHLAB_CACHE_DIR", tempfile.mkdtemp(prefix="archlab-test-cache-"))


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


HAS_CUDA = torch.cuda.is_available()


def devices():
    """cpu always; cuda where a GPU exists (and then pyfast must have CUDA kernels)."""
    out = ["cpu"]
    out.append(
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),
        )
    )
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

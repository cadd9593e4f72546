import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
    yield

import pytest
import torch

import bpt  # noqa: F401  (loads the op library: torch.ops.bpt.*)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

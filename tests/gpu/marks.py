"""The GPU tier's skip conditions, one place: each module sets
`pytestmark = [GPU, NEEDS_CUDA, ...]` with what it needs."""

import importlib.util

import pytest
import torch

GPU = pytest.mark.gpu
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NEEDS_TE = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="needs transformer_engine (pip install 'trb-megatron[te]')")
NEEDS_SGLANG = pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                                  reason="needs sglang 0.5.23 (pip install 'trb-megatron[sglang]')")

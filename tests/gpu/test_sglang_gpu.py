"""What only a GPU can show about the SGLang backend (everything else runs on CPU in tests/sglang):
the composite model under decode CUDA graphs with the default attention backend (fa3), where
each replay must read the per-request budgets from the static per-row buffers, and the colocated
memory saver (release/resume of the KV cache and CUDA graphs around a rollout).

Run (a CUDA machine with the sglang extra and this package installed, so SGLang finds the
plugin entry point): pip install -e '.[sglang]' && python -m pytest tests/gpu/test_sglang_gpu.py
"""

import pytest
import torch

from tests.gpu.marks import GPU, NEEDS_CUDA, NEEDS_SGLANG
from tests.sglang.conftest import LAYOUT, models, passthrough, sample  # noqa: F401 (fixture)
from trb_megatron.rollout.sglang_engine import MEMORY_TAGS, engine_kwargs
from trb_megatron.sglang_plugin.engine_shutdown import shutdown_engine

pytestmark = [GPU, NEEDS_CUDA, NEEDS_SGLANG]


def test_cuda_graph_decode_reads_each_requests_budget(models):
    from trb_megatron.config import SGLangConfig
    from trb_megatron.sglang_plugin.version import require_sglang

    sglang = require_sglang()
    kwargs = engine_kwargs(SGLangConfig(max_running_requests=16), student_dir=models / "student",
                           teacher_dir=models / "teacher", vocab=LAYOUT, tp_size=1, seed=0)
    assert kwargs["attention_backend"] == "fa3" and kwargs["enable_memory_saver"]
    engine = sglang.Engine(**kwargs)
    try:
        for eps in (1e-3, 1e-2):
            batch = sample(engine, eps)
            assert (batch.stat("kl_to_student")[batch.response_mask] <= eps + 1e-5).all()
        mixed = engine.generate(
            input_ids=[[2, 17, 33, 5]] * 2,
            sampling_params=[{"max_new_tokens": 8, "custom_params": {"trb_eps": eps}}
                             for eps in (0.0, 1e9)],
            return_logprob=True, custom_logit_processor=[passthrough()] * 2)
        assert set(mixed[0]["meta_info"]["trb_beta"]) == {0.0}
        assert set(mixed[1]["meta_info"]["trb_beta"]) == {1.0}
        assert engine.release_memory_occupation(tags=MEMORY_TAGS) is None
        assert engine.resume_memory_occupation(tags=MEMORY_TAGS) is None
        after = sample(engine, 1e-2)
        assert torch.isfinite(after.behaviour_logprobs[after.response_mask]).all()
    finally:
        shutdown_engine(engine)

"""On a GPU with Transformer Engine: the `fp8` config section, applied through the backend
profile, gives a tiny TE model whose TransformerConfig has the FP8 fields, that decodes TRB
rollouts (one token per row: FP8 GEMMs need padded rows) and takes a DistillStep (forward and
backward in FP8, odd sequence lengths) with finite results close to the bf16 model.

Run (on a GPU machine with transformer_engine): python -m pytest tests/gpu/test_fp8_gpu.py
"""

import math

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.gpu.marks import GPU, NEEDS_CUDA, NEEDS_TE
from tests.hf_models import make_hf_model

pytestmark = [GPU, NEEDS_CUDA, NEEDS_TE]


def _body(rank, world, root):
    from trb_megatron.checkpoint.convert import hf_to_megatron, load_megatron, parallel_layout
    from trb_megatron.config import OptimConfig, from_dict
    from trb_megatron.methods import BehaviourStep, ReverseKL
    from trb_megatron.models.forward import full_logits
    from trb_megatron.models.pairing import shared_vocab_layout
    from trb_megatron.parallel import detect_profile
    from trb_megatron.parallel.profile import FP8Settings
    from trb_megatron.rollout.megatron_engine import MegatronRolloutEngine
    from trb_megatron.training.distill_step import DistillStep
    from trb_megatron.training.optim import wrap_and_optimize

    for role in ("student", "teacher"):
        hf_to_megatron(f"{root}/hf-{role}", f"{root}/{role}", progress=False)
    settings = from_dict(FP8Settings, {"enabled": True, "recipe": "tensorwise",
                                       "amax_history_len": 16, "bf16_layers_at_start": 1,
                                       "bf16_layers_at_end": 1})
    profile = detect_profile().with_fp8(settings)
    vocab = shared_vocab_layout(f"{root}/student/hf", f"{root}/teacher/hf")
    with parallel_layout(1, 1) as groups:
        arch, student = load_megatron(f"{root}/student", groups, trainable=True,
                                      params_dtype=torch.bfloat16, profile=profile)
        _, reference = load_megatron(f"{root}/student", groups, params_dtype=torch.bfloat16)
        _, teacher = load_megatron(f"{root}/teacher", groups, params_dtype=torch.bfloat16)
        config = student.config
        assert (config.fp8, config.fp8_recipe, config.fp8_amax_history_len) == \
            ("hybrid", "tensorwise", 16)
        assert config.first_last_layers_bf16 and config.num_layers_at_start_in_bf16 == 1
        assert teacher.config.fp8 is None  # fp8.teacher is off by default

        tokens = torch.randint(0, arch.vocab_size, (3, 13), device="cuda")  # 39 rows
        got = full_logits(student, tokens, groups, arch.vocab_size)
        want = full_logits(reference, tokens, groups, arch.vocab_size)  # the same, in bf16
        assert torch.isfinite(got).all()
        assert (got - want).abs().mean() < 0.1 * want.abs().mean()

        ddp, optimizer = wrap_and_optimize(student, OptimConfig(lr=1e-4, warmup_steps=0), groups)
        engine = MegatronRolloutEngine(ddp.module, teacher, groups, vocab=vocab,
                                       pad_id=vocab.stop_ids[0])
        prompts = [[5, 9, 14], [7, 3], [11, 12, 13, 4, 6]]
        batch = engine.generate(prompts, samples_per_prompt=1, max_new_tokens=6,
                                behaviour=BehaviourStep(eps=0.05), seed=0)
        mask = batch.response_mask
        assert mask.any() and torch.isfinite(batch.behaviour_logprobs[mask]).all()
        assert (batch.stat("kl_to_student")[mask] <= 0.05 + 1e-6).all()
        step = DistillStep(ddp, teacher, optimizer, groups, vocab,
                           objective=ReverseKL(estimator="full"), micro_batch_size=2)
        result = step(batch)
        assert math.isfinite(result.loss) and result.loss >= 0
        assert math.isfinite(result.grad_norm) and result.grad_norm > 0


def test_fp8_student_decodes_and_trains(tmp_path):
    make_hf_model(tmp_path / "hf-student", "qwen3", layers=4, seed=0)
    make_hf_model(tmp_path / "hf-teacher", "qwen3", layers=4, seed=1)
    run_distributed(_body, 1, str(tmp_path))

"""The SGLang tier: real SGLang 0.5.23 engines (CPU through trb_megatron.sglang_plugin.cpu_backend,
or a GPU) running the TRB composite model. An engine start costs 20-60 s on 2 cores, so each
module starts few engines and puts several checks on each.

Shared here: a tiny random Qwen3 student and teacher with one tokenizer (tests/hf_models.py) and
the helpers that start engines and sample through the product's request/assembly code.
"""

import pytest

from tests.hf_models import make_hf_model
from trb_megatron.config import SGLangConfig
from trb_megatron.rollout.request import RolloutRequest
from trb_megatron.rollout.sglang_engine import check_plugin, engine_kwargs
from trb_megatron.rollout.sglang_requests import assemble_batch, prompt_ids, sampling_params
from trb_megatron.methods import BehaviourStep, VocabLayout

LAYOUT = VocabLayout(size=120, stop_ids=(1,))
PROMPTS = ([2, 17, 33, 5], [2, 9, 44])
SETTINGS = SGLangConfig(max_running_requests=64, max_total_tokens=8192)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang_models")
    make_hf_model(root / "student", "qwen3", seed=0)
    make_hf_model(root / "teacher", "qwen3", seed=1)
    return root


def start_engine(root, *, teacher: bool, tp_size: int = 1, plain: bool = False):
    """An offline engine on the composite model (teacher or not); plain: SGLang's stock Qwen3
    model class, no TRB override (what a user would start for the student alone)."""
    from trb_megatron.sglang_plugin.version import require_sglang

    sglang = require_sglang()
    kwargs = engine_kwargs(SETTINGS, student_dir=root / "student",
                           teacher_dir=root / "teacher" if teacher else None, vocab=LAYOUT,
                           tp_size=tp_size, seed=0)
    if plain:
        kwargs["json_model_override_args"] = "{}"
    else:
        check_plugin()
    return sglang.Engine(**kwargs)


def passthrough() -> str:
    from trb_megatron.sglang_plugin.passthrough import PassThrough

    return PassThrough().to_str()


def raw_outputs(engine, request: RolloutRequest):
    return engine.generate(input_ids=prompt_ids(request),
                           sampling_params=sampling_params(request, LAYOUT), return_logprob=True,
                           custom_logit_processor=[passthrough()] * request.rows)


def rollout_request(eps, *, samples=4, seed=5, max_new=12, prefix_max=0) -> RolloutRequest:
    return RolloutRequest.build(PROMPTS, samples_per_prompt=samples, max_new_tokens=max_new,
                                behaviour=BehaviourStep(eps=eps, prefix_max=prefix_max),
                                seed=seed, prompt_offset=0, vocab_size=LAYOUT.size,
                                max_positions=64)


def sample(engine, eps, **kwargs):
    """A RolloutBatch from `engine` through the product's request and assembly code."""
    request = rollout_request(eps, **kwargs)
    return assemble_batch(request, raw_outputs(engine, request), vocab=LAYOUT, pad_id=0)

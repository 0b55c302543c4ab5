"""The compiled TRB passes the GPU profile selects (BackendProfile.compile_trb) on CUDA equal the
eager ones: the beta solve and the `full` reverse-KL loss with its gradient.

Run (on a GPU machine): .venv/bin/python -m pytest tests/gpu/test_trb_gpu.py -q
"""

import pytest
import torch

from tests.gpu.marks import GPU, NEEDS_CUDA
from trb_megatron.parallel import detect_profile
from trb_megatron.methods import VocabLayout, per_token_reverse_kl, solve_beta

pytestmark = [GPU, NEEDS_CUDA]


def _logits(rows=64, vocab=32_000):
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(rows, vocab, device="cuda", generator=g) * 3
    t = s + torch.randn(rows, vocab, device="cuda", generator=g) * 2
    return s, t


def test_gpu_profile_compiles_trb():
    assert detect_profile().compile_trb


@pytest.mark.parametrize("eps", [1e-3, 1e-2, 0.1])
def test_compiled_solve_equals_eager(eps):
    s, t = _logits()
    vocab = VocabLayout(size=31_990, stop_ids=(5, 7))
    eager = solve_beta(s, t, eps, vocab=vocab)
    fused = solve_beta(s, t, eps, vocab=vocab, fused=True)
    torch.testing.assert_close(fused.beta, eager.beta, atol=1e-6, rtol=0)
    assert bool((fused.kl_to_student <= eps + 1e-6).all())


def test_compiled_full_loss_equals_eager():
    s, t = _logits()
    grads = []
    for fused in (False, True):
        x = s.detach().clone().requires_grad_(True)
        value = per_token_reverse_kl(x, t, vocab=31_990, fused=fused)
        value.sum().backward()
        grads.append((value.detach(), x.grad))
    assert grads[0][1].abs().max() > 0
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-6, rtol=1e-4)

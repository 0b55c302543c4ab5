"""Logit families shared by the unit and distributed TRB tests (deterministic by seed)."""

import torch


def logit_cases(n=6, v=97, seed=0):
    """name -> (student, teacher) float32 [n, v] logits, random and adversarial."""
    g = torch.Generator().manual_seed(seed)

    def randn(scale=1.0):
        return torch.randn(n, v, generator=g) * scale

    peaked_s, peaked_t = randn(2.0), randn(2.0)
    peaked_s[:, 3] += 25.0
    peaked_t[:, 5] += 25.0
    disjoint_s = torch.full((n, v), -40.0)
    disjoint_t = torch.full((n, v), -40.0)
    disjoint_s[:, : v // 2] = randn()[:, : v // 2]
    disjoint_t[:, v // 2:] = randn()[:, v // 2:]
    same = randn(3.0)
    near = randn(2.0)
    return {
        "random": (randn(3.0), randn(3.0)),
        "peaked": (peaked_s, peaked_t),
        "disjoint": (disjoint_s, disjoint_t),
        "identical": (same, same.clone()),
        "near": (near, near + 0.05 * randn()),
    }

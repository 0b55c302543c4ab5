"""Dense float64 references for the TRB math, written independently of trb_megatron.methods:
plain log_softmax over the full vocabulary and a fine bisection for beta."""

import torch


def log_softmax64(x):
    return torch.log_softmax(x.double(), dim=-1)


def blend_log_probs(s, t, beta):
    beta = torch.as_tensor(beta, dtype=torch.float64).expand(s.shape[0]).unsqueeze(1)
    return torch.log_softmax((1 - beta) * log_softmax64(s) + beta * log_softmax64(t), dim=-1)


def kl(log_a, log_b):
    """KL(a || b) per row, 0 * log 0 = 0."""
    a = log_a.exp()
    terms = torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))
    return terms.sum(-1)


def kl_to_student(s, t, beta):
    return kl(blend_log_probs(s, t, beta), log_softmax64(s))


def reverse_kl(s, t):
    return kl(log_softmax64(s), log_softmax64(t))


def bisect_beta(s, t, eps, iters=100):
    """Largest beta in [0, 1] with KL(mu_beta || pi_S) <= eps, by bisection on each row."""
    n = s.shape[0]
    eps = torch.as_tensor(eps, dtype=torch.float64).expand(n)
    lo, hi = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    inside = kl_to_student(s, t, hi) <= eps
    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = kl_to_student(s, t, mid) <= eps
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return torch.where(inside, hi, torch.where(eps == 0, torch.zeros_like(lo), lo))


def merge_stops(x, stop_ids):
    """Dense EOS canonicalisation: mass of stop_ids into column stop_ids[0], others removed."""
    x = x.double().clone()
    x[:, stop_ids[0]] = torch.logsumexp(x[:, list(stop_ids)], dim=1)
    keep = [v for v in range(x.shape[1]) if v not in stop_ids[1:]]
    return x[:, keep], keep

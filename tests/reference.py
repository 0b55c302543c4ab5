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


def tropd(s, t, tokens, from_teacher, uniforms, *, outlier, k, tau, weight, stop_ids=None):
    """Dense float64 TrOPD per-token loss (autograd gives the policy gradient), the method page's
    formulas written out directly on the full vocabulary: r = log pi_T(x) - log pi_S(x);
    M = 1[u < min(pi_T(x) / pi_S(x), 1)] on student tokens; M: -r (gradient -r d log pi_S(x));
    not M: fkl = sum over the teacher's top-k of pi_T (log pi_T - log pi_S) | clip: K1 with r
    clipped at -tau | mask: K1, 0 when |r| > tau; teacher tokens: weight (log pi_T - log pi_S).
    Returns (loss [N] differentiable in s, trust mask [N] bool)."""
    if stop_ids:
        s, _ = merge_stops(s, stop_ids)
        t, keep = merge_stops(t, stop_ids)
        tokens = torch.tensor([keep.index(int(x)) for x in tokens])
    log_s, log_t = torch.log_softmax(s.double(), 1), log_softmax64(t)
    rows = torch.arange(s.shape[0])
    lp_s, lp_t = log_s[rows, tokens], log_t[rows, tokens]
    r = (lp_t - lp_s).detach()
    trust = ~from_teacher & (uniforms < torch.clamp(r.exp(), max=1.0))

    def k1(advantage):  # value `advantage`, gradient advantage * d log pi_S(x)
        return advantage + advantage * (lp_s - lp_s.detach())

    if outlier == "fkl":
        ids = log_t.topk(k, 1).indices
        p_t = log_t.gather(1, ids).exp()
        out = (p_t * (log_t.gather(1, ids) - log_s.gather(1, ids))).sum(1)
    elif outlier == "clip":
        out = k1(-torch.maximum(r, torch.full_like(r, -tau)))
    else:
        out = torch.where(r.abs() > tau, torch.zeros_like(r), k1(-r))
    loss = torch.where(trust, k1(-r), torch.where(from_teacher, weight * (lp_t - lp_s), out))
    return loss, trust


def topk_forward_kl(s, t, k):
    """Dense forward KL over the teacher's top-k:
    sum_{v in topk_T} pi_T(v) (log pi_T(v) - log pi_S(v))."""
    log_s, log_t = torch.log_softmax(s.double(), 1), log_softmax64(t)
    ids = log_t.topk(k, 1).indices
    p_t = log_t.gather(1, ids).exp()
    return (p_t * (log_t.gather(1, ids) - log_s.gather(1, ids))).sum(1)

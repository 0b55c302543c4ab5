"""The TrOPD objective (Trust Region On-Policy Distillation, arXiv 2606.01249; docs/method.md).

Legend: N rows (token positions), V local vocabulary columns. x the token at prefix h,
r(x) = log pi_T(x|h) - log pi_S(x|h) its K1 reward (detached), stops merged as everywhere.

Student-side tokens (RolloutBatch.source == SOURCE_POLICY: the student's, or TRB's blended
tokens in the trb_tropd combination):
  trust mask M ~ Bernoulli(min(pi_T(x) / pi_S(x), 1)) = 1[u < exp(min(r, 0))], u the token's
  counter-based U(0, 1) (seeds.counter_uniform keyed by (seed, step, row, position));
  M = 1: the K1 reverse KL, value -r, gradient -r d log pi_S(x);
  M = 0 (an outlier), by `outlier`:
    fkl:  forward KL over the teacher's top-k at h (token_terms.teacher_topk_forward_kl);
    clip: the K1 term with the reward clipped from below, r -> max(r, -tau);
    mask: the K1 term, dropped (0) when |r| > tau.
Teacher-prefix tokens (SOURCE_TEACHER): prefix_weight * (log pi_T(x) - log pi_S(x)), the K1
forward KL (TrOPD's beta-weighted guidance; its gradient is prefix_weight times the NLL's).
Maximised objective of the paper: J = -1[x~S](1-M) FKL_topk - 1[x~S] M log(pi_S/pi_T)(x)
- beta 1[x~T] log(pi_T/pi_S)(x); the loss here is -J per token.
"""

import dataclasses
import math

import torch

from .objectives import ObjectiveTerms, TokenInputs
from .token_terms import check_tokens, reinforce, teacher_topk_forward_kl, token_log_probs
from .vocab import describe_shard, merge_stops

OUTLIERS = ("fkl", "clip", "mask")


@dataclasses.dataclass(frozen=True)
class TrOPD:
    outlier: str = "fkl"
    outlier_topk: int = 64
    outlier_tau: float = 2.0
    prefix_weight: float = 0.001
    name = "tropd"
    settings = ("outlier", "outlier_topk", "outlier_tau", "prefix_weight")
    sum_names = ("loss_trust", "loss_outlier", "loss_prefix", "policy_tokens", "trust_tokens",
                 "outlier_tokens", "reward")
    stochastic = True
    exact = False

    @classmethod
    def from_settings(cls, settings) -> "TrOPD":
        return cls(**{key: settings[key] for key in cls.settings})

    def __post_init__(self):
        if self.outlier not in OUTLIERS:
            raise ValueError(f"outlier must be one of {OUTLIERS}, got {self.outlier!r}")
        if isinstance(self.outlier_topk, bool) or not isinstance(self.outlier_topk, int) or \
                self.outlier_topk < 1:
            raise ValueError(f"outlier_topk must be an int >= 1, got {self.outlier_topk!r}")
        if not (math.isfinite(self.outlier_tau) and self.outlier_tau > 0):
            raise ValueError(f"outlier_tau must be finite and > 0, got {self.outlier_tau!r}")
        if not (math.isfinite(self.prefix_weight) and self.prefix_weight >= 0):
            raise ValueError(f"prefix_weight must be finite and >= 0, got {self.prefix_weight!r}")

    def terms(self, student_NV, teacher_NV, inputs: TokenInputs, *, group, vocab,
              fused=False) -> ObjectiveTerms:
        if inputs.uniforms is None:
            raise ValueError("the TrOPD objective draws its trust mask from inputs.uniforms "
                             "([N] U(0, 1) per token); none were given")
        shard = describe_shard(student_NV, teacher_NV, group=group, vocab=vocab)
        tokens = check_tokens(inputs.tokens, shard, student_NV.device)
        student = merge_stops(student_NV, shard)
        teacher = merge_stops(teacher_NV.detach(), shard)
        with torch.no_grad():
            teacher_lp = token_log_probs(teacher, tokens, shard)
        student_lp = token_log_probs(student, tokens, shard)
        reward = (teacher_lp - student_lp).detach()
        from_teacher = inputs.from_teacher.to(torch.bool)
        policy = ~from_teacher
        trust = policy & (inputs.uniforms.to(reward.dtype) < torch.exp(reward.clamp(max=0.0)))
        outlier = policy & ~trust
        k1 = reinforce(-reward, student_lp)
        if self.outlier == "fkl":
            outlier_loss = teacher_topk_forward_kl(student, teacher, shard, self.outlier_topk)
        elif self.outlier == "clip":
            outlier_loss = reinforce(-reward.clamp(min=-self.outlier_tau), student_lp)
        else:
            outlier_loss = torch.where(reward.abs() > self.outlier_tau, 0.0 * k1, k1)
        prefix_loss = self.prefix_weight * (teacher_lp - student_lp)
        zero = torch.zeros_like(k1)
        parts = {"loss_trust": torch.where(trust, k1, zero),
                 "loss_outlier": torch.where(outlier, outlier_loss, zero),
                 "loss_prefix": torch.where(from_teacher, prefix_loss, zero)}
        loss = parts["loss_trust"] + parts["loss_outlier"] + parts["loss_prefix"]
        sums = {name: value.detach() for name, value in parts.items()}
        sums.update(policy_tokens=policy.to(k1.dtype), trust_tokens=trust.to(k1.dtype),
                    outlier_tokens=outlier.to(k1.dtype),
                    reward=torch.where(policy, reward, zero.detach()))
        return ObjectiveTerms(loss=loss, sums=sums)

    def metrics(self, totals: dict, tokens: float) -> dict:
        policy = max(totals["policy_tokens"], 1.0)
        return {"tropd_trust_frac": totals["trust_tokens"] / policy,
                "tropd_outlier_frac": totals["outlier_tokens"] / policy,
                "tropd_reward_mean": totals["reward"] / policy,
                **{key: totals[key] / max(tokens, 1.0)
                   for key in ("loss_trust", "loss_outlier", "loss_prefix")}}

    def describe(self) -> str:
        outlier = {"fkl": f"forward KL over the teacher's top-{self.outlier_topk}",
                   "clip": f"K1 with the reward clipped at -{self.outlier_tau:g}",
                   "mask": f"K1 dropped when |r| > {self.outlier_tau:g}"}[self.outlier]
        return (f"tropd: trust-masked K1 reverse KL, outliers {outlier}, teacher-prefix tokens "
                f"weighted {self.prefix_weight:g}")

"""The vocabulary as the method functions see it: sharding, padding and the canonical stop event.

Legend: N rows (token positions), V local vocabulary columns on this rank, R ranks in the
vocabulary group. A process group shards the vocabulary in contiguous rank order: rank r holds
global columns [offset_r, offset_r + V_r). Columns are *excluded* (zero probability under every
model, never sampled, no gradient) when they are padding (global id >= the true vocab size) or a
stop token merged into the canonical EOS (see `canonicalize_eos`).

Every cross-rank exchange here moves a few scalars per row (all-gather of per-rank statistics);
the vocabulary itself never crosses ranks. Nothing below `describe_shard` inspects tensor values
on the host, so the same functions run inside a captured CUDA graph (the SGLang composite model
builds its `Shard` once with `Shard.equal_split`).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabLayout:
    """How the columns of a logits tensor map to the true vocabulary.

    size: true vocabulary size; columns with global id >= size are padding (Megatron pads the
        vocabulary to a multiple TP divides). None: every column is a real token.
    stop_ids: global ids of the stop tokens of both models, the student's EOS first. Their
        probability mass is merged into one stop event emitted as stop_ids[0] (a base student and
        a chat teacher end with different tokens; method.md "EOS canonicalisation").
    """

    size: int | None = None
    stop_ids: tuple[int, ...] = ()


def as_layout(vocab) -> VocabLayout:
    """Accept a VocabLayout, a plain true vocab size (int) or None."""
    if vocab is None:
        return VocabLayout()
    if isinstance(vocab, VocabLayout):
        return vocab
    if isinstance(vocab, int) and not isinstance(vocab, bool):
        return VocabLayout(size=vocab)
    raise ValueError(f"vocab must be a VocabLayout, an int vocab size or None, got {vocab!r}")


@dataclass(frozen=True)
class Shard:
    """This rank's slice of the (possibly padded) vocabulary and the group it is sharded over."""

    group: object
    rank: int
    world: int
    rows: int
    offset: int
    width: int
    total: int
    layout: VocabLayout

    def global_ids(self, device) -> torch.Tensor:
        """[V] global column ids of the local columns."""
        return torch.arange(self.offset, self.offset + self.width, device=device)

    def excluded(self, device) -> torch.Tensor | None:
        """[V] bool, True for padded or merged-away columns; None when nothing is excluded.
        Decided from the layout's integers alone (no device synchronisation)."""
        end = self.offset + self.width
        padded = self.layout.size is not None and self.layout.size < end
        merged = [s for s in self.layout.stop_ids[1:] if self.offset <= s < end]
        if not (padded or merged):
            return None
        ids = self.global_ids(device)
        mask = ids >= self.layout.size if padded else torch.zeros_like(ids, dtype=torch.bool)
        for sid in merged:
            mask |= ids == sid
        return mask

    @classmethod
    def equal_split(cls, *, group, rank: int, world: int, width: int,
                    layout: VocabLayout) -> "Shard":
        """Equal shards of `width` columns per rank in rank order (SGLang's ParallelLMHead and
        Megatron's vocab-parallel output layer both shard the padded vocabulary this way), for
        callers that must not exchange shapes per call (`rows` is 0: the functions that take
        such a shard use their inputs' row count)."""
        if not (0 <= rank < world and width >= 1):
            raise ValueError(f"need 0 <= rank < world and width >= 1; got rank={rank}, "
                             f"world={world}, width={width}")
        _check_layout(layout, world * width)
        return cls(group, rank, world, 0, rank * width, width, world * width, layout)


def _check_layout(layout: VocabLayout, total: int) -> None:
    if layout.size is not None and not 1 <= layout.size <= total:
        raise ValueError(f"vocab size {layout.size} must be in [1, {total}] (the number of "
                         "logit columns across the group)")
    limit = total if layout.size is None else layout.size
    for sid in layout.stop_ids:
        if not 0 <= sid < limit:
            raise ValueError(f"stop id {sid} is outside the vocabulary [0, {limit})")


# torch 2.14 renamed all_gather_into_tensor (kept, deprecated) to all_gather_single
_GATHER_INTO_TENSOR = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """[N, K] per-rank statistics -> [R, N, K] from every rank of `group` (R=1 without group),
    gathered into one preallocated tensor by one collective, the form SGLang captures in CUDA
    graphs."""
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        return x.unsqueeze(0)
    out = torch.empty(world * x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)
    _GATHER_INTO_TENSOR(out, x.contiguous(), group=group)
    return out.view(world, *x.shape)


def describe_shard(*logits: torch.Tensor, group=None, vocab=None) -> Shard:
    """Validate 2-D logits of equal shape and find this rank's slice of the vocabulary.

    Under a group this is one all-gather of (N, V) per rank: it checks that every rank holds
    the same number of rows and computes the contiguous column offsets.
    """
    layout = as_layout(vocab)
    first = logits[0]
    for i, x in enumerate(logits):
        if x.dim() != 2:
            raise ValueError(f"logits must be 2-D [N, V_local]; argument {i} has shape "
                             f"{tuple(x.shape)} (flatten batch and sequence dims first)")
        if not x.is_floating_point():
            raise ValueError(f"logits must be floating point; argument {i} is {x.dtype}")
        if x.shape != first.shape:
            raise ValueError(
                f"student and teacher logits differ in shape: {tuple(first.shape)} vs "
                f"{tuple(x.shape)}; both models must share one (identically padded and sharded) "
                "vocabulary: pad or slice the teacher's vocabulary rows to the student's")
    rows, width = first.shape
    if group is None:
        rank, world, offset, total = 0, 1, 0, width
    else:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        shapes = all_gather_rows(torch.tensor([[rows, width]], dtype=torch.int64), group)
        shapes = shapes[:, 0, :].tolist()
        if len({n for n, _ in shapes}) != 1:
            raise ValueError(
                "the ranks of the vocabulary group hold different numbers of rows N: "
                f"{[n for n, _ in shapes]} (rank order); every rank must pass the same tokens")
        offset = sum(w for _, w in shapes[:rank])
        total = sum(w for _, w in shapes)
    _check_layout(layout, total)
    return Shard(group, rank, world, rows, offset, width, total, layout)


def column_values(x_NV: torch.Tensor, ids: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Values of global columns `ids` ([N, K] or [K]) in each row, fetched from their owners.

    Returns [N, K]; one all-gather of K scalars per row (non-owners contribute -inf).
    """
    ids_NK = ids.expand(x_NV.shape[0], -1) if ids.dim() == 1 else ids
    local = ids_NK - shard.offset
    owned = (local >= 0) & (local < shard.width)
    picked = x_NV.gather(1, local.clamp(0, shard.width - 1))
    picked = torch.where(owned, picked, torch.full_like(picked, float("-inf")))
    return all_gather_rows(picked, shard.group).amax(0)


def canonicalize_eos(logits_NV: torch.Tensor, stop_ids, *, group=None) -> torch.Tensor:
    """Merge the probability mass of all stop tokens into one stop event.

    Returns a copy of the logits (differentiable) where column stop_ids[0] (the student's EOS)
    holds logsumexp over the columns stop_ids and the other stop columns hold -inf, so the merged
    event keeps the summed mass p(EOS_S) + p(EOS_T) and is always emitted as the student's EOS.
    """
    shard = describe_shard(logits_NV, group=group, vocab=VocabLayout(stop_ids=tuple(stop_ids)))
    return merge_stops(logits_NV, shard)


def merge_stops(x_NV: torch.Tensor, shard: Shard) -> torch.Tensor:
    """`canonicalize_eos` with the shard's stop ids, or x itself when there is nothing to merge."""
    if len(shard.layout.stop_ids) < 2:
        return x_NV
    return _MergeStops.apply(x_NV, shard)


class _MergeStops(torch.autograd.Function):
    """Stop-token merge whose backward reaches every stop column, whichever rank owns it.

    Forward: one all-gather of len(stop_ids) values per row (non-owners contribute -inf), no
    host decision beyond the layout. d merged / d x_j = softmax_j over the stop columns; the
    merged column's upstream gradient lives on the rank owning stop_ids[0], so the backward
    shares it with one all-gather.
    """

    @staticmethod
    def forward(ctx, x_NV, shard):
        owned = list(owned_stops(shard))
        values_NK = torch.full((x_NV.shape[0], len(shard.layout.stop_ids)), float("-inf"),
                               dtype=x_NV.dtype, device=x_NV.device)
        for pos, local in owned:
            values_NK[:, pos] = x_NV[:, local]
        values_NK = all_gather_rows(values_NK, shard.group).amax(0)
        merged = torch.logsumexp(values_NK, dim=1)
        out = x_NV.clone()
        for pos, local in owned:
            out[:, local] = merged if pos == 0 else float("-inf")
        ctx.save_for_backward(torch.softmax(values_NK, dim=1))
        ctx.shard = shard
        return out

    @staticmethod
    def backward(ctx, grad_NV):
        (weights_NK,) = ctx.saved_tensors
        shard = ctx.shard
        owned = dict(owned_stops(shard))
        upstream = torch.zeros_like(weights_NK[:, :1])
        if 0 in owned:
            upstream = grad_NV[:, owned[0]:owned[0] + 1].to(weights_NK.dtype)
        upstream = all_gather_rows(upstream, shard.group).sum(0)[:, 0]
        grad = grad_NV.clone()
        for pos, local in owned.items():
            grad[:, local] = (upstream * weights_NK[:, pos]).to(grad.dtype)
        return grad, None


def owned_stops(shard: Shard):
    """(position in stop_ids, local column) for the stop tokens this rank holds."""
    for pos, sid in enumerate(shard.layout.stop_ids):
        local = sid - shard.offset
        if 0 <= local < shard.width:
            yield pos, local


def prepare_logits(x_NV: torch.Tensor, shard: Shard, dtype) -> torch.Tensor:
    """Logits in `dtype` with the excluded columns at -inf (stop merging is the caller's, once).

    Never modifies the input; returns the input itself when there is nothing to change.
    """
    out = x_NV.to(dtype)
    excluded = shard.excluded(out.device)
    return out if excluded is None else out.masked_fill(excluded, float("-inf"))


def finite_shift(m_N: torch.Tensor) -> torch.Tensor:
    """A row max usable as an exp shift: 0 where the shard is all -inf (then every term is 0)."""
    return torch.where(m_N == float("-inf"), torch.zeros_like(m_N), m_N)


def lse_stats(x_NV: torch.Tensor) -> torch.Tensor:
    """[N, 2] local (max, sum exp(x - max)); a shard whose columns are all -inf gives (-inf, 0)."""
    m = x_NV.amax(dim=1)
    z = torch.exp(x_NV - finite_shift(m).unsqueeze(1)).sum(dim=1)
    return torch.stack([m, z], dim=1)


def combine_weighted(stats_RNK: torch.Tensor) -> torch.Tensor:
    """Combine per-rank (max m_r, sums S_r...) into global sums relative to the global max.

    stats_RNK[..., 0] is each rank's shift m_r and stats_RNK[..., 1:] are sums of
    exp(x - m_r) * f(x). Returns [N, K]: (M, sum_r exp(m_r - M) S_r ...).
    """
    m_RN = stats_RNK[..., 0]
    big_N = m_RN.amax(0)
    scale_RN = torch.exp(m_RN - big_N)
    sums = (stats_RNK[..., 1:] * scale_RN.unsqueeze(-1)).sum(0)
    return torch.cat([big_N.unsqueeze(1), sums], dim=1)


def logsumexp(x_NV: torch.Tensor, shard: Shard) -> torch.Tensor:
    """[N] log sum_v exp(x) over the whole (sharded) vocabulary."""
    m, z = combine_weighted(all_gather_rows(lse_stats(x_NV), shard.group)).unbind(1)
    return m + torch.log(z)

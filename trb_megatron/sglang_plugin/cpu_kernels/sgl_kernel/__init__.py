"""A pure-torch stand-in for the `sgl_kernel` package on a CPU machine (no CPU build of
sgl-kernel exists on PyPI). Importable only through trb_megatron.sglang_plugin.cpu_backend,
which puts this folder on the module path of engine processes when there is no CUDA; it refuses
to import where CUDA is available, so it can never shadow the real sgl-kernel on a GPU machine.

With SGLANG_USE_CPU_ENGINE=1, sglang 0.5.23 imports sgl_kernel at module level. A dense model
on a CPU without the AMX kernels (torch.ops.sgl_kernel.convert_weight_packed is absent here, so
sglang's cpu_has_amx_support() is false and every layer takes its forward_native path) calls
only two of its functions: `assign_req_to_token_pool_cpu` (KV slots of each request) and, for
seeded sampling, the operator `torch.ops.sgl_kernel.murmur_hash32_cpu`. Every other name can be
imported (sglang imports several at module level) but raises NotImplementedError naming itself
when called.
"""

import torch

if torch.cuda.is_available():
    raise ImportError("trb_megatron's CPU stand-in for sgl_kernel must not be used on a CUDA "
                      "machine: install the real sgl-kernel (pip install 'trb-megatron[sglang]')")

_MASK32 = 0xFFFFFFFF


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset,
                                 out_cache_loc, pool_len):
    """req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]] = the next
    end_offset[i] - start_offset[i] entries of out_cache_loc (requests in order), as sglang's
    triton kernel `assign_req_to_token_pool` does on GPUs."""
    del pool_len  # the row length of req_to_token, implied by the tensor here
    starts, ends = start_offset.tolist(), end_offset.tolist()
    taken = 0
    for row, start, end in zip(req_pool_indices.tolist(), starts, ends):
        req_to_token[row, start:end] = out_cache_loc[taken:taken + end - start].to(
            req_to_token.dtype)
        taken += end - start


def _mul32(a, b: int):
    """(a * b) mod 2^32 for int64 tensors a < 2^32 and a constant b < 2^32, without overflow."""
    low = (a * (b & 0xFFFF)) & _MASK32
    high = ((a * (b >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _rotl32(x, r: int):
    return ((x << r) | (x >> (32 - r))) & _MASK32


def _mix(h, k):
    k = _rotl32(_mul32(k, 0xCC9E2D51), 15)
    h = h ^ _mul32(k, 0x1B873593)
    h = _rotl32(h, 13)
    return (_mul32(h, 5) + 0xE6546B64) & _MASK32


def murmur_hash32(seed: torch.Tensor, positions: torch.Tensor, col_indices: torch.Tensor
                  ) -> torch.Tensor:
    """[n, m] uint32: MurmurHash3_x86_32 (seed 0) of the 16 bytes (seed_i low and high words,
    positions_i, col_indices_j), bit for bit what sglang's triton kernel murmur_hash32_kernel
    computes on GPUs. seed: [n] uint64 or int64; positions: [n]; col_indices: [m]."""
    words = seed.view(torch.int64) if seed.dtype == torch.uint64 else seed.to(torch.int64)
    h = torch.zeros(words.shape[0], 1, dtype=torch.int64, device=seed.device)
    for k in ((words & _MASK32), (words >> 32) & _MASK32, positions.to(torch.int64) & _MASK32):
        h = _mix(h, k.unsqueeze(1))
    h = _mix(h, (col_indices.to(torch.int64) & _MASK32).unsqueeze(0))
    h = h ^ 16
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    h = h ^ (h >> 16)
    return h.to(torch.uint32)


_murmur_op = torch.library.custom_op("sgl_kernel::murmur_hash32_cpu", murmur_hash32,
                                     mutates_args=())


@_murmur_op.register_fake
def _(seed, positions, col_indices):  # shapes for torch.compile (sglang compiles the sampler)
    return seed.new_empty((seed.shape[0], col_indices.shape[0]), dtype=torch.uint32)


def __getattr__(name):
    if name.startswith("_"):
        raise AttributeError(name)

    def not_available(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} has no CPU stand-in (trb_megatron.sglang_plugin.cpu_backend "
            "supports dense models through sglang's forward_native paths only)")

    not_available.__name__ = name
    return not_available

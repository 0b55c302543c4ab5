"""One vector instruction set for CPU runs, so that their results do not depend on the machine.

torch's CPU kernels (ATen), MKL and oneDNN pick their code path by the host's instruction set
(AVX2, AVX-512, ...), and each path rounds slightly differently. Over hundreds of training steps
the difference grows into different models: the toy build on one machine gave a student with
21.3% held-out greedy accuracy on AVX-512 kernels and 10.9% on AVX2 kernels (same seed, threads
and library versions; torch 2.13.0/2.14.1 and transformers 5.19.0/5.24.0 gave bitwise identical
builds). x86-64 machines of one kind differ in this, so CPU runs pin AVX2, which all of them have.

The variables are read when torch (and MKL) load, so they must be in a process's environment
from its start: the launcher exports them for CPU jobs (examples/run_trb_distill.sh runs
`python -m trb_megatron.parallel.cpu_isa`, which prints the exports), the toy build starts its
own child process with them (trb_megatron.toy.build.build_pinned).
"""

import platform

import torch

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_CBWR": "AVX2",
          "DNNL_MAX_CPU_ISA": "AVX2"}
"""torch's kernels, MKL (in its conditional-numerical-reproducibility mode) and oneDNN at AVX2."""


def pinned_environment() -> tuple[dict, str]:
    """(variables to set, the cpu_capability a process started with them reports): PINNED on
    x86-64 hosts with AVX2 or more, nothing elsewhere (other architectures, older CPUs)."""
    host = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or host not in ("AVX2", "AVX512"):
        return {}, host
    return PINNED, "AVX2"


if __name__ == "__main__":
    for name, value in pinned_environment()[0].items():
        print(f"export {name}={value}")

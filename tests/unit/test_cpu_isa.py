"""CPU runs pin one vector instruction set (trb_megatron/parallel/cpu_isa.py): the exports the
launcher evaluates take effect in a process started with them."""

import os
import subprocess
import sys

from trb_megatron.parallel.cpu_isa import PINNED, pinned_environment


def test_exports_pin_the_kernels_of_a_new_process():
    exports = subprocess.run([sys.executable, "-m", "trb_megatron.parallel.cpu_isa"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    environment, capability = pinned_environment()
    assert exports == [f"export {k}={v}" for k, v in environment.items()]
    assert environment in ({}, PINNED)
    child = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env={**os.environ, **environment}, capture_output=True, text=True, check=True)
    assert child.stdout.strip() == capability

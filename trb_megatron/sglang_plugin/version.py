"""The one sglang version this integration is written and tested against, and the startup check.

SGLang's model, loader and scheduler internals change between releases without notice; an
untested version must be refused at startup rather than fail (or silently misbehave) mid-run.
"""

import importlib

SGLANG_VERSION = "0.5.23"
INSTALL_HINT = ("pip install 'trb-megatron[sglang]' on a CUDA machine (the project's Docker "
                "image has it), or on a CPU machine the project's environment "
                "(bash scripts/venv.sh: sglang without its CUDA-only requirements)")


class SGLangUnavailable(RuntimeError):
    """rollout.backend=sglang was selected but the pinned sglang cannot be used here."""


def check_version(found: str) -> None:
    """Raise SGLangUnavailable unless `found` is the pinned version."""
    if found != SGLANG_VERSION:
        raise SGLangUnavailable(
            f"sglang {found} is installed, but the TRB SGLang backend is written and tested "
            f"against sglang {SGLANG_VERSION} only (it relies on model-loader and scheduler "
            f"internals that change between releases); {INSTALL_HINT}, or use "
            "rollout.backend=megatron")


def require_sglang():
    """Import sglang and check its version; SGLangUnavailable with the fix otherwise. On a
    machine without CUDA the CPU adaptations are made in this process, before the import and
    after it (SGLang's own processes get them from the plugin's register)."""
    from trb_megatron.sglang_plugin import cpu_backend

    cpu_backend.prepare_environment()
    try:
        sglang = importlib.import_module("sglang")
    except ImportError as err:
        raise SGLangUnavailable(f"rollout.backend=sglang needs sglang, which cannot be imported "
                                f"here ({err}); {INSTALL_HINT}, or use "
                                "rollout.backend=megatron") from None
    check_version(getattr(sglang, "__version__", "unknown"))
    cpu_backend.install()
    return sglang

"""Process groups and backends for Megatron-Core: the CPU backend and the backend profile."""

from trb_megatron.parallel.cpu_backend import install_cpu_backend
from trb_megatron.parallel.profile import BackendProfile, detect_profile, initialize_parallel

__all__ = ["BackendProfile", "detect_profile", "initialize_parallel", "install_cpu_backend"]

"""Hugging Face <-> Megatron checkpoint conversion: name maps, safetensors I/O, converters."""

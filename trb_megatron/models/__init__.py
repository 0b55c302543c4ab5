"""Megatron-Core models built from Hugging Face configs: architecture, builder, pairing."""

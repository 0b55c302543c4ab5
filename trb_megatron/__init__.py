"""trb_megatron: on-policy distillation with Trust-Region Behavior Blending on Megatron-Core."""

__version__ = "0.1.0"

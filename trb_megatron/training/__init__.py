"""The OPD/TRB training loop on Megatron-Core."""

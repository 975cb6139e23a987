"""Triton kernels for MoBA. Depends on torch and triton only (no Megatron, no configs)."""

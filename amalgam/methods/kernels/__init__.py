"""Fused CPU kernels (numba) behind the methods' torch functions, bit-identical to them."""

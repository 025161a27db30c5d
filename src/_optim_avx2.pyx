# The optimizer kernels compiled with -mavx2 (no FMA contraction): chosen at import on CPUs
# that support AVX2, see lrfast/_dispatch.py. Same source as the portable build in _optim.pyx.

include "_optim_kernels.pxi"

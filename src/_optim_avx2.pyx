# The optimizer kernels compiled with -mavx2 (no FMA contraction): chosen at import on CPUs
# that support AVX2, see lrfast/_dispatch.py. Same source as the portable build in _optim.pyx.

cimport numpy as cnp
from libc.stdint cimport intptr_t

cnp.import_array()

include "_optim_kernels.pxi"

# Optimizer kernels: one native call updates every tensor of a step in one parallel region.
#
# This file is included by two extension modules compiled with different flags: _optim.pyx
# (the portable baseline, SSE2 on x86-64) and _optim_avx2.pyx (-mavx2, chosen at import on CPUs
# that have it; see lrfast/_dispatch.py). Both are built without FMA contraction, so the two give
# bitwise the same results. It only gathers the parts, one file per concern:
#
#   _partition.pxi   the address table, the split of its elements over threads, the drivers
#   _storage.pxi     element types: half-precision conversions and the mixed-type tile driver
#   _updates.pxi     the optimizer updates, one element loop each, and the registry of updates
#   _updates_*.pxi   more updates, one file per family (torch_more, scalar_state, community,
#                    trust, factored, schedule_free)
#   _reductions.pxi  read-mostly passes: the non-finite check, the gradient norm, scaling
#   _rowwise.pxi     row-wise sparse updates of embedding tables (lookups merged by row)
#   _plans.pxi       per-step gradient checks and the Plan that runs an update
#   _probes.pxi      the bandwidth probe and build introspection
#
# Layout shared by all operations
# -------------------------------
# A step works on N tensors, each with several buffers (param, grad, state...). The Python layer
# gathers, once per optimizer, a table of base addresses: ``table[b, k]`` is the address of
# buffer ``b`` of tensor ``k`` (row 0 param, row 1 grad, then the state buffers), and the prefix
# sums ``offsets[k]`` of the tensor sizes. The concatenation of all tensors is one index space
# [0, total) that is cut into one contiguous span per thread: small tensors are batched into one
# thread's span, large ones are split across threads, and there is a single parallel region per
# step. Every update is element-wise, so results do not depend on the number of threads.
#
# Arithmetic follows torch.optim's single-tensor formulas operation by operation (the order of
# multiplications, where eps goes, lerp for running averages, bias corrections in double) and is
# carried out in the tensor's own precision, so float32 results match torch to rounding.
#
# Validation happens before any kernel runs, in Python and in ``_gather`` (with the GIL held, as
# part of a Plan's step): the kernels trust their inputs.

from cython cimport floating
from cython.parallel cimport prange
from libc.float cimport DBL_MAX, FLT_MAX
from libc.math cimport fabs, fabsf, pow, sqrt, sqrtf
from libc.stdint cimport int64_t, intptr_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from _fpenv cimport LRFAST_HAVE_FTZ, lrfast_ftz_enter, lrfast_ftz_leave
from _openmp_helpers cimport omp_get_max_threads

import numpy as np

include "_partition.pxi"
include "_storage.pxi"
include "_updates.pxi"
include "_updates_torch_more.pxi"
include "_updates_scalar_state.pxi"
include "_updates_community.pxi"
include "_updates_trust.pxi"
include "_updates_factored.pxi"
include "_updates_schedule_free.pxi"
include "_reductions.pxi"
include "_averages.pxi"
include "_rowwise.pxi"
include "_plans.pxi"
include "_probes.pxi"

# Type stub for lrfast._schedules_avx2 (src/_schedules_avx2.pyx): AVX2 build of _schedules' API.
# The same source compiled with -mavx2: the same API as the portable build.
from ._schedules import (
    KINDS as KINDS,
    N_INT_PARAMS as N_INT_PARAMS,
    N_FLOAT_PARAMS as N_FLOAT_PARAMS,
    PlateauCell as PlateauCell,
    NativeSchedule as NativeSchedule,
)

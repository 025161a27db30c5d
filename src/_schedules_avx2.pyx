# Learning-rate schedule evaluator compiled with -mavx2 (see _schedules_impl.pxi).

include "_schedules_impl.pxi"

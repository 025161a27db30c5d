# Learning-rate schedule evaluator, portable build (see _schedules_impl.pxi).

include "_schedules_impl.pxi"

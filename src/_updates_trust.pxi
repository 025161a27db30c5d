# Per-tensor trust ratios: LAMB and LARS (a norm pass per tensor, then the update).
#
# Each update is written as those of _updates.pxi are (Hyper, Args, prepare, loop, segment,
# one _register call).

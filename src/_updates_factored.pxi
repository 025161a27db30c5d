# Factored second moments: Adafactor (per-row and per-column statistics of 2-D params).
#
# Each update is written as those of _updates.pxi are (Hyper, Args, prepare, loop, segment,
# one _register call).

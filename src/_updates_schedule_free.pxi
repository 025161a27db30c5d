# Schedule-free AdamW and SGD (Defazio et al., 2024).
#
# Each update is written as those of _updates.pxi are (Hyper, Args, prepare, loop, segment,
# one _register call).

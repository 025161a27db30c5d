# torch.optim's other element-wise updates: Adamax, RAdam, Adadelta, Rprop.
#
# Each update is written as those of _updates.pxi are (Hyper, Args, prepare, loop, segment,
# one _register call).

# Updates with per-step scalar state kept by the Python layer: NAdam (mu_product),
# ASGD (eta, mu). The kernel reads them from StepValues.scalars.
#
# Each update is written as those of _updates.pxi are (Hyper, Args, prepare, loop, segment,
# one _register call).

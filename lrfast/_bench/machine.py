"""What the report says about the machine: CPU, threads, lrfast's build, the peers'
versions, and how busy other processes kept the cores during the run."""
from __future__ import annotations

import os
import platform
import time

import numpy as np

import lrfast
from lrfast import _dispatch
from lrfast._config import config


def machine_info(peers, nthreads):
    cfg = config()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(), "cpu": model, "cpu_count": os.cpu_count(),
        "lrfast_threads": nthreads,
        "torch_threads": peers.torch.get_num_threads() if peers.torch is not None else None,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "build": {"lrfast": lrfast.__version__, "kernel_build": _dispatch.name,
                  "kernel_builds_available": _dispatch.available(), "simd": cfg["simd"],
                  "openmp": cfg["openmp"], "compiler": cfg["compiler"]},
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "torch": peers.versions.get("torch"), "jax": peers.versions.get("jax"),
                     "optax": peers.versions.get("optax"),
                     "deepspeed": peers.versions.get("deepspeed"),
                     "bitsandbytes": peers.versions.get("bitsandbytes"),
                     "torchao": peers.versions.get("torchao")},
        "jax_x64": peers.x64,
    }


def cpu_snapshot():
    """(busy CPU seconds of the whole machine, of this process, wall time); Linux only."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    own = os.times()
    return (sum(fields[:8]) - idle) / hz, own.user + own.system, time.perf_counter()


def other_load(before):
    """Average number of cores other processes kept busy since ``before`` (None if unknown)."""
    after = cpu_snapshot()
    if before is None or after is None or after[2] <= before[2]:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / (after[2] - before[2]))

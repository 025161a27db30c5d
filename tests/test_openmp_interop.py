"""lrfast and torch in one process, each with its own OpenMP runtime.

torch's wheels bundle a libgomp; an lrfast wheel bundles another under a mangled name
(``lrfast.libs/libgomp-<hash>.so...``), so a process that imports both has two OpenMP runtimes.
Each test runs in a fresh interpreter, imports the two in one order or the other, runs both
thread pools (torch's through a matmul and its optimizer, lrfast's through an update large
enough to be split over threads) and compares the two optimizers' results.
"""
from __future__ import annotations

import json

import pytest
from cases import run_python

pytest.importorskip("torch")

CODE = r"""
import json, os, sys
order = ORDER
for name in order:
    __import__(name)
import numpy as np
import torch
import lrfast

torch.set_num_threads(2)
lrfast.set_num_threads(2)
n = 600_000  # large enough that lrfast splits the update over both threads
rng = np.random.default_rng(0)
p_np = rng.standard_normal(n).astype(np.float32)
p_t = torch.tensor(p_np.copy(), requires_grad=True)
opt_t = torch.optim.Adam([p_t], lr=1e-2, foreach=False)
opt_l = lrfast.Adam([p_np], lr=1e-2)
a = torch.randn(256, 256)
for _ in range(20):
    g = rng.standard_normal(n).astype(np.float32)
    a = torch.tanh(a @ a / 16)  # torch's own OpenMP pool
    p_t.grad = torch.from_numpy(g.copy())
    opt_t.step()
    assert opt_l.step([g])
diff = float(np.max(np.abs(p_t.detach().numpy() - p_np)))
maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
runtimes = sorted({line.split()[-1] for line in maps.splitlines()
                   if any(k in line.split()[-1] for k in ("gomp", "iomp", "libomp"))})
print(json.dumps(dict(diff=diff, runtimes=runtimes, lrfast_threads=lrfast.get_num_threads(),
                      torch_threads=torch.get_num_threads(), lrfast_file=lrfast.__file__)))
"""


@pytest.mark.parametrize("order", [("torch", "lrfast"), ("lrfast", "torch")],
                         ids=["torch-first", "lrfast-first"])
def test_torch_and_lrfast_step_in_one_process(order):
    out = run_python(CODE.replace("ORDER", repr(list(order))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OMP: Error" not in out.stderr and "OMP: Warning" not in out.stderr, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["lrfast_threads"] == 2 and res["torch_threads"] == 2
    assert res["diff"] <= 1e-5, res  # the same Adam, float32 rounding apart
    bundled = [r for r in res["runtimes"] if "lrfast.libs" in r]
    if bundled:
        # An installed wheel: lrfast's own runtime and torch's are both loaded, side by side.
        others = [r for r in res["runtimes"] if "lrfast.libs" not in r]
        assert others, res["runtimes"]

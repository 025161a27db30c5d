"""``python -m lrfast demo --torch``: a small torch model trained on the CPU with
``lrfast.torch.AdamW`` and a warmup-cosine schedule, against ``torch.optim.AdamW``.

The model is a stack of 9 transformer encoder layers of width 32 with a linear head (110
parameter tensors, 77k parameters). The task is synthetic regression: each target is a fixed
random linear map of the mean of the sequence. The learning rate follows
``lrfast.schedules.warmup_cosine`` through torch's ``LambdaLR``, so the same schedule object
drives every run. Each optimizer starts from the same weights and sees the same batches; the
table gives the final loss, the median time of ``optimizer.step()`` and of a whole training
step (forward, backward and step).
"""
from __future__ import annotations

import time

import numpy as np

MISSING_TORCH = ('python -m lrfast demo --torch needs torch: pip install "lrfast[torch]" '
                 "(for the CPU build: pip install torch --index-url "
                 "https://download.pytorch.org/whl/cpu)")


def _model(torch):
    torch.manual_seed(0)
    layers = [torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
              for _ in range(9)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(32, 8))


def train(torch, make_opt, schedule, steps, peak):
    """Train from the fixed start; returns (final loss, median step s, median iteration s)."""
    model = _model(torch)
    opt = make_opt(model.parameters(), peak)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: schedule(t) / peak)
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(32, 8, generator=gen)
    step_s, iter_s = np.empty(steps), np.empty(steps)
    last = float("nan")
    for t in range(steps):
        x = torch.randn(32, 16, 32, generator=gen)
        y = x.mean(dim=1, keepdim=True).expand(-1, 16, -1) @ target
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        sched.step()
        step_s[t], iter_s[t] = t2 - t1, t2 - t0
        last = float(loss.detach())
    return last, float(np.median(step_s)), float(np.median(iter_s))


def main(steps=200):
    try:
        import torch
    except ImportError:
        print(MISSING_TORCH)
        return 1
    import lrfast
    import lrfast.torch as LT

    peak, warmup = 3e-3, max(1, steps // 10)
    schedule = lrfast.schedules.warmup_cosine(0.0, peak, warmup, steps, end_value=peak / 100)
    runs = [
        ("lrfast.torch.AdamW", lambda ps, lr: LT.AdamW(ps, lr=lr, weight_decay=0.01)),
        ("torch AdamW (for-loop)", lambda ps, lr: torch.optim.AdamW(
            ps, lr=lr, weight_decay=0.01, foreach=False)),
        ("torch AdamW (foreach)", lambda ps, lr: torch.optim.AdamW(
            ps, lr=lr, weight_decay=0.01, foreach=True)),
        ("torch AdamW (fused)", lambda ps, lr: torch.optim.AdamW(
            ps, lr=lr, weight_decay=0.01, fused=True)),
    ]
    n_tensors = len(list(_model(torch).parameters()))
    print(f"9-layer transformer encoder (width 32), {n_tensors} parameter tensors, "
          f"{steps} steps, batch 32 x 16 tokens, CPU, lrfast threads "
          f"{lrfast.get_num_threads()}, torch threads {torch.get_num_threads()}")
    print(f"lr: lrfast.schedules.warmup_cosine(0, {peak:g}, {warmup}, {steps}) via LambdaLR, "
          "weight_decay 0.01\n")
    header = (f"{'optimizer':<24} {'final loss':>11} {'step() us':>10} {'x lrfast':>9} "
              f"{'iteration ms':>13}")
    print(header)
    print("-" * len(header))
    base = None
    for name, make in runs:
        loss, step_s, iter_s = train(torch, make, schedule, steps, peak)
        base = base or step_s
        print(f"{name:<24} {loss:>11.6f} {step_s * 1e6:>10.1f} {step_s / base:>8.2f}x "
              f"{iter_s * 1e3:>13.2f}")
    print("\nx lrfast: the optimizer step's time over lrfast.torch's (above 1: lrfast is faster).")
    return 0

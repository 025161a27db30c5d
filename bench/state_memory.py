"""Bytes of optimizer state per parameter, measured with ``opt.state_bytes()``.

Builds each optimizer over float32 params of ``--size`` elements (one tensor, 2**20 by
default), takes one step so that every buffer exists, and prints the state it holds: every
state buffer and 8-bit block scale, not the params (4 bytes each) or the grads. The last
column is what the layout should take by hand: per buffer 4 bytes an element for float32, 2 for
bfloat16, and 1 + 4 / block_size for 8-bit codes with a float32 scale per block.

    python bench/state_memory.py [--size 1048576]
"""
from __future__ import annotations

import argparse

import numpy as np

import lrfast

def adam(params, state_dtype):
    return lrfast.Adam(params, lr=1e-3, state_dtype=state_dtype)


def sgd_momentum(params, state_dtype):
    return lrfast.SGD(params, lr=1e-2, momentum=0.9, state_dtype=state_dtype)


ROWS = [
    # (optimizer, its constructor, state_dtype, state buffers)
    ("Adam", adam, None, 2),
    ("Adam", adam, "bfloat16", 2),
    ("Adam", adam, "int8", 2),
    ("Adam", adam, lrfast.Int8State(block_size=64), 2),
    ("SGD momentum", sgd_momentum, None, 1),
    ("SGD momentum", sgd_momentum, "bfloat16", 1),
    ("SGD momentum", sgd_momentum, "int8", 1),
]


def by_hand(state_dtype, nbuffers: int, size: int) -> int:
    """Bytes the layout should take: 4 or 2 per element and buffer, or 8-bit codes (1 byte)
    plus a float32 scale per block of the param."""
    if state_dtype is None:
        return nbuffers * 4 * size
    if state_dtype == "bfloat16":
        return nbuffers * 2 * size
    block = 256 if state_dtype == "int8" else state_dtype.block_size
    return nbuffers * (size + 4 * -(-size // block))


def label(state_dtype) -> str:
    if state_dtype is None:
        return "float32 (default)"
    if isinstance(state_dtype, lrfast.Int8State):
        return f"Int8State(block_size={state_dtype.block_size})"
    return f'"{state_dtype}"'


def measure(size: int):
    """[(optimizer, state, bytes, bytes per param, by hand)] for params of ``size`` elements."""
    rng = np.random.default_rng(0)
    grad = rng.standard_normal(size, dtype=np.float32)
    out = []
    for name, make, state_dtype, nbuffers in ROWS:
        params = [np.zeros(size, np.float32)]
        opt = make(params, state_dtype)
        opt.step([grad])
        nbytes = opt.state_bytes()
        out.append((name, label(state_dtype), nbytes, nbytes / size,
                    by_hand(state_dtype, nbuffers, size) / size))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1 << 20, help="elements (default 2**20)")
    args = ap.parse_args(argv)
    if args.size < 4096:
        ap.error("--size must be at least 4096 (smaller params keep float32 state)")
    rows = measure(args.size)
    print(f"Optimizer state for {args.size:,} float32 params (opt.state_bytes())\n")
    print("| optimizer | state_dtype | state bytes | bytes / param | by hand |")
    print("|---|---|---:|---:|---:|")
    for name, state, nbytes, per_param, by_hand in rows:
        print(f"| {name} | `{state}` | {nbytes:,} | {per_param:.4f} | {by_hand:.4f} |")


if __name__ == "__main__":
    main()

"""``python -m lrfast demo --embeddings``: a small recommender trained on the CPU, its embedding
table updated row-wise by :class:`lrfast.SparseAdam` and its dense layers by
:class:`lrfast.Adam`, in NumPy; then the same model in torch (``nn.EmbeddingBag(sparse=True)``,
``torch.optim.SparseAdam`` and ``torch.optim.Adam``) when torch is installed.

The data are synthetic clicks. Each sample is a bag of a few item ids drawn from a Zipf
distribution folded into the table (a few items very popular, most rarely seen); a hidden
model gives each item a score, and a sample is clicked with probability sigmoid(sum of its
items' scores + bias). The model sums the bag's embedding rows (sum pooling), then a small MLP
(``dim -> hidden -> 1``, ReLU) gives the click's logit; the loss is the binary cross-entropy.

Both runs start from the same weights and see the same batches, so their losses should agree
to float32 rounding. The gradient of the table is one row per lookup (the pooled gradient,
repeated for each id of the bag): lrfast sums the duplicates and updates only the touched rows,
as torch does with the sparse gradient ``EmbeddingBag`` gives.
"""
from __future__ import annotations

import time

import numpy as np

ROWS, DIM, HIDDEN = 100_000, 32, 64
BAG, BATCH, ZIPF = 4, 512, 1.2
LR_TABLE, LR_DENSE = 1e-2, 3e-3


def make_data(steps, rows=ROWS, seed=0):
    """(batches of (ids (BATCH, BAG), labels (BATCH,))), and a held-out batch (ids, labels,
    the loss of the hidden model's own probabilities on it: the best a model can do)."""
    rng = np.random.default_rng(seed)
    score = rng.normal(0.0, 1.0, rows)
    bias = -0.5

    def batch(n):
        ids = (rng.zipf(ZIPF, (n, BAG)) - 1) % rows
        z = score[ids].sum(axis=1) + bias
        return ids.astype(np.int64), (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.float32), z
    batches = [batch(BATCH)[:2] for _ in range(steps)]
    ids, y, z = batch(8 * BATCH)
    return batches, (ids, y, _bce(z, y))


def init_weights(rows=ROWS, seed=1):
    rng = np.random.default_rng(seed)
    f = np.float32
    return {"table": rng.normal(0.0, 0.1, (rows, DIM)).astype(f),
            "w1": rng.normal(0.0, (2.0 / DIM) ** 0.5, (DIM, HIDDEN)).astype(f),
            "b1": np.zeros(HIDDEN, f),
            "w2": rng.normal(0.0, (1.0 / HIDDEN) ** 0.5, (HIDDEN, 1)).astype(f),
            "b2": np.zeros(1, f)}


def _bce(z, y):
    """Mean binary cross-entropy of logits ``z`` against labels ``y`` (stable form)."""
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def _forward(w, ids):
    h = w["table"][ids].sum(axis=1)                  # (B, DIM): sum pooling
    a = np.maximum(h @ w["w1"] + w["b1"], 0)
    return h, a, (a @ w["w2"] + w["b2"])[:, 0]


def train_numpy(batches, weights):
    """lrfast.SparseAdam on the table, lrfast.Adam on the MLP. Returns (losses, optimizer-step
    seconds, whole-step seconds, final weights)."""
    import lrfast

    w = {k: v.copy() for k, v in weights.items()}
    dense = ["w1", "b1", "w2", "b2"]
    table_opt = lrfast.SparseAdam(w["table"], lr=LR_TABLE)
    dense_opt = lrfast.Adam([w[k] for k in dense], lr=LR_DENSE)
    losses, opt_s, step_s = [], [], []
    for ids, y in batches:
        t0 = time.perf_counter()
        h, a, z = _forward(w, ids)
        losses.append(_bce(z, y))
        dz = ((1.0 / (1.0 + np.exp(-z)) - y) / len(y)).astype(np.float32)[:, None]
        da = (dz @ w["w2"].T) * (a > 0)
        grads = [h.T @ da, da.sum(axis=0), a.T @ dz, dz.sum(axis=0)]
        dh = da @ w["w1"].T                           # (B, DIM): each id of a bag gets it
        rows = ids.reshape(-1)
        row_grads = np.repeat(dh, ids.shape[1], axis=0)
        t1 = time.perf_counter()
        dense_opt.step(grads)
        table_opt.step(rows, row_grads)
        t2 = time.perf_counter()
        opt_s.append(t2 - t1)
        step_s.append(t2 - t0)
    return losses, opt_s, step_s, w


def train_torch(torch, batches, weights):
    """nn.EmbeddingBag(sparse=True) + torch.optim.SparseAdam, an MLP + torch.optim.Adam."""
    rows = weights["table"].shape[0]
    emb = torch.nn.EmbeddingBag(rows, DIM, mode="sum", sparse=True)
    mlp = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.ReLU(),
                              torch.nn.Linear(HIDDEN, 1))
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(weights["table"]))
        mlp[0].weight.copy_(torch.from_numpy(weights["w1"].T))
        mlp[0].bias.copy_(torch.from_numpy(weights["b1"]))
        mlp[2].weight.copy_(torch.from_numpy(weights["w2"].T))
        mlp[2].bias.copy_(torch.from_numpy(weights["b2"]))
    sparse_opt = torch.optim.SparseAdam(emb.parameters(), lr=LR_TABLE)
    dense_opt = torch.optim.Adam(mlp.parameters(), lr=LR_DENSE)
    bce = torch.nn.BCEWithLogitsLoss()
    losses, opt_s, step_s = [], [], []
    for ids, y in batches:
        ti, ty = torch.from_numpy(ids), torch.from_numpy(y)
        t0 = time.perf_counter()
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss = bce(mlp(emb(ti))[:, 0], ty)
        loss.backward()
        t1 = time.perf_counter()
        sparse_opt.step()
        dense_opt.step()
        t2 = time.perf_counter()
        losses.append(float(loss.detach()))
        opt_s.append(t2 - t1)
        step_s.append(t2 - t0)

    def evaluate(ids, y):
        with torch.no_grad():
            z = mlp(emb(torch.from_numpy(ids)))[:, 0].numpy()
        return _bce(z.astype(np.float64), y)
    return losses, opt_s, step_s, evaluate


def main(steps=300, rows=ROWS):
    import lrfast

    batches, (test_ids, test_y, best) = make_data(steps, rows)
    weights = init_weights(rows)
    print(f"click model: embedding table {rows} x {DIM} (float32), bags of {BAG} ids from "
          f"Zipf({ZIPF}), sum pooling, MLP {DIM}-{HIDDEN}-1,")
    print(f"batch {BATCH} ({BATCH * BAG} lookups), {steps} steps, lr {LR_TABLE:g} (table) and "
          f"{LR_DENSE:g} (MLP); lrfast threads {lrfast.get_num_threads()}")
    uniq = np.mean([np.unique(ids).size for ids, _ in batches])
    print(f"unique rows per batch: {uniq:.0f} of {BATCH * BAG} lookups; "
          f"held-out loss of the initial weights {_bce(_forward(weights, test_ids)[2], test_y):.4f}, "
          f"of the hidden model {best:.4f}\n")
    runs = []
    losses, opt_s, step_s, w = train_numpy(batches, weights)
    runs.append(("lrfast SparseAdam + Adam", losses, opt_s, step_s,
                 _bce(_forward(w, test_ids)[2].astype(np.float64), test_y)))
    try:
        import torch
        have_torch = True
    except ImportError:
        have_torch = False
    if have_torch:
        losses, opt_s, step_s, evaluate = train_torch(torch, batches, weights)
        runs.append(("torch SparseAdam + Adam", losses, opt_s, step_s, evaluate(test_ids, test_y)))
    header = (f"{'run':<26} {'first loss':>10} {'last 20':>9} {'held-out':>9} "
              f"{'opt step us':>12} {'whole step ms':>14}")
    print(header)
    print("-" * len(header))
    for name, losses, opt_s, step_s, held in runs:
        print(f"{name:<26} {losses[0]:>10.4f} {np.mean(losses[-20:]):>9.4f} {held:>9.4f} "
              f"{np.median(opt_s) * 1e6:>12.1f} {np.median(step_s) * 1e3:>14.2f}")
    if not have_torch:
        print("\n(torch is not installed: only lrfast's run)")
    print("\nlast 20: the mean training loss of the last 20 steps; held-out: the loss on "
          f"{len(test_y)} new samples.")
    print("opt step: the median time of both optimizers' steps; whole step: forward, backward "
          "and the steps.")
    print("On a machine with few cores NumPy's BLAS threads can wait on OpenMP's idling ones "
          "(a slow whole step);\nOMP_WAIT_POLICY=passive in the environment avoids it.")
    return 0

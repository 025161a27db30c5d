"""What a bench run prints and writes: the text report (table, skips, thread scaling,
targets), the bar chart of lrfast's speed-ups, and the JSON."""
from __future__ import annotations

import os
import sys

from .cases import DTYPES, EMA_DECAY, INT8_BLOCK, STATE_VARIANTS, VARIANTS, average_transfers
from .optimizers import OPTIMIZERS
from .peers import AVERAGE_PEERS, EMBEDDING_PEERS, LOWP_PEERS, PEERS, STATE_PEERS
from .verdicts import evaluate


def targets(cases):
    """(status, name, detail) for each target whose cases ran: PASS, FAIL, NOISE (within noise
    of the target) or SKIP; see ``verdicts``."""
    return [row[:3] for row in evaluate(cases)]


def fmt_time(s):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if s >= scale or unit == "ns":
            v = s / scale
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}" if v >= 10 else f"{v:.2f} {unit}"


def fmt_ratio(r):
    return f"{r:.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def _cell(res, ratio):
    st = res.get("status")
    if st == "ok":
        return f"{fmt_time(res['median_s'])} {fmt_ratio(ratio)}" if ratio is not None \
            else fmt_time(res["median_s"])
    return {"skipped": "skipped", "n/a": "n/a", "error": "ERROR"}.get(st, "-")


def _table(w, cases, peers, extra=()):
    """The cases' rows: lrfast's median, each peer's median and ratio, % of floor, then the
    ``extra`` columns, (header, function of the case giving the cell)."""
    cols = ["case", "lrfast", *peers, "%floor", *(h for h, _ in extra)]
    rows = []
    for c in cases:
        a = c.analysis
        row = [c.name, _cell(c.results.get("lrfast", {}), None)]
        for p in peers:
            row.append(_cell(c.results.get(p, {}), a.get("ratios", {}).get(p)))
        row.append(f"{a['pct_floor']:.0f}%" if "pct_floor" in a else "")
        row += [cell(c) for _, cell in extra]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [cols]) for i in range(len(cols))]
    fmt_row = lambda r: "  ".join(v.ljust(wd) if i == 0 else v.rjust(wd)   # noqa: E731
                                  for i, (v, wd) in enumerate(zip(r, widths))).rstrip()
    w(fmt_row(cols))
    w(fmt_row(["-" * wd for wd in widths]))
    for r in rows:
        w(fmt_row(r))


def report(cases, machine, floor, settings, out=sys.stdout):
    w = lambda s="": print(s, file=out)            # noqa: E731
    b = machine["build"]
    simd = b["simd"] if isinstance(b["simd"], str) else " ".join(b["simd"]) or "(none)"
    w(f"lrfast bench ({settings['mode']}): medians of {settings['repeats']} interleaved rounds "
      f"({settings['target_rounds']} to {settings['max_rounds']} in cases a target judges), each "
      f"a batch of steps lasting >= {settings['min_sample_s'] * 1e3:.0f} ms")
    w(f"machine: {machine['cpu']}, cpu_count={machine['cpu_count']}, {machine['platform']}")
    tt = machine["torch_threads"]
    w(f"threads: lrfast {machine['lrfast_threads']}, torch {tt if tt is not None else '-'}, "
      f"jax (XLA's own pool); OMP_NUM_THREADS={machine['omp_num_threads_env'] or 'unset'}")
    w(f"build: lrfast {b['lrfast']}, kernels {b['kernel_build']} (available: "
      f"{' '.join(b['kernel_builds_available'])}), simd {simd}, openmp {b['openmp']}")
    other = machine.get("other_processes_cores")
    if other is not None:
        w(f"other processes: {other:.2f} cores busy on average during the run" +
          ("  ** timings are disturbed **" if other > 0.25 else ""))
    w("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in machine["versions"].items()))
    if floor:
        w(f"floor: triad {floor['triad_gbs']:.1f} GB/s (4 transfers/elem), in-place "
          f"{floor['inplace_gbs']:.1f} GB/s (3 transfers/elem) -> {floor['floor_gbs']:.1f} GB/s "
          f"({floor['elements'] // 2**20}M float32, {floor['threads']} thread{'s' if floor['threads'] != 1 else ''})")
    w()
    table = [c for c in cases if c.kind not in ("threads", "lowp", "state", "average",
                                                "embedding")]
    embedding = [c for c in cases if c.kind == "embedding"]
    lowp = [c for c in cases if c.kind == "lowp"]
    state = [c for c in cases if c.kind == "state"]
    average = [c for c in cases if c.kind == "average"]
    if table:
        _table(w, table, PEERS)
        w()
        w("Peer cells: median time, then peer/lrfast (>1: lrfast faster). torch-loop is "
          "foreach=False,")
        w("  torch's CPU default; in 'schedule scalar' it is CosineAnnealingLR.step().")
        w("  'flat' rows: lrfast.FlatParams, peers shared with the list row of the same size.")
        if floor:
            w("%floor: (bytes moved per step / floor bandwidth) / lrfast median, for 1M+ elements. "
              "Over 100%")
            w("  means the triad probe is pessimistic for that size (1M and 200x10k can stay in "
              "the last-level")
            w("  cache, the probe's arrays do not), not a step faster than memory.")
    if lowp:
        if table:
            w()
        w("Low precision and offload (Adam, lr 1e-3, no weight decay):")
        _table(w, lowp, [p for p in LOWP_PEERS if any(
            c.results.get(p, {}).get("status") not in (None, "n/a") for c in lowp)])
        w()
        for name in dict.fromkeys(c.dtype for c in lowp):
            v = VARIANTS[name]
            w(f"  {name}: {v.note}, {v.bytes_per_element} B/element moved")
        w("  torch-offload: master.grad = g_bf16.float(); opt.step() (fused fp32); "
          "p_bf16.copy_(master);")
        w("  -prealloc: the fp32 grad in a preallocated buffer (gbuf.copy_(g_bf16)). "
          "deepspeed: DeepSpeedCPUAdam.")
    if state:
        if table or lowp:
            w()
        _state_report(w, state)
    if average:
        if table or lowp or state:
            w()
        _average_report(w, average)
    if embedding:
        if table or lowp or state or average:
            w()
        _embedding_report(w, embedding)
    if table or lowp or state or average or embedding:
        reasons: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
        for c in table + lowp + state + average + embedding:
            for impl, r in c.results.items():
                st, why = r.get("status"), r.get("reason")
                if st not in ("skipped", "n/a", "error") or not why or why.startswith("no "):
                    continue
                entry = reasons.setdefault((st, why), ([], []))
                if impl not in entry[0]:
                    entry[0].append(impl)
                entry[1].append(c.name)
        for (st, why), (impls, names) in reasons.items():
            where = names[0] if len(set(names)) == 1 else f"{len(set(names))} cases"
            w(f"{st}: {', '.join(impls)}: {why} [{where}]")
    for c in cases:
        if c.kind == "threads":
            r1, r2 = c.results.get("lrfast-1t", {}), c.results.get("lrfast-2t", {})
            if r1.get("status") == "ok" and r2.get("status") == "ok":
                w(f"thread scaling: {c.name}: 1 thread {fmt_time(r1['median_s'])}, "
                  f"2 threads {fmt_time(r2['median_s'])}, speedup {c.analysis['speedup']:.2f}x")
            else:
                w(f"thread scaling: {c.name}: {r1.get('reason') or r2.get('reason') or 'not run'}")
    tg = targets(cases)
    if tg:
        w()
        w("targets (median of per-round values [95% interval]):")
        for st, name, detail in tg:
            w(f"  {st:<5}  {name}: {detail}")
        w("  PASS: the whole interval meets the target. FAIL: it misses it by more than such a")
        w("  case varies between runs on this project's machine (x spread). NOISE: neither; this")
        w("  run cannot tell. SKIP: not judged, what it compares with did not run (a peer absent:")
        w("  see the skipped lines). Values are per round: lrfast and the peer (or the floor probe)")
        w("  timed in turn.")
    return tg


def _state_report(w, cases):
    """The state cases' table (8-bit and bf16 moments), its columns, and the state each peer
    holds."""
    def floor_cell(c):
        return fmt_time(c.analysis["floor_s"]) if "floor_s" in c.analysis else ""

    def bytes_cell(c):
        b = c.analysis.get("state_bytes_per_param", {}).get("lrfast")
        return f"{b:.3f}" if b is not None else ""

    w("Optimizer state in 8 and 16 bits (Adam on float32 params, lr 1e-3, no weight decay):")
    _table(w, cases, [p for p in STATE_PEERS if any(
        c.results.get(p, {}).get("status") not in (None, "n/a") for c in cases)],
           extra=(("floor", floor_cell), ("state B/param", bytes_cell)))
    w()
    for name in dict.fromkeys(c.dtype for c in cases):
        v = STATE_VARIANTS[name]
        moved = v.bytes_per_step((INT8_BLOCK * 4096,)) / (INT8_BLOCK * 4096)
        w(f"  state-{name}: {v.note}, {moved:g} B/element moved")
    w("  B/element moved: param, grad and both moments read, param and both moments written (no")
    w("  write-allocate), 8-bit moments' float32 block scales read and written too. floor: those")
    w("  bytes / the floor bandwidth. state B/param: lrfast.Adam's state_bytes() / params.")
    w("  lrfast-f32: lrfast.Adam with float32 state timed beside each row (its time / the row's:")
    w("  > 1 where the row's state is faster). torch-fused: torch.optim.Adam(fused=True);")
    w("  bnb-adam8bit: bitsandbytes.optim.Adam8bit; torchao-adamw8bit: torchao.optim.AdamW8bit")
    w("  (weight_decay=0); these three run once per size, the size's other rows share them.")
    for size in dict.fromkeys(c.size for c in cases):
        held: dict[str, float] = {}
        for c in cases:
            if c.size != size:
                continue
            for p, b in c.analysis.get("state_bytes_per_param", {}).items():
                if p not in ("lrfast", "lrfast-f32"):
                    held.setdefault(p, b)
        if held:
            w(f"  state B/param held by the peers ({size}, from their state tensors): " +
              ", ".join(f"{p} {b:.3f}" for p, b in held.items()))


def _average_report(w, cases):
    """The weight-average cases' table, what its columns are, and the cost of ema=."""
    w(f"Weight averages (EMA, decay {EMA_DECAY}):")
    _table(w, cases, [p for p in AVERAGE_PEERS if any(
        c.results.get(p, {}).get("status") not in (None, "n/a") for c in cases)])
    w()
    w("  ema rows: lrfast is Averager.update() (transformer: over NumPy views of the model's")
    w("  torch tensors, t.detach().numpy()). torch-ema-fn: torch's get_ema_multi_avg_fn(decay)")
    w("  on the param lists (torch._foreach_lerp_); timm-ema-v3: ModelEmaV3(model, decay)"
      ".update(model);")
    w("  lrfast.torch: lrfast.torch.ema_multi_avg_fn(decay) on the same lists.")
    w("  adam+ema row: lrfast is lrfast.Adam(params, ema=Averager(params)).step (the average fused")
    w("  into the step's pass); no-ema: the step alone; separate: the step, then avg.update();")
    w("  torch-fused+ema: torch.optim.Adam(fused=True).step(), then torch's EMA function.")
    for c in cases:
        ratios = c.analysis.get("ratios", {})
        if "lrfast.torch" in ratios and "torch-ema-fn" in ratios:
            w(f"  {c.name}: torch-ema-fn / lrfast.torch "
              f"{fmt_ratio(ratios['torch-ema-fn'] / ratios['lrfast.torch'])}")
        cost = c.analysis.get("extra_cost_pct")
        if not cost:
            continue
        size = DTYPES[c.dtype]().itemsize
        plain = OPTIMIZERS[c.opt].transfers * size
        parts = []
        for name, what, separate in (("ema=", "ema= (fused)", False),
                                     ("separate", "a separate update()", True)):
            if name in cost:
                moved = average_transfers(c.opt, separate) * size
                parts.append(f"{what} {cost[name]:+.1f}% (bytes {moved} vs {plain} per element: "
                             f"{c.analysis['extra_bytes_pct'][name]:+.1f}%)")
        w(f"  {c.name}: extra time over the step alone: " + "; ".join(parts))


def _embedding_report(w, cases):
    """The embedding cases' table: one sparse step of each, the unique rows its lookups touch
    and lrfast's time per unique row."""
    def unique_cell(c):
        u = c.analysis.get("unique_rows")
        return f"{u:.0f}" if u is not None else ""

    def per_row_cell(c):
        ns = c.analysis.get("ns_per_unique_row", {}).get("lrfast")
        return f"{ns:.0f} ns" if ns is not None else ""

    w("Embedding tables (one sparse step: merge the duplicate lookups, update the touched rows):")
    _table(w, cases, [p for p in EMBEDDING_PEERS if any(
        c.results.get(p, {}).get("status") not in (None, "n/a") for c in cases)],
           extra=(("unique rows", unique_cell), ("lrfast/unique row", per_row_cell)))
    w()
    first = next((c.analysis for c in cases if "lookups" in c.analysis), None)
    if first:
        w(f"  {first['lookups']} lookups per batch drawn from Zipf(a) folded into the table (a 1.2, "
          f"or as named), {first['batches']} prebuilt batches")
        w("  stepped in turn, float32 gradient rows; unique rows: the mean over the batches.")
    w("  lrfast: SparseSGD, SparseAdagrad, RowWiseAdagrad, SparseAdam (.step(indices, grads)).")
    w("  torch-sparse: torch.optim's SGD, Adagrad, SparseAdam on an nn.Parameter table whose .grad")
    w("  is the batch's prebuilt uncoalesced sparse COO tensor (its coalesce inside step() counts).")
    w("  fbgemm-rowwise: FBGEMM's CPU EXACT_ROWWISE_ADAGRAD, forward + backward of bags of one.")
    w("  lrfast-64k: the 4M-row step's lookups remapped onto 64k rows (same unique rows).")
    per_row = {c.name: c.analysis["ns_per_unique_row"]["lrfast"] for c in cases
               if c.opt == "adagrad" and "lrfast" in c.analysis.get("ns_per_unique_row", {})}
    if len(per_row) > 1:
        w("  SparseAdagrad time per unique row: " +
          ", ".join(f"{name.split(' ', 2)[2]} {ns:.0f} ns" for name, ns in per_row.items()) +
          f" (max/min {max(per_row.values()) / min(per_row.values()):.2f})")


def write_plot(cases, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [c for c in cases if c.analysis.get("ratios")]
    if not rows:
        raise ValueError("no case has a peer measurement to plot")
    peers = [p for p in dict.fromkeys(PEERS + LOWP_PEERS + STATE_PEERS + AVERAGE_PEERS
                                         + EMBEDDING_PEERS)
             if any(p in c.analysis["ratios"] for c in rows)]
    height = 0.8 / max(len(peers), 1)
    fig = Figure(figsize=(9, 1.0 + 0.32 * len(rows) * max(1, len(peers) / 2.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for j, p in enumerate(peers):
        ys = [i + (j - (len(peers) - 1) / 2) * height for i in range(len(rows))]
        vals = [c.analysis["ratios"].get(p, float("nan")) for c in rows]
        ax.barh(ys, vals, height=height, label=p)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([c.name for c in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("speed-up of lrfast (peer time / lrfast time, log scale; > 1: lrfast faster)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    fig.savefig(path, format=fmt, bbox_inches="tight")


def to_json(cases, machine, floor, settings, wall):
    out_cases = []
    for c in cases:
        entry = {"name": c.name, "kind": c.kind, "optimizer": c.opt, "dtype": c.dtype,
                 "size": c.size, "tensors": len(c.sizes) if c.sizes else None,
                 "elements": c.elements or None, "bytes_per_step": c.bytes_per_step,
                 "results": c.results, "floor_probe": c.probe, "rounds": c.rounds,
                 "wall_s": c.wall_s}
        entry.update(c.analysis)
        out_cases.append(entry)
    return {"lrfast_bench": 1, "settings": settings, "machine": machine, "floor": floor,
            "cases": out_cases,
            "targets": [{"status": s, "name": n, "detail": d, "parts": parts}
                        for s, n, d, parts in evaluate(cases)],
            "wall_s": wall}

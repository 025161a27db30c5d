"""``python -m lrfast bench``: smoke runs on tiny case selections (a few seconds in all).

Each run is a subprocess in a temporary directory importing the lrfast these tests import.
Peers that are not installed, or hidden here through ``sys.modules``, must come out as
"skipped", never as failures.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

import lrfast

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(lrfast.__file__)))
PEERS = ("numpy-ref", "torch-loop", "torch-foreach", "torch-fused", "optax-jit")
ONE_K = "^adam f32 1k$"


def run_bench(tmp_path, *args, hide=()):
    """``python -m lrfast bench ARGS`` in tmp_path; ``hide`` names modules made unimportable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_PARENT, env.get("PYTHONPATH")) if p)
    env.pop("MPLBACKEND", None)
    if hide:
        code = ("import sys\n"
                f"for name in {list(hide)!r}:\n    sys.modules[name] = None\n"
                "from lrfast.__main__ import main\n"
                f"sys.exit(main(['bench', *{list(args)!r}]))")
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "lrfast", "bench", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)


def table_row(stdout, case):
    rows = [line for line in stdout.splitlines() if line.startswith(case + "  ")]
    assert len(rows) == 1, stdout
    return rows[0]


def test_list_selects_cases(tmp_path):
    proc = run_bench(tmp_path, "--list", "--quick", "--cases", "adam f32")
    assert proc.returncode == 0, proc.stderr
    names = proc.stdout.split("\n")
    for name in ("adam f32 1k", "adam f32 16M", "adam f32 1000x256", "adam f32 1000x256 flat",
                 "adam f32 200x10k", "adam f32 1M threads 1->2"):
        assert name in names
    assert not any("f64" in n or n.startswith("adamw") for n in names)
    full = run_bench(tmp_path, "--list").stdout.split("\n")
    assert "adam f64 16M" in full and "schedule vector 1e7" in full
    assert "adam f64 16M" not in run_bench(tmp_path, "--list", "--quick").stdout


def test_quick_run_table_json_and_plot(tmp_path):
    plot = importlib.util.find_spec("matplotlib") is not None
    args = ["--quick", "--cases", f"{ONE_K}|schedule scalar", "--json", "out.json"]
    if plot:
        args += ["--plot", "out.png"]
    proc = run_bench(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Traceback" not in proc.stderr
    assert out.startswith("lrfast bench (quick)")
    assert f"kernels {lrfast._dispatch.name}" in out and "cpu_count=" in out
    header = next(line for line in out.splitlines() if line.startswith("case "))
    for col in ("lrfast", *PEERS, "%floor"):
        assert col in header
    assert table_row(out, "adam f32 1k").split()[4] in ("ns", "us", "ms")
    assert "\ntargets (" in out and "Adam.step f32 1k" in out

    data = json.loads((tmp_path / "out.json").read_text())
    assert data["settings"]["mode"] == "quick" and data["settings"]["repeats"] == 5
    assert data["machine"]["cpu_count"] == os.cpu_count()
    assert data["machine"]["build"]["kernel_build"] == lrfast._dispatch.name
    assert data["floor"] is None            # no memory-bound case selected
    cases = {c["name"]: c for c in data["cases"]}
    assert set(cases) == {"adam f32 1k", "schedule scalar"}
    adam = cases["adam f32 1k"]
    assert adam["bytes_per_step"] == 1024 * 28
    base = adam["results"]["lrfast"]
    # A case a target judges: at least target_rounds interleaved rounds, numbered.
    assert data["settings"]["target_rounds"] >= 5
    assert base["status"] == "ok" and base["median_s"] > 0
    settings = data["settings"]
    assert settings["target_rounds"] <= len(base["samples_s"]) <= settings["max_rounds"]
    assert base["rounds"] == sorted(set(base["rounds"]))
    assert len(base["rounds"]) == len(base["samples_s"])
    assert adam["rounds"] >= len(base["samples_s"])
    assert cases["schedule scalar"]["results"]["lrfast"]["rounds"] == [0, 1, 2, 3, 4]  # not judged
    for peer in PEERS:
        res = adam["results"][peer]
        assert res["status"] in ("ok", "skipped"), res
        if res["status"] == "ok":
            assert adam["ratios"][peer] == pytest.approx(res["median_s"] / base["median_s"])
        else:
            assert res["reason"] and peer not in adam["ratios"]
    assert cases["schedule scalar"]["results"]["torch-fused"]["status"] == "n/a"
    assert cases["schedule scalar"]["results"]["numpy-ref"]["status"] == "ok"
    statuses = {t["name"]: t["status"] for t in data["targets"]}
    assert statuses and set(statuses.values()) <= {"PASS", "FAIL", "NOISE", "SKIP"}
    (target,) = [t for t in data["targets"] if t["name"].startswith("Adam.step f32 1k")]
    for part in target["parts"]:
        if part["status"] != "SKIP":
            assert part["lo"] <= part["value"] <= part["hi"] and part["confidence"] >= 0.95
            assert part["spread"] >= 1.1
    assert "targets (median of per-round values [95% interval]):" in out
    if plot:
        assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_peers_are_skipped(tmp_path):
    proc = run_bench(tmp_path, "--quick", "--cases", f"{ONE_K}|threads", "--no-optax",
                     "--json", "out.json", hide=("torch",))
    assert proc.returncode == 0, proc.stderr
    row = table_row(proc.stdout, "adam f32 1k")
    # torch's three paths and optax skipped; no "original" peer for Adam (torch.optim has it)
    assert row.split()[-5:] == ["skipped"] * 4 + ["n/a"]
    assert "torch-loop, torch-foreach, torch-fused: torch not installed" in proc.stdout
    assert "optax-jit: --no-optax" in proc.stdout
    assert "thread scaling: adam f32 1M threads 1->2: 1 thread" in proc.stdout
    data = json.loads((tmp_path / "out.json").read_text())
    cases = {c["name"]: c for c in data["cases"]}
    res = cases["adam f32 1k"]["results"]
    assert res["numpy-ref"]["status"] == "ok"
    assert {res[p]["status"] for p in PEERS[1:] if p != "original"} == {"skipped"}
    assert res["original"]["status"] == "n/a"
    assert res["torch-fused"]["reason"] == "torch not installed"
    assert data["machine"]["versions"]["torch"] is None
    assert cases["adam f32 1M threads 1->2"]["speedup"] > 0
    target = next(t for t in data["targets"] if t["name"].startswith("Adam.step f32 1k"))
    # The torch part is skipped, so the target cannot pass; its other part (lrfast's own time)
    # decides between SKIP, FAIL and, on a busy machine, NOISE.
    assert "torch-loop/lrfast skipped" in target["detail"]
    assert [p["status"] for p in target["parts"] if p["label"].startswith("torch")] == ["SKIP"]
    assert target["status"] in ("SKIP", "FAIL", "NOISE")


def test_flatparams_case(tmp_path):
    proc = run_bench(tmp_path, "--quick", "--cases", "^adam f32 1000x256 flat$", "--no-torch",
                     "--no-optax", "--json", "out.json")
    assert proc.returncode == 0, proc.stderr
    (case,) = json.loads((tmp_path / "out.json").read_text())["cases"]
    res = case["results"]["lrfast"]
    if hasattr(lrfast, "FlatParams"):
        assert res["status"] == "ok" and case["ratios"]["numpy-ref"] > 0
    else:
        assert res == {"status": "skipped", "reason": "FlatParams not available"}
        assert "FlatParams not available" in proc.stdout


def test_plot_without_matplotlib_exits_2_before_running(tmp_path):
    proc = run_bench(tmp_path, "--quick", "--cases", ONE_K, "--plot", "x.png",
                     hide=("matplotlib",))
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "matplotlib" in err and "Traceback" not in err
    assert "lrfast bench (" not in proc.stdout
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--cases", "no such case"], "matches no case"),
    (["--cases", "adam("], "not a valid regular expression"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--repeats", "0"], "--repeats must be at least 1"),
])
def test_bad_options(tmp_path, args, fragment):
    proc = run_bench(tmp_path, "--quick", *args)
    assert proc.returncode == 2
    assert fragment in proc.stderr and "Traceback" not in proc.stderr


def test_weight_average_cases(tmp_path):
    """The EMA over the transformer's 110 tensors gets a table of its own; its peers run or
    are skipped with the reason (lrfast.torch's ema_multi_avg_fn may not exist yet)."""
    proc = run_bench(tmp_path, "--quick", "--cases", "^ema f32 transformer$", "--no-optax",
                     "--json", "out.json")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Weight averages (EMA, decay 0.999):" in out
    header = next(line for line in out.splitlines() if line.startswith("case "))
    assert "torch-ema-fn" in header and "numpy-ref" in header and "no-ema" not in header
    table_row(out, "ema f32 transformer")
    (case,) = json.loads((tmp_path / "out.json").read_text())["cases"]
    assert case["kind"] == "average" and case["tensors"] == 110
    assert case["bytes_per_step"] == 12 * case["elements"]
    res = case["results"]
    assert res["lrfast"]["status"] == "ok" and res["numpy-ref"]["status"] == "ok"
    assert {res[p]["status"] for p in ("no-ema", "separate", "torch-fused+ema")} == {"n/a"}
    for peer in ("torch-ema-fn", "timm-ema-v3", "lrfast.torch"):
        assert res[peer]["status"] in ("ok", "skipped"), res[peer]
        assert (res[peer]["status"] == "ok") == (peer in case["ratios"])
    assert "EMA update, 110-tensor transformer >= 5x torch's EMA function" in out


def test_weight_average_cases_without_torch(tmp_path):
    """Without torch the lrfast side still runs (on NumPy arrays of the transformer's sizes),
    and Adam's step with ema= is timed against the step alone and a separate update()."""
    proc = run_bench(tmp_path, "--quick", "--cases", "^(ema f32 transformer|adam\\+ema f32 16M)$",
                     "--no-optax", "--json", "out.json", hide=("torch",))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "torch-ema-fn, timm-ema-v3, lrfast.torch, torch-fused+ema: torch not installed" in out
    cases = {c["name"]: c for c in json.loads((tmp_path / "out.json").read_text())["cases"]}
    ema = cases["ema f32 transformer"]["results"]
    assert ema["lrfast"]["status"] == "ok" and ema["torch-ema-fn"]["status"] == "skipped"
    fused = cases["adam+ema f32 16M"]
    assert fused["bytes_per_step"] == 36 * 16 * 2**20
    assert {p: fused["results"][p]["status"] for p in ("lrfast", "no-ema", "separate")} == \
        dict.fromkeys(("lrfast", "no-ema", "separate"), "ok")
    assert fused["results"]["torch-fused+ema"]["status"] == "skipped"
    assert set(fused["extra_cost_pct"]) == {"ema=", "separate"}
    assert fused["extra_bytes_pct"]["ema="] == pytest.approx(200 / 7)
    assert "adam+ema f32 16M: extra time over the step alone: ema= (fused) " in out
    assert "Adam with ema= f32 16M <= +30% over Adam alone" in out

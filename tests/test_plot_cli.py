"""``python -m lrfast plot`` and the spec reader behind it (``lrfast._plot.parse_spec``)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import lrfast
from lrfast import schedules as S
from lrfast._plot import SpecError, allowed_functions, label, parse_spec, parse_specs

# The directory holding the imported lrfast package: the checkout, or site-packages when installed.
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(lrfast.__file__)))
STEPS = np.arange(0, 2000, 7, dtype=np.int64)

EXAMPLES = [
    ("warmup_cosine(0.0, 0.1, 100, 1000, end_value=0.001)",
     lambda: S.warmup_cosine(0.0, 0.1, 100, 1000, end_value=0.001)),
    ("join([constant(0.1), linear(0.1, 0.0, 100)], [50])",
     lambda: S.join([S.constant(0.1), S.linear(0.1, 0.0, 100)], [50])),
    ("warmup(cosine_decay(0.1, 1000), 100, start_value=0.01)",
     lambda: S.warmup(S.cosine_decay(0.1, 1000), 100, start_value=0.01)),
    ("cosine_decay(0.1, 500) * 0.5", lambda: S.cosine_decay(0.1, 500) * 0.5),
    ("0.5 * cosine_decay(0.1, 500)", lambda: 0.5 * S.cosine_decay(0.1, 500)),
    ("exponential_decay(0.1, 0.5, 100) * linear(0.0, 1.0, 10)",
     lambda: S.exponential_decay(0.1, 0.5, 100) * S.linear(0.0, 1.0, 10)),
    ("one_cycle(0.1, 1000, anneal_strategy='linear', three_phase=True)",
     lambda: S.one_cycle(0.1, 1000, anneal_strategy="linear", three_phase=True)),
    ("piecewise_constant((100, 200), (0.1, 0.01, 0.001))",
     lambda: S.piecewise_constant([100, 200], [0.1, 0.01, 0.001])),
    ("clamp(linear(0.1, 0.0, 100), min_value=0.01, max_value=None)",
     lambda: S.clamp(S.linear(0.1, 0.0, 100), min_value=0.01, max_value=None)),
    ("  warmup_cosine(0, 1e-1, 10, 100,\n end_value=+1e-3)  ",
     lambda: S.warmup_cosine(0, 0.1, 10, 100, end_value=0.001)),
]


def run_cli(tmp_path, *args, prelude=None):
    """``python -m lrfast ARGS`` in tmp_path, importing the lrfast these tests import."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PKG_PARENT, env.get("PYTHONPATH")) if p)
    env.pop("MPLBACKEND", None)
    if prelude is None:
        cmd = [sys.executable, "-m", "lrfast", *args]
    else:
        code = (f"{prelude}\nimport sys\nfrom lrfast.__main__ import main\n"
                f"sys.exit(main({list(args)!r}))")
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err


# ------------------------------------------------------------------------------------------
# parse_spec
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,build", EXAMPLES, ids=[e[0].strip()[:40] for e in EXAMPLES])
def test_parse_spec_matches_direct_construction(text, build):
    got, want = parse_spec(text), build()
    assert got == want
    assert repr(got) == repr(want)
    np.testing.assert_array_equal(got(STEPS), want(STEPS))
    assert got(12345) == want(12345)


def test_parse_spec_json_object_and_file(tmp_path):
    sched = S.warmup(S.cosine_decay(0.1, 1000), 100, start_value=0.01)
    assert parse_spec(json.dumps(sched.to_dict())) == sched
    one = tmp_path / "one.json"
    one.write_text(json.dumps(sched.to_dict()))
    assert parse_spec(str(one)) == sched
    many = tmp_path / "many.json"
    others = [sched, S.constant(0.1) * S.ReduceLROnPlateau(factor=0.5)]
    many.write_text(json.dumps([s.to_dict() for s in others]))
    got = parse_specs(str(many))
    assert [s.to_dict() for s in got] == [s.to_dict() for s in others]
    with pytest.raises(SpecError, match="2 schedules"):
        parse_spec(str(many))


UNSAFE = [
    "__import__('os').system('x')",
    "__import__('os')",
    "open('/etc/passwd')",
    "eval('1')",
    "np.pi",
    "constant(0.1).__class__",
    "constant(0.1).__class__.__mro__",
    "lambda: constant(0.1)",
    "(lambda: 1)()",
    "[c for c in ()]",
    "constant(x := 0.1)",
    "constant(0.1 if True else 0.2)",
    "constant(0.1)[0]",
    "constant(0.1) + constant(0.2)",
    "constant(2 ** 3)",
    "constant(f'{1}')",
    "constant(*[0.1])",
    "constant(**{'value': 0.1})",
    "constant(b'x')",
    "Schedule()",
    "ReduceLROnPlateau()",
    "from_dict({'type': 'constant', 'value': 0.1})",
    "foo(1)",
    "constant",
    "x",
    "0.1 * 2",
    "constant(0.1) * True",
    "constant(0.1) * 'a'",
    "-constant(0.1)",
    "constant(0.1); constant(0.2)",
    "import os",
    "0.1",
    "'constant(0.1)'",
    "",
    "{not json",
    '{"value": 0.1}',
    '{"type": "no_such_schedule"}',
]


@pytest.mark.parametrize("text", UNSAFE)
def test_parse_spec_rejects(text):
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert "\n" not in str(info.value)


def test_rejection_runs_nothing(monkeypatch):
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    for text in ("__import__('os').system('x')", "constant(__import__('os').system('x'))"):
        with pytest.raises(SpecError):
            parse_spec(text)
    assert not called


@pytest.mark.parametrize("text,fragment", [
    ("cosine_decay(0.1, -5)", "decay_steps"),
    ("cosine_decay(0.1, 5.5)", "decay_steps"),
    ("warmup_cosine(0.0, 0.1, 100)", "decay_steps"),
    ("constant(0.1, nope=1)", "nope"),
    ("cosine_decay(0.1, 500) * -0.5", "factor"),
    ("join([constant(0.1)], [10])", "boundaries"),
    ('{"type": "cosine_decay", "init_value": 0.1, "decay_steps": -5}', "decay_steps"),
    ('{"type": "join"}', "schedules"),
])
def test_parse_spec_bad_parameters(text, fragment):
    with pytest.raises(SpecError, match=fragment):
        parse_spec(text)


def test_allowed_functions():
    names = set(allowed_functions())
    assert {"warmup_cosine", "join", "warmup", "cosine_decay", "constant", "scale"} <= names
    assert not names & {"ReduceLROnPlateau", "from_dict", "Schedule"}
    assert names <= set(S.__all__)


def test_label_shortens_long_reprs():
    short = S.constant(0.1)
    assert label(short) == repr(short)
    long = S.join([S.warmup_cosine(0.0, 0.1, 100, 1000)] * 6, [10, 20, 30, 40, 50])
    text = label(long)
    assert len(repr(long)) > 300
    assert len(text) < 200 and text.endswith("...") and len(text.splitlines()) <= 2


# ------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------

def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    spec_file = tmp_path / "specs.json"
    spec_file.write_text(json.dumps([S.one_cycle(0.1, 800).to_dict(),
                                     S.constant(0.05).to_dict()]))
    proc = run_cli(tmp_path, "plot", *[e[0] for e in EXAMPLES[:4]],
                   json.dumps(S.cosine_decay(0.2, 300).to_dict()), "specs.json",
                   "--steps", "1000", "-o", "curve.png")
    assert proc.returncode == 0, proc.stderr
    assert "7 schedules" in proc.stdout
    png = tmp_path / "curve.png"
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_log_axis_and_many_steps(tmp_path):
    pytest.importorskip("matplotlib")
    proc = run_cli(tmp_path, "plot", "cosine_decay(0.1, 1000000000, end_value=1e-6)",
                   "--steps", str(10**9), "--log", "-o", "log.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "log.png").stat().st_size > 1000


@pytest.mark.parametrize("spec,fragment", [
    ("__import__('os').system('touch pwned')", "not allowed"),
    ("cosine_decay(0.1, -5)", "decay_steps"),
    ("cosine_decay(0.1", "not a valid expression"),
    ("nonsense(1)", "unknown function"),
    ("missing.json", "missing.json"),
    ('{"type": "constant"', "invalid JSON"),
])
def test_plot_bad_spec_exits_2(tmp_path, spec, fragment):
    proc = run_cli(tmp_path, "plot", spec, "-o", "x.png")
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "x.png").exists()
    assert not (tmp_path / "pwned").exists()


def test_plot_bad_steps_exits_2(tmp_path):
    proc = run_cli(tmp_path, "plot", "constant(0.1)", "--steps", "0", "-o", "x.png")
    assert_one_line_error(proc, "--steps")


def test_plot_without_matplotlib(tmp_path):
    proc = run_cli(tmp_path, "plot", "constant(0.1)", "-o", "x.png",
                   prelude="import sys; sys.modules['matplotlib'] = None")
    assert_one_line_error(proc, 'pip install "lrfast[plot]"', "pip install matplotlib")
    assert not (tmp_path / "x.png").exists()


def test_plot_without_matplotlib_in_process(monkeypatch, tmp_path, capsys):
    from lrfast.__main__ import main

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "x.png"
    assert main(["plot", "constant(0.1)", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert 'pip install "lrfast[plot]"' in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_other_subcommands_still_work(tmp_path):
    proc = run_cli(tmp_path, "config")
    assert proc.returncode == 0, proc.stderr
    assert "lrfast" in proc.stdout

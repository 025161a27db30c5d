"""``python -m lrfast plot``: draw schedules into an image file.

A schedule spec is one of

* a call expression over the public schedule functions, e.g.
  ``"warmup(cosine_decay(0.1, 1000), 100, start_value=0.01)"`` or
  ``"cosine_decay(0.1, 500) * 0.5"``. It is read with :mod:`ast` and evaluated node by node;
  nothing is passed to ``eval``. Allowed: calls of the functions listed in
  ``lrfast.schedules.__all__`` (not ``from_dict``; classes such as ``ReduceLROnPlateau`` are
  not functions), int / float / bool / None / str constants, unary minus on a number, lists,
  tuples, keyword arguments, and ``*`` between a schedule and a number or another schedule;
* a JSON object as written by ``Schedule.to_dict()``;
* the path of a ``.json`` file holding such an object or a list of them.

matplotlib is optional: it is imported only when a figure is drawn, through its Agg canvas
(no pyplot, no global backend change).
"""
from __future__ import annotations

import ast
import inspect
import json
import os
import sys
import textwrap

import numpy as np

from . import schedules as _schedules

__all__ = ["SpecError", "parse_spec", "parse_specs", "plot_schedules", "allowed_functions"]

MISSING_MATPLOTLIB = ('plotting needs matplotlib, which is not installed: '
                      'pip install "lrfast[plot]" (or pip install matplotlib)')

_EXCLUDED = {"from_dict", "ReduceLROnPlateau", "Schedule"}
# Most points drawn per curve: longer ranges are sampled evenly (always including both ends).
_MAX_POINTS = 200_000
_MAX_STEPS = 2**62
# Errors a schedule function or from_dict may raise on bad parameters.
_BUILD_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)


class SpecError(ValueError):
    """A schedule spec that cannot be read, or whose parameters are rejected."""


def allowed_functions():
    """Name -> function for every schedule function a call expression may use."""
    out = {}
    for name in getattr(_schedules, "__all__", ()):
        obj = getattr(_schedules, name, None)
        if name in _EXCLUDED or name.startswith("_") or not inspect.isfunction(obj):
            continue
        out[name] = obj
    return out


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(v):
    return "schedule" if isinstance(v, _schedules.Schedule) else type(v).__name__


def _where(node):
    return f" (column {node.col_offset + 1})" if hasattr(node, "col_offset") else ""


class _Evaluator:
    def __init__(self, text):
        self.text = text
        self.functions = allowed_functions()

    def fail(self, node, what):
        raise SpecError(f"{what}{_where(node)}")

    def snippet(self, node, limit=40):
        seg = ast.get_source_segment(self.text, node) or type(node).__name__
        return seg if len(seg) <= limit else seg[:limit - 3] + "..."

    def eval(self, node):
        if isinstance(node, ast.Constant):
            v = node.value
            if v is None or isinstance(v, (bool, int, float, str)):
                return v
            self.fail(node, f"constant {self.snippet(node)!s} is not allowed "
                            "(only int, float, bool, None and str)")
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self.eval(e) for e in node.elts]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self.eval(node.operand)
            if not _is_number(v):
                self.fail(node, "unary minus / plus applies only to a number")
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            return self.multiply(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Name):
            if node.id in self.functions:
                self.fail(node, f"{node.id} must be called, e.g. {node.id}(...)")
            self.fail(node, f"unknown name {node.id!r}")
        if isinstance(node, ast.Attribute):
            self.fail(node, f"attribute access ({self.snippet(node)}) is not allowed")
        self.fail(node, f"{type(node).__name__} expression ({self.snippet(node)}) is not allowed; "
                        "use schedule calls, constants, lists and '*'")

    def multiply(self, node):
        a, b = self.eval(node.left), self.eval(node.right)
        sched = _schedules.Schedule
        ok = ((isinstance(a, sched) and (isinstance(b, sched) or _is_number(b)))
              or (isinstance(b, sched) and _is_number(a)))
        if not ok:
            self.fail(node, "'*' needs a schedule and a number or another schedule, got "
                            f"{_kind(a)} * {_kind(b)}")
        try:
            return a * b
        except _BUILD_ERRORS as e:
            self.fail(node, f"{self.snippet(node)}: {e}")

    def call(self, node):
        func = node.func
        if not isinstance(func, ast.Name):
            if isinstance(func, ast.Attribute):
                self.fail(func, f"attribute access ({self.snippet(func)}) is not allowed")
            self.fail(func, "only schedule functions may be called, by name")
        name = func.id
        if name not in self.functions:
            if name in getattr(_schedules, "__all__", ()):
                self.fail(func, f"{name} cannot be used in a spec (a JSON spec can hold any "
                                "to_dict() output)")
            self.fail(func, f"unknown function {name!r}; allowed: "
                            + ", ".join(sorted(self.functions)))
        args = []
        for a in node.args:
            if isinstance(a, ast.Starred):
                self.fail(a, "*args are not allowed")
            args.append(self.eval(a))
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                self.fail(kw.value, "**kwargs are not allowed")
            kwargs[kw.arg] = self.eval(kw.value)
        try:
            return self.functions[name](*args, **kwargs)
        except _BUILD_ERRORS as e:
            self.fail(node, f"{name}: {e}")


def _from_expression(text):
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        col = f" (column {e.offset})" if e.offset else ""
        raise SpecError(f"not a valid expression{col}: {e.msg}") from None
    except (RecursionError, MemoryError, ValueError) as e:
        why = "too long or nested too deeply" if not isinstance(e, ValueError) else str(e)
        raise SpecError(f"expression cannot be parsed: {why}") from None
    try:
        value = _Evaluator(text.strip()).eval(tree.body)
    except RecursionError:
        raise SpecError("expression is nested too deeply") from None
    if not isinstance(value, _schedules.Schedule):
        raise SpecError(f"the expression gives a {type(value).__name__}, not a schedule")
    return value


def _from_json_value(obj, where):
    if isinstance(obj, list):
        if not obj:
            raise SpecError(f"{where}: the list of schedules is empty")
        return [_from_json_value(o, f"{where}[{i}]") for i, o in enumerate(obj)]
    if not isinstance(obj, dict):
        raise SpecError(f"{where}: expected a schedule object (a dict with a 'type'), "
                        f"got {type(obj).__name__}")
    try:
        return _schedules.from_dict(obj)
    except RecursionError:
        raise SpecError(f"{where}: schedule is nested too deeply") from None
    except _BUILD_ERRORS as e:
        msg = str(e) if not isinstance(e, KeyError) else f"missing key {e}"
        raise SpecError(f"{where}: {msg}") from None


def _load_json(text, where):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"{where}: invalid JSON (line {e.lineno}, column {e.colno}): "
                        f"{e.msg}") from None
    except RecursionError:
        raise SpecError(f"{where}: JSON is nested too deeply") from None


def parse_specs(text):
    """Every schedule ``text`` describes (a JSON file may hold several), as a list."""
    if not isinstance(text, str):
        raise SpecError(f"a spec is a string, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise SpecError("empty schedule spec")
    if stripped.startswith("{"):
        out = _from_json_value(_load_json(stripped, "JSON spec"), "JSON spec")
        return [out]
    if stripped.lower().endswith(".json") or os.path.isfile(stripped):
        try:
            with open(stripped, encoding="utf-8") as f:
                content = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise SpecError(f"cannot read {stripped}: {reason}") from None
        out = _from_json_value(_load_json(content, stripped), stripped)
        return out if isinstance(out, list) else [out]
    return [_from_expression(stripped)]


def parse_spec(text):
    """The schedule described by ``text`` (an expression, a JSON object or a .json file).

    Raises :class:`SpecError` (a ValueError) with a one-line message for anything else,
    including parameters the schedule itself rejects. A file holding a list of several
    schedules is an error here: use :func:`parse_specs`.
    """
    out = parse_specs(text)
    if len(out) != 1:
        raise SpecError(f"{text.strip()} holds {len(out)} schedules; use parse_specs")
    return out[0]


def label(schedule, width=80, max_lines=2):
    """The legend text for a schedule: its repr, wrapped, and shortened when very long."""
    return textwrap.fill(repr(schedule), width=width, max_lines=max_lines, placeholder=" ...",
                         break_long_words=True)


def _steps_to_draw(n):
    if n <= _MAX_POINTS:
        return np.arange(n, dtype=np.int64)
    # Even sampling in integer steps, computed without float rounding at large n.
    idx = np.arange(_MAX_POINTS, dtype=np.int64)
    return np.array([(int(i) * (n - 1)) // (_MAX_POINTS - 1) for i in idx], dtype=np.int64)


def _import_matplotlib():
    """(Figure, FigureCanvasAgg), or None when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def plot_schedules(schedules, steps, output, log=False):
    """Draw each schedule over steps ``0 .. steps-1`` into ``output`` (format from its suffix,
    PNG when it has none). Raises ImportError without matplotlib."""
    mpl = _import_matplotlib()
    if mpl is None:
        raise ImportError(MISSING_MATPLOTLIB)
    Figure, FigureCanvasAgg = mpl
    fig = Figure(figsize=(9, 5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    t = _steps_to_draw(steps)
    for s in schedules:
        ax.plot(t, s(t), linewidth=1.5, label=label(s))
    if log:
        ax.set_yscale("log")
    ax.set_xlim(0, max(steps - 1, 1))
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(True, alpha=0.3)
    # Below the axes, so that long labels never hide a curve.
    legend = ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.12),
                       ncol=1, frameon=False)
    ext = os.path.splitext(output)[1].lower().lstrip(".")
    fmt = ext if ext else "png"
    if fmt not in canvas.get_supported_filetypes():
        raise SpecError(f"cannot write {output!r}: unsupported image format {fmt!r} "
                        f"(supported: {', '.join(sorted(canvas.get_supported_filetypes()))})")
    fig.savefig(output, format=fmt, bbox_inches="tight", bbox_extra_artists=[legend])


def _error(msg):
    print(f"lrfast plot: error: {msg}", file=sys.stderr)


def main(specs, steps, output, log=False):
    """The ``plot`` subcommand; returns the exit status (2: bad input or no matplotlib,
    1: the image could not be written)."""
    if not 1 <= steps <= _MAX_STEPS:
        _error(f"--steps must be between 1 and 2**62, got {steps}")
        return 2
    found = []
    for text in specs:
        try:
            found.extend(parse_specs(text))
        except SpecError as e:
            _error(str(e).replace("\n", " "))
            return 2
    try:
        plot_schedules(found, steps, output, log=log)
    except ImportError:
        _error(MISSING_MATPLOTLIB)
        return 2
    except SpecError as e:
        _error(str(e))
        return 2
    except OSError as e:
        _error(f"cannot write {output!r}: {e.strerror or e}")
        return 1
    n = len(found)
    print(f"wrote {output} ({n} schedule{'s' if n != 1 else ''}, steps 0..{steps - 1})")
    return 0

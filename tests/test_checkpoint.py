"""save_checkpoint / load_checkpoint: exact resume in a fresh process, and refusal of files that
do not fit or are damaged, with nothing changed."""
import os

import numpy as np
import pytest

import lrfast
import resume_driver
from cases import run_python, snapshot
from lrfast import CheckpointError


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Run every (config, dtype, layout) 30 steps and save in one fresh process, resume and run
    100 more steps in a second one."""
    folder = str(tmp_path_factory.mktemp("resume"))
    tests = os.path.dirname(os.path.abspath(__file__))
    for phase in ("save", "resume"):
        # every config in one process: minutes on a loaded 2-core machine, so a long timeout
        out = run_python(f"import resume_driver; resume_driver.main({phase!r}, {folder!r})",
                         timeout=900, PYTHONPATH=tests)
        assert out.returncode == 0, out.stderr[-3000:]
    return folder


def _arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "header"}


@pytest.mark.parametrize("run_id", resume_driver.run_ids())
def test_resume_in_a_fresh_process_is_bitwise_the_uninterrupted_run(resumed, run_id, tmp_path):
    straight = resume_driver.Run(run_id)
    straight.run(0, resume_driver.END)
    mine = tmp_path / "straight.npz"
    lrfast.save_checkpoint(mine, straight.opt)
    final = os.path.join(resumed, f"final-{run_id}.npz")
    got, want = _arrays(final), _arrays(mine)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k
    # The counters, hyper-parameters and plateau state are in the header: restore the resumed
    # run's file into a fresh optimizer and compare those too.
    back = resume_driver.Run(run_id)
    lrfast.load_checkpoint(final, back.opt)
    assert back.opt.step_count == straight.opt.step_count
    assert back.opt.skipped_steps == straight.opt.skipped_steps
    if run_id.endswith("list"):
        assert straight.opt.skipped_steps > 0
    if not straight.scheduled:  # (an optimizer that takes lr only as a number)
        assert back.opt.lr == straight.opt.lr
        return
    assert back.plateau.state_dict() == straight.plateau.state_dict()
    assert back.opt.lr(back.opt.step_count) == straight.opt.lr(straight.opt.step_count)
    if straight.name in ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW"):
        # the plateau acted during the run (the metric, the params' size, plateaus for these
        # within the run; for some later optimizers it keeps falling)
        assert straight.plateau.scale < 1


# --------------------------------------------------------------------------------------------
# Files that do not fit, or are damaged
# --------------------------------------------------------------------------------------------

def _setup(tmp_path):
    params = {"w": np.arange(12.0).reshape(3, 4), "b": np.ones(4)}
    plateau = lrfast.ReduceLROnPlateau(patience=0)
    opt = lrfast.Adam(params, lr=lrfast.schedules.cosine_decay(0.1, 100) * plateau)
    for t in range(3):
        opt.step({"w": np.full((3, 4), 0.1 * t), "b": np.full(4, 0.5)})
        plateau.step(1.0)
    path = tmp_path / "good.npz"
    lrfast.save_checkpoint(path, opt)
    return path


def _target():
    """A fresh optimizer that the good file fits, partly trained so 'unchanged' means something."""
    params = {"w": np.zeros((3, 4)), "b": np.zeros(4)}
    plateau = lrfast.ReduceLROnPlateau(patience=0)
    opt = lrfast.Adam(params, lr=lrfast.schedules.cosine_decay(0.1, 100) * plateau)
    opt.step({"w": np.ones((3, 4)), "b": np.ones(4)})
    return opt, plateau


def _corrupt(data, tmp):
    b = bytearray(data)
    b[len(b) // 2] ^= 0x40
    return bytes(b)


FILE_DAMAGE = [
    ("truncated", lambda data, tmp: data[: len(data) * 2 // 3], "not a readable"),
    ("truncated-tail", lambda data, tmp: data[:-10], "not a readable"),
    ("bit-flip", _corrupt, "not a readable|corrupted"),
    ("empty", lambda data, tmp: b"", "not a readable"),
    ("garbage", lambda data, tmp: os.urandom(500), "not a readable"),
]


@pytest.mark.parametrize("name, damage, pattern", FILE_DAMAGE, ids=[d[0] for d in FILE_DAMAGE])
def test_damaged_file_is_refused_and_changes_nothing(tmp_path, name, damage, pattern):
    path = _setup(tmp_path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(damage(path.read_bytes(), tmp_path))
    opt, plateau = _target()
    before, pstate = snapshot(opt), plateau.state_dict()
    with pytest.raises(CheckpointError, match=pattern):
        lrfast.load_checkpoint(bad, opt)
    assert snapshot(opt) == before and plateau.state_dict() == pstate


def test_byte_flips_anywhere_are_caught_or_harmless(tmp_path):
    """Flip one bit at many positions: the zip CRCs and the SHA-256 digest refuse the file
    (nothing changes), except for flips in bytes that hold no content (zip timestamps), which
    then load exactly what the intact file holds."""
    path = _setup(tmp_path)
    data = path.read_bytes()
    reference, _ = _target()
    lrfast.load_checkpoint(path, reference)
    intact = snapshot(reference)
    positions = range(0, len(data), 23)
    caught = 0
    for pos in positions:
        b = bytearray(data)
        b[pos] ^= 0x01
        (tmp_path / "flip.npz").write_bytes(bytes(b))
        opt, _ = _target()
        before = snapshot(opt)
        try:
            lrfast.load_checkpoint(tmp_path / "flip.npz", opt)
        except CheckpointError:
            caught += 1
            assert snapshot(opt) == before
        else:
            assert snapshot(opt) == intact, pos
    assert caught >= 0.75 * len(positions)


def _tampered_header(tmp_path):
    """A well-formed archive whose header was edited without updating the digest."""
    import json
    path = _setup(tmp_path)
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays["header"].tobytes())
    header["step_count"] = 99
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    out = tmp_path / "tampered.npz"
    np.savez(out, **arrays)
    return out


def _plain_npz(tmp_path):
    out = tmp_path / "plain.npz"
    np.savez(out, a=np.ones(3))
    return out


def _pickled_npz(tmp_path):
    out = tmp_path / "pickled.npz"
    np.savez(out, header=np.array([{"x": 1}], dtype=object))
    return out


def _other_opt(kind):
    params = {"w": np.zeros((3, 4)), "b": np.zeros(4)}
    sched = lrfast.schedules.cosine_decay(0.1, 100) * lrfast.ReduceLROnPlateau(patience=0)
    if kind == "optimizer":
        return lrfast.AdamW(params, lr=sched)
    if kind == "shape":
        return lrfast.Adam({"w": np.zeros((4, 3)), "b": np.zeros(4)}, lr=sched)
    if kind == "dtype":
        return lrfast.Adam({"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)},
                           lr=sched)
    if kind == "keys":
        return lrfast.Adam({"weight": np.zeros((3, 4)), "b": np.zeros(4)}, lr=sched)
    if kind == "count":
        return lrfast.Adam({"w": np.zeros((3, 4))}, lr=sched)
    if kind == "order":
        return lrfast.Adam({"b": np.zeros(4), "w": np.zeros((3, 4))}, lr=sched)
    if kind == "schedule":
        return lrfast.Adam(params, lr=lrfast.schedules.cosine_decay(0.2, 100)
                           * lrfast.ReduceLROnPlateau(patience=0))
    if kind == "plateau-config":
        return lrfast.Adam(params, lr=lrfast.schedules.cosine_decay(0.1, 100)
                           * lrfast.ReduceLROnPlateau(patience=3))
    if kind == "no-plateau":
        return lrfast.Adam(params, lr=lrfast.schedules.cosine_decay(0.1, 100))
    if kind == "amsgrad":
        return lrfast.Adam(params, lr=sched, amsgrad=True)
    if kind == "flat":
        return lrfast.Adam(lrfast.FlatParams({"w": (3, 4), "b": (5,)}, np.float64), lr=sched)
    raise AssertionError(kind)


MISFITS = [
    ("optimizer", "saved by Adam, not AdamW"),
    ("shape", r"parameter 'w' was saved as float64 \(3, 4\)"),
    ("dtype", "was saved as float64"),
    ("keys", "holds the parameters"),
    ("count", "holds the parameters"),
    ("order", "holds the parameters"),
    ("schedule", "was saved with the schedule"),
    ("plateau-config", "schedule|ReduceLROnPlateau"),
    ("no-plateau", "schedule|ReduceLROnPlateau"),
    ("flat", "was saved as float64"),
]


@pytest.mark.parametrize("kind, pattern", MISFITS, ids=[m[0] for m in MISFITS])
def test_file_for_another_run_is_refused_and_changes_nothing(tmp_path, kind, pattern):
    path = _setup(tmp_path)
    opt = _other_opt(kind)
    if isinstance(opt.params, dict) and kind != "flat":
        opt.step({k: np.ones_like(v) for k, v in opt.params.items()})
    else:
        opt.step()
    before = snapshot(opt)
    with pytest.raises(CheckpointError, match=pattern):
        lrfast.load_checkpoint(path, opt)
    assert snapshot(opt) == before


@pytest.mark.parametrize("make, pattern", [
    (_tampered_header, "corrupted"),
    (_plain_npz, "not a readable"),
    (_pickled_npz, "not a readable"),
    (lambda tmp: tmp / "missing.npz", "cannot read"),
])
def test_foreign_or_tampered_file_is_refused(tmp_path, make, pattern):
    path = make(tmp_path)
    opt, _ = _target()
    before = snapshot(opt)
    with pytest.raises(CheckpointError, match=pattern):
        lrfast.load_checkpoint(path, opt)
    assert snapshot(opt) == before


def test_saved_hyperparameters_win_as_in_load_state_dict(tmp_path):
    path = _setup(tmp_path)
    opt = _other_opt("amsgrad")
    lrfast.load_checkpoint(path, opt)
    assert opt.hyperparams["amsgrad"] is False and opt.step_count == 3
    assert set(opt.state_dict()["state"]["w"]) == {"exp_avg", "exp_avg_sq"}


def test_checkpoint_error_is_a_value_error_and_bad_arguments_are_type_errors(tmp_path):
    assert issubclass(CheckpointError, ValueError)
    with pytest.raises(TypeError, match="lrfast optimizer"):
        lrfast.save_checkpoint(tmp_path / "x.npz", object())
    opt, _ = _target()
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        lrfast.save_checkpoint(tmp_path / "x.npz", opt, plateaus=[object()])


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = _setup(tmp_path)
    good = path.read_bytes()
    opt, _ = _target()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        lrfast.save_checkpoint(path, opt)
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["good.npz"]


def test_file_holds_no_pickled_objects_and_a_standalone_plateau_is_saved(tmp_path):
    params = [np.ones(5, np.float32)]
    plateau = lrfast.ReduceLROnPlateau(patience=0)
    opt = lrfast.SGD(params, lr=0.1, momentum=0.9)
    opt.step([np.ones(5, np.float32)])
    plateau.step(2.0)
    plateau.step(3.0)
    lrfast.save_checkpoint(tmp_path / "c.npz", opt, plateaus=[plateau])
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    fresh = lrfast.ReduceLROnPlateau(patience=0)
    other = lrfast.SGD([np.zeros(5, np.float32)], lr=0.1, momentum=0.9)
    lrfast.load_checkpoint(tmp_path / "c.npz", other, plateaus=[fresh])
    assert fresh.state_dict() == plateau.state_dict() and fresh.scale == 0.1
    assert other.params[0].tobytes() == params[0].tobytes()
    with pytest.raises(CheckpointError, match="1 ReduceLROnPlateau, but 0"):
        lrfast.load_checkpoint(tmp_path / "c.npz", other)

"""hypothesis: random valid hyper-parameters, shapes and dtypes, compiled vs reference."""
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from cases import OPTIMIZERS, SPECS, ReferenceRun, assert_state_close  # noqa: E402

unit = st.floats(0.0, 0.999)
positive = st.floats(1e-6, 0.5)


@st.composite
def configs(draw):
    name = draw(st.sampled_from(sorted(OPTIMIZERS)))
    if name in ("AdamWScheduleFree", "SGDScheduleFree"):  # no maximize; 0 < beta < 1
        h = {"lr": draw(positive), "weight_decay": draw(st.sampled_from([0.0, 1e-3, 0.1])),
             "warmup_steps": draw(st.integers(0, 4)), "r": draw(st.floats(0.0, 2.0)),
             "weight_lr_power": draw(st.floats(0.0, 3.0))}
        if name == "SGDScheduleFree":
            h["momentum"] = draw(st.floats(0.01, 0.99))
        else:
            h.update(betas=(draw(st.floats(0.01, 0.999)), draw(unit)),
                     eps=draw(st.floats(1e-8, 1e-3)))
        return name, h
    h = {"lr": draw(positive), "weight_decay": draw(st.sampled_from([0.0, 1e-3, 0.1])),
         "maximize": draw(st.booleans())}
    if name == "SGD":
        h["momentum"] = draw(st.sampled_from([0.0, 0.5, 0.9]))
        if h["momentum"] and draw(st.booleans()):
            h["nesterov"] = True
        else:
            h["dampening"] = draw(st.floats(0.0, 0.9))
    elif name == "Adagrad":
        h.update(lr_decay=draw(st.floats(0.0, 0.1)), eps=draw(st.floats(1e-10, 1e-3)),
                 initial_accumulator_value=draw(st.floats(0.0, 1.0)),
                 eps_inside_sqrt=draw(st.booleans()))
    elif name == "RMSprop":
        h.update(alpha=draw(st.floats(0.0, 0.999)), eps=draw(st.floats(1e-8, 1e-3)),
                 momentum=draw(st.sampled_from([0.0, 0.5, 0.9])), centered=draw(st.booleans()))
    elif "betas" in SPECS[name].arguments:
        h.update(betas=(draw(unit), draw(unit)), eps=draw(st.floats(1e-8, 1e-3)),
                 amsgrad=draw(st.booleans()))
    # Updates with per-step scalar state: NAdam, ASGD
    if name == "NAdam":
        h.update(momentum_decay=draw(st.floats(0.0, 0.1)),
                 decoupled_weight_decay=draw(st.booleans()))
    elif name == "ASGD":
        h.update(lambd=draw(st.floats(0.0, 0.1)), alpha=draw(st.floats(0.0, 1.0)),
                 t0=draw(st.sampled_from([0.0, 2.0, 1e6])))
    # (the options drawn above that this optimizer does not have)
    h = {k: v for k, v in h.items() if k in SPECS[name].arguments}
    return name, h


shapes = st.lists(st.one_of(st.tuples(st.integers(0, 70)),
                            st.tuples(st.integers(0, 9), st.integers(0, 9))),
                  min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(configs(), shapes, st.sampled_from([np.float32, np.float64]), st.integers(0, 2**31 - 1))
def test_random_configs_match_reference(config, shape_list, dtype, seed):
    name, hyper = config
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in shape_list]
    ref = ReferenceRun(name, hyper, params)
    opt = OPTIMIZERS[name](params, **hyper)
    for _ in range(5):
        grads = [(rng.standard_normal(s) * 10.0 ** rng.integers(-3, 3)).astype(dtype)
                 for s in shape_list]
        opt.step(grads)
        ref.step(grads)
    assert_state_close(opt, ref.params, ref.state, dtype)

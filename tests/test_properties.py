"""Property-based tests: malformed arrays and options thrown at the public boundary.

The only outcomes allowed are success or a ``ValueError``/``TypeError`` whose message names what
was wrong — never an error from deep inside torch or Pyro (RuntimeError, IndexError, ...), never
a hang (every call here is tiny). Hypothesis runs without a wall-clock deadline, so that a loaded
machine cannot fail an example.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import lvmkit
from lvmkit.data import load_mnist

D = 3
PROFILE = settings(
    max_examples=60,
    deadline=None,  # a loaded machine must not fail an example (a hang still meets pytest's end)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same examples on every run: CI failures reproduce
)


def mostly(good, bad, *, one_in: int = 8):
    """``good`` most of the time, ``bad`` about once in ``one_in`` draws."""
    return st.integers(1, one_in).flatmap(lambda i: bad if i == 1 else good)


_DTYPES = mostly(
    st.sampled_from([np.float32, np.float64]),
    st.sampled_from([np.float16, np.int64, np.int8, np.uint8, np.bool_, np.complex64]),
    one_in=3,
)
_SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
_FLOATS = mostly(
    st.one_of(st.floats(0, 1), st.floats(-10, 10)),
    st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -1e30, 1e-40]),
    one_in=20,
)


def _cast(value: float, dtype: np.dtype):
    with np.errstate(over="ignore", under="ignore"):  # 1e30 in float16 is inf: fine here
        return dtype.type(value)


@st.composite
def arrays(draw):
    """Numeric arrays: mostly (N, D) floats, sometimes any dtype and shape, NaN and inf too."""
    dtype = np.dtype(draw(_DTYPES))
    shape = draw(mostly(st.tuples(st.integers(0, 6), st.just(D)), _SHAPES, one_in=4))
    if dtype.kind == "f":
        return draw(hnp.arrays(dtype, shape, elements=_FLOATS.map(lambda v: _cast(v, dtype))))
    if dtype.kind in "iu":
        return draw(hnp.arrays(dtype, shape, elements=st.integers(0, 1)))
    return draw(hnp.arrays(dtype, shape))


def _other_inputs():
    return st.one_of(
        st.none(),
        st.text(max_size=5),
        st.lists(st.floats(), max_size=4),
        st.integers(),
        st.just(np.array(["a", "b"])),
        st.just(np.array([object(), object()], dtype=object)),
        st.dictionaries(st.sampled_from(["x", "y", "1bad", ""]), arrays(), max_size=2),
    )


DATA = mostly(st.one_of(arrays(), arrays().map(torch.from_numpy)), _other_inputs(), one_in=6)
_BAD_NUMBER = st.one_of(
    st.integers(-3, 0), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3)
)


def INTS(low=1, high=40):
    return mostly(st.integers(low, high), _BAD_NUMBER, one_in=12)


REALS = mostly(
    st.floats(1e-4, 10), st.one_of(st.floats(allow_nan=True, allow_infinity=True), _BAD_NUMBER)
)
WORDS = mostly(
    st.sampled_from(["elbo", "mean_field"]),
    st.one_of(st.sampled_from(["elbo ", "ELBO", "meanfield", ""]), _BAD_NUMBER),
)
DEVICES = mostly(
    st.sampled_from(["cpu", "auto", "cpu:0"]), st.sampled_from(["cuda:x", "gpu", "meta", "", 3])
)


def _vae(likelihood="bernoulli"):
    torch.manual_seed(0)
    return lvmkit.build_vae(
        lvmkit.VAEConfig(data_dim=D, latent_dim=2, hidden_dims=(4,), likelihood=likelihood)
    )


def _allowed(call):
    """Run ``call``: success, or a ValueError/TypeError with a real message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's warning on non-writable numpy arrays
            call()
    except (ValueError, TypeError) as err:
        assert len(str(err)) > 15, f"an unhelpful message: {err!r}"
        event(f"refused: {type(err).__name__}")
    else:
        event("succeeded")


@PROFILE
@given(data=DATA, likelihood=st.sampled_from(["bernoulli", "gaussian", "gaussian_fixed"]))
def test_fit_on_any_data(data, likelihood):
    model, guide = _vae(likelihood)
    _allowed(lambda: lvmkit.fit(model, guide, data, epochs=1, batch_size=4, progress=False))


@PROFILE
@given(
    epochs=INTS(1, 2),
    batch_size=INTS(),
    lr=REALS,
    objective=WORDS,
    num_particles=INTS(1, 3),
    seed=INTS(0),
    device=DEVICES,
    checkpoint_every=st.one_of(st.none(), INTS()),
    on_nonfinite=mostly(
        st.sampled_from(["raise", "reduce_lr"]), st.one_of(st.just("reduce"), _BAD_NUMBER)
    ),
    # compile=True compiles for seconds per example (its options: test_inputs, test_compiled);
    # None on these few steps is fit's eager default, exactly as a user gets it
    compile=mostly(st.sampled_from([None, False]), _BAD_NUMBER),
)
def test_fit_with_any_options(
    epochs, batch_size, lr, objective, num_particles, seed, device, checkpoint_every,
    on_nonfinite, compile,
):  # fmt: skip
    model, guide = _vae()
    x = torch.bernoulli(torch.full((6, D), 0.5))
    _allowed(
        lambda: lvmkit.fit(
            model,
            guide,
            x,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            objective=objective,
            num_particles=num_particles,
            seed=seed,
            device=device,
            checkpoint_every=checkpoint_every,
            on_nonfinite=on_nonfinite,
            compile=compile,
            progress=False,
        )
    )


@PROFILE
@given(
    data=DATA,
    likelihood=st.sampled_from(["bernoulli", "gaussian"]),
    num_samples=INTS(1, 50),
    max_pairs=st.one_of(st.none(), INTS(1, 100)),
    seed=st.one_of(st.none(), INTS(0)),
)
def test_evaluate_on_any_data_and_options(data, likelihood, num_samples, max_pairs, seed):
    model, guide = _vae(likelihood)
    _allowed(
        lambda: lvmkit.evaluate(
            model, guide, data, num_samples, max_pairs=max_pairs, seed=seed, device="cpu"
        )
    )


@PROFILE
@given(
    split=mostly(st.sampled_from(["train", "valid", "test"]), st.sampled_from(["Test", "", 1])),
    binarization=mostly(st.sampled_from(["none", "static"]), st.sampled_from(["dynamic", 2])),
    seed=INTS(0),
    limit=st.one_of(st.none(), INTS(1, 100)),
)
def test_load_mnist_with_any_options(split, binarization, seed, limit):
    _allowed(lambda: load_mnist(split, binarization=binarization, seed=seed, limit=limit))


@PROFILE
@given(data=mostly(arrays().map(torch.from_numpy), _other_inputs()))
def test_binarize_on_any_input(data):
    _allowed(lambda: lvmkit.binarize(data))


@pytest.mark.parametrize("bad", [float("nan"), -0.5, 1.5])
def test_binarize_names_the_range(bad):
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        lvmkit.binarize(torch.tensor([0.2, bad]))


@PROFILE
@given(
    data=DATA,
    n_components=INTS(1, 4),
    covariance_type=mostly(st.sampled_from(["full", "diag"]), st.sampled_from(["spherical", 0])),
)
def test_gaussian_mixture_on_any_data_and_options(data, n_components, covariance_type):
    from lvmkit.estimators import GaussianMixture

    def fit_and_score():
        gm = GaussianMixture(n_components, covariance_type=covariance_type, max_iter=3)
        gm.fit(data)
        gm.score(data)
        gm.predict(data)

    _allowed(fit_and_score)


@PROFILE
@given(n=INTS(1, 50), noise=REALS, seed=INTS(0))
def test_synthetic_data_sets_with_any_options(n, noise, seed):
    from lvmkit import datasets

    for make in (datasets.make_ring, datasets.make_spiral, datasets.make_moons):
        _allowed(lambda make=make: make(n, noise=noise, seed=seed))

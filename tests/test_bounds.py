"""Bounds of what a user may give: method hyper-parameters and config sizes have documented ranges,
and untrusted structured input (study files, the header of a safetensors export) either loads or is
refused with the project's own one-line error, never another exception.

The properties draw values on both sides of every rule: NaN, infinities, negatives, huge numbers,
strings where numbers belong, floats where integers belong, nested lists and mappings.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arow.config import ConfigError, TrainConfig
from arow.methods import METHODS
from arow.runs import CheckpointError, load_checkpoint
from arow.study.cells import resolve_cells
from arow.study.spec import StudyError, StudySpec

from conftest import fmnist_available

pytestmark = pytest.mark.usefixtures("one_thread")

HUGE = 1e300


# --------------------------------------------------------------------------- documented ranges
def _numeric_hparams():
    for name in METHODS.names():
        for key, hp in METHODS.get(name).hparams.items():
            if hp.type in (int, float) and not hp.choices:
                yield name, key, hp


def test_every_numeric_method_hyper_parameter_has_an_upper_bound_that_holds_its_default():
    found = list(_numeric_hparams())
    assert {k for _, k, _ in found} >= {"lam", "beta", "smoothing", "awp_gamma", "fat_omega", "hat_gamma", "hat_h"}
    for name, key, hp in found:
        assert hp.max is not None, f"{name}: --{key} has no upper bound"
        if hp.default is not None:
            assert (hp.min is None or hp.min <= hp.default) and hp.default <= hp.max, (name, key)
        with pytest.raises(ValueError, match=rf"^--{key.replace('_', '-')} must be <= ") as e:
            hp.check(key, HUGE if hp.type is float else 10**20)
        assert "\n" not in str(e.value)
        assert hp.check(key, hp.max) == hp.max  # the bound itself is allowed


@pytest.mark.parametrize("method,key,value", [("arow", "lam", 100.5), ("trades", "beta", 101), ("mart", "lam", 1e300),
                                              ("arow", "smoothing", 1.0), ("trades", "smoothing", 0.995),
                                              ("trades-awp", "awp_gamma", 1.5), ("fat", "fat_omega", 2.0),
                                              ("hat", "beta", 1e300), ("hat", "hat_gamma", 1e300),
                                              ("hat", "hat_h", 1e300)])
def test_a_hyper_parameter_above_its_bound_is_refused_in_one_line(method, key, value):
    hp = METHODS.get(method).hparams[key]
    with pytest.raises(ValueError, match=rf"^--{key.replace('_', '-')} must be <= [0-9.e+]+, got "):
        hp.check(key, value)


@pytest.mark.parametrize("bad,needle", [(dict(epochs=10**20), "--epochs"), (dict(epochs=10_001), "--epochs"),
                                        (dict(batch_size=10**20), "--batch-size"),
                                        (dict(batch_size=65_537), "--batch-size")])
def test_epochs_and_batch_size_have_upper_bounds(bad, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        TrainConfig(**bad).validate()
    assert "\n" not in str(e.value)
    TrainConfig(epochs=10_000, batch_size=65_536).validate()


@pytest.mark.parametrize("argv,needle", [(["--lam", "1e300"], "--lam must be <= 100"),
                                         (["--method", "hat", "--hat-h", "1e300"], "--hat-h must be <= 100"),
                                         (["--epochs", "100000000000000000000"], "--epochs must be in [1, 10000]")])
def test_arow_train_refuses_a_value_above_its_bound_with_exit_2_and_one_line(tmp_path, argv, needle):
    from arow.cli.commands import main

    if not fmnist_available():
        pytest.skip("Fashion-MNIST not installed")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(["train", *argv, "--limit-train", "60", "--out", str(tmp_path / "run")])
        except SystemExit as e:
            status = e.code
    errors = [line for line in err.getvalue().splitlines() if line.startswith("arow: error:")]
    assert status == 2 and len(errors) == 1 and needle in errors[0], err.getvalue()
    assert "Traceback" not in err.getvalue() and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- values of every kind
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([0, 1, 2, -1, 7, 10**6]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 0.5, 1.5, 2.0, -0.0]),
    st.text(max_size=12),
    st.sampled_from(["", "arow", "trades", "linf", "l2", "0.1", "1e400", "nan", "..", "a/b"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


# --------------------------------------------------------------------------- study files
METHOD_NAMES = ["arow", "trades", "mart", "pgd-at", "hat", "fat", "trades-awp", "natural", "nope"]
CONFIG_KEYS = ["epochs", "batch_size", "lr", "eps", "attack_steps", "step_size", "momentum", "weight_decay",
               "warmup_epochs", "val_size", "seed", "schedule", "norm", "amp", "milestones", "dataset"]


#: numbers of every kind, and the wrong kinds where numbers belong
NUMBERS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 10**20, -1, -0.5, 0, 0.0, 1, 2.5, 3, 0.03,
                     "3", "0.1", "nan", True, None, [1], {"a": 1}]),
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(10**20), max_value=10**20))


@st.composite
def variants(draw, method):
    """A row of ``method`` (a name, or a mapping with hyper-parameters and overrides of any value)."""
    if draw(st.integers(0, 3)) == 0:
        return method
    hparams = sorted(METHODS.get(method).hparams) if method in METHODS.names() else []
    item = {"method": method, "label": f"{method}-{draw(st.integers(0, 99))}",
            "method_args": draw(st.dictionaries(st.sampled_from(hparams or ["unknown"]), NUMBERS, max_size=2)),
            "overrides": draw(st.dictionaries(st.sampled_from(CONFIG_KEYS), NUMBERS, max_size=2))}
    for key in draw(st.lists(st.sampled_from(["label", "aa", "seeds", "method_args", "overrides"]), max_size=1)):
        item[key] = draw(VALUES)
    return item


@st.composite
def studies(draw):
    """A study that is well-formed but for one or two keys (the values inside rows may be anything)."""
    rows = [draw(variants(m)) for m in draw(st.lists(st.sampled_from(METHOD_NAMES), min_size=1, max_size=2))]
    first = rows[0] if isinstance(rows[0], str) else rows[0]["label"]
    d: dict = {"methods": rows, "seeds": draw(st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True)),
               "baseline": first, "attacks": "clean", "aa_n": 0, "eps_curve_n": 0,
               "overrides": draw(st.dictionaries(st.sampled_from(CONFIG_KEYS), NUMBERS, max_size=2))}
    keys = ["methods", "seeds", "overrides", "baseline", "attacks", "aa_n", "eps_curve_n", "eval_n", "guards",
            "allow_guard_failures", "preset", "plan", "unknown_key"]
    for key in draw(st.lists(st.sampled_from(keys), max_size=2)):
        d[key] = draw(st.one_of(NUMBERS, VALUES))
    return d


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(studies())
def test_a_study_either_resolves_or_is_refused_with_a_study_error(d):
    try:
        spec = StudySpec.from_dict(d)
        resolve_cells(spec)
    except StudyError as e:
        assert str(e).strip() and "\n" not in str(e), repr(str(e))


# --------------------------------------------------------------------------- safetensors export headers
def _spec() -> dict:
    return {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "image_size": 28, "mean": None, "std": None,
            "dataset": "fashion-mnist"}


@pytest.fixture(scope="module")
def weights():
    from arow.models import build_model

    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in build_model("small-cnn", num_classes=10, in_channels=1,
                                                        image_size=28).state_dict().items()}


SPEC_KEYS = list(_spec())
THREAT_KEYS = ["norm", "eps", "steps", "step"]


@st.composite
def headers(draw):
    """An export header with some of its entries (or the whole of it) replaced by anything."""
    if draw(st.integers(0, 9)) == 0:
        return draw(VALUES)
    info = {"model_spec": _spec(), "threat": {"norm": "linf", "eps": 0.1, "steps": 10, "step": 0.025},
            "config": {"method": "arow", "dataset": "fashion-mnist"}, "version": "0.4.2"}
    for key in draw(st.lists(st.sampled_from(["model_spec", "threat", "config", "version", "extra"]), max_size=2)):
        info[key] = draw(VALUES)
    for key in draw(st.lists(st.sampled_from(SPEC_KEYS), max_size=2)):
        if isinstance(info.get("model_spec"), dict):
            info["model_spec"][key] = draw(VALUES)
    for key in draw(st.lists(st.sampled_from(THREAT_KEYS), max_size=2)):
        if isinstance(info.get("threat"), dict):
            info["threat"][key] = draw(VALUES)
    return info


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(header=headers())
def test_an_export_header_either_loads_or_is_refused_in_one_line_naming_the_file(tmp_path, weights, header):
    from safetensors.torch import save_file

    from arow.runs.checkpoint import EXPORT_FORMAT

    path = Path(tmp_path) / "model.safetensors"
    save_file(weights, str(path), metadata={"format": EXPORT_FORMAT, "arow": json.dumps(header)})
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        assert str(path) in str(e) and "\n" not in str(e), repr(str(e))
    else:
        assert isinstance(ckpt["model"], dict) and ckpt["exported"] is True

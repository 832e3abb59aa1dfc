"""A RobustBench zoo model by name: ``arow eval --robustbench-model NAME`` builds it with robustbench's own
loader from weights on disk (random ones here, in RobustBench's layout), evaluates it like any other
model, guards included, and refuses, in one line, a missing file (nothing is downloaded), a missing
--trust-code (the checkpoint is a pickle) and a missing robustbench package."""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from arow.cli.commands import main
from arow.evaluation.sources import open_robustbench
from arow.evaluation.zoo import ZooModelError, _robustbench, zoo_entry

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "Addepalli2021Towards_RN18"  # a ResNet-18 of the CIFAR-10 L-inf zoo (the cheapest architecture there)
N = 8


def _needs_robustbench() -> None:
    """Skip without an importable robustbench (pip install -e '.[robustbench]', which needs a torchvision
    that fits the installed torch), saying why."""
    try:
        _robustbench("robustbench.utils")
    except ZooModelError as e:
        pytest.skip(str(e))


def _zoo_model(name: str = NAME, threat_model: str = "Linf") -> torch.nn.Module:
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    torch.manual_seed(0)
    return model_dicts[BenchmarkDataset("cifar10")][ThreatModel(threat_model)][name]["model"]()


def _write_cifar_test(root: Path, n: int = 2 * N) -> None:
    """A CIFAR-10 test batch as the python release pickles it, with random images."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
    with open(d / "test_batch", "wb") as f:
        pickle.dump(batch, f)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """RobustBench's model folder with random weights for NAME (``{"state_dict": ...}``, as its loader reads
    them), and synthetic CIFAR-10 test files."""
    _needs_robustbench()
    root = tmp_path_factory.mktemp("zoo")
    weights = root / "models" / "cifar10" / "Linf" / f"{NAME}.pt"
    weights.parent.mkdir(parents=True)
    state = _zoo_model().state_dict()
    torch.save({"state_dict": state}, weights)
    _write_cifar_test(root / "data")
    return root, state


def _eval(root: Path, *extra: str) -> int:
    return main(["eval", "--robustbench-model", NAME, "--model-dir", str(root / "models"), "--data-dir",
                 str(root / "data"), "--n", str(N), "--attacks", "clean,pgd20", "--device", "cpu", *extra])


def test_zoo_model_is_loaded_by_robustbench_with_the_weights_on_disk(zoo):
    root, state = zoo
    src = open_robustbench(NAME, root / "models", trust_code=True)
    assert (src.kind, src.dataset, src.trained_norm, src.trained_eps) == ("robustbench", "cifar10", "linf", 8 / 255)
    model = src.load("cpu").model
    assert not model.training
    loaded = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_eval_of_a_zoo_model_reports_its_numbers_at_robustbenchs_eps(zoo, capsys):
    root, state = zoo
    assert _eval(root, "--trust-code", "--no-guards") == 0
    out = root / "models" / "cifar10" / "Linf" / f"eval_{NAME}_n{N}.json"
    assert str(out) in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["n"] == N and rep["eps"] == pytest.approx(8 / 255) and rep["norm"] == "linf"
    assert rep["model"] == NAME and rep["source"] == "RobustBench model zoo" and rep["guards_ran"] is False
    # the clean accuracy is the zoo model's own, recomputed here from the same weights and images
    from arow.data import load_dataset

    test = load_dataset("cifar10", root=str(root / "data"), split="test").subset(N)
    model = _zoo_model()
    model.load_state_dict(state)
    with torch.no_grad():
        clean = (model.eval()(test.x).argmax(1) == test.y).float().mean().item()
    assert rep["accuracy"]["clean"] == pytest.approx(clean)
    assert 0 <= rep["accuracy"]["pgd20"] <= rep["accuracy"]["clean"]


def test_guards_run_on_a_zoo_model_and_report(zoo, capsys):
    root, _ = zoo
    code = _eval(root, "--trust-code", "--guards-n", str(N), "--json", str(root / "guarded.json"))
    printed = capsys.readouterr()
    rep = json.loads((root / "guarded.json").read_text())
    assert rep["guards_ran"] is True and {g["name"] for g in rep["guards"]} >= {"finite", "gradients", "large-eps"}
    assert "finite" in printed.out  # the verdicts are printed as soon as the guards have run
    if code == 3:  # a random model may trip a guard: one line, the numbers withheld
        assert rep["error"] and len(printed.err.strip().splitlines()) == 1
    else:
        assert code == 0 and {"clean", "pgd20"} <= set(rep["accuracy"])


def test_missing_weights_are_refused_before_anything_is_fetched(tmp_path, capsys):
    _needs_robustbench()
    assert _eval(tmp_path, "--trust-code") == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = tmp_path / "models" / "cifar10" / "Linf" / f"{NAME}.pt"
    assert len(err) == 1 and str(expected) in err[0] and "downloads nothing" in err[0]
    assert not (tmp_path / "models").exists()  # robustbench's loader never ran (it would create the folder)


def test_zoo_checkpoint_needs_trust(zoo, capsys):
    root, _ = zoo
    assert _eval(root) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pickle" in err[0] and "--trust-code" in err[0]


def test_checkpoint_with_more_than_weights_loads_once_trusted(tmp_path):
    """A checkpoint holding other objects (here the training's arguments) fails PyTorch's weights-only read;
    trusted, it is unpickled fully, as robustbench intends."""
    _needs_robustbench()
    weights = tmp_path / "cifar10" / "Linf" / f"{NAME}.pt"
    weights.parent.mkdir(parents=True)
    state = _zoo_model().state_dict()
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, weights)
    loaded = open_robustbench(NAME, tmp_path, trust_code=True).load("cpu").model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_unknown_names_and_other_data_sets_are_one_line(tmp_path):
    _needs_robustbench()
    with pytest.raises(ZooModelError, match=r"not in RobustBench's cifar10 Linf zoo \(did you mean "
                                            r"Addepalli2021Towards_RN18"):
        zoo_entry("Addepalli2021Towards_RN1", tmp_path)
    with pytest.raises(ZooModelError, match="--dataset must be one of cifar10, cifar100"):
        zoo_entry(NAME, tmp_path, "svhn")
    with pytest.raises(ZooModelError, match="--threat-model must be one of Linf, L2"):
        zoo_entry(NAME, tmp_path, "cifar10", "corruptions")


def test_zoo_model_goes_alone(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--robustbench-model", NAME, "--trust-code"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["arow: error: --robustbench-model names the model to evaluate; drop a model file or run folder"]


def test_missing_robustbench_is_one_line(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "robustbench" or m.startswith("robustbench.")] + ["robustbench"]:
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    assert _eval(tmp_path, "--trust-code") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["arow: error: --robustbench-model needs robustbench: pip install -e '.[robustbench]'"]

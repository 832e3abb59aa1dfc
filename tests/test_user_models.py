"""`arow eval` on models arow did not build: a factory + weights, TorchScript, an exported program."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import fmnist_available

from arow.evaluation.sources import ExportedModel, UserModelError, load_user_model, load_weights

ROOT = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed")

NETS = textwrap.dedent('''
    import torch
    import torch.nn as nn

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))

    class Quantised(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = mlp()
        def forward(self, x):
            return self.m(torch.round(x * 4) / 4)

    def quantised():
        return Quantised()

    def not_a_model():
        return 3
''')


def arow(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "arow", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


@pytest.fixture()
def project(tmp_path):
    (tmp_path / "mynets.py").write_text(NETS)
    sys.path.insert(0, str(tmp_path))
    import importlib

    import mynets
    importlib.reload(mynets)
    yield tmp_path, mynets
    sys.path.remove(str(tmp_path))
    sys.modules.pop("mynets", None)


def test_factory_weights_torchscript_and_export_give_the_same_logits(project):
    tmp, mynets = project
    ref = mynets.mlp()
    with torch.no_grad():
        ref[1].weight.mul_(2.0)  # weights that differ from the factory's fresh ones
    from safetensors.torch import save_file

    save_file(ref.state_dict(), str(tmp / "w.safetensors"))
    torch.save({"state_dict": ref.state_dict()}, tmp / "w.pt")
    torch.jit.script(ref).save(str(tmp / "ts.pt"))
    torch.export.save(torch.export.export(ref.eval(), (torch.rand(2, 1, 28, 28),),
                                          dynamic_shapes=({0: torch.export.Dim("b")},)), str(tmp / "m.pt2"))
    x = torch.rand(5, 1, 28, 28)
    want = ref(x)
    for model in (load_user_model("mynets:mlp", weights=tmp / "w.safetensors"),
                  load_user_model("mynets:mlp", weights=tmp / "w.pt"),
                  load_user_model(tmp / "ts.pt"), load_user_model(tmp / "m.pt2")):
        assert not model.training
        torch.testing.assert_close(model(x), want)
    exported = load_user_model(tmp / "m.pt2")
    assert isinstance(exported, ExportedModel) and exported.train().training  # mode switch does not raise
    with pytest.raises(UserModelError, match="returned int"):
        load_user_model("mynets:not_a_model")
    with pytest.raises(UserModelError, match="cannot import"):
        load_user_model("nosuchpkg.nets:mlp")
    with pytest.raises(UserModelError, match="do not fit"):
        load_weights(nn.Linear(2, 2), tmp / "w.safetensors")
    with pytest.raises(UserModelError, match="a torch.save file, not a model"):
        load_user_model(tmp / "w.pt")


@needs_fmnist
def test_cli_evaluates_a_factory_model_and_its_guards_catch_masking(project):
    tmp, mynets = project
    torch.save(mynets.mlp().state_dict(), tmp / "w.pt")
    r = arow("eval", "--model-factory", "mynets:mlp", "--weights", "w.pt", "--dataset", "fashion-mnist",
             "--eps", "0.1", "--attacks", "clean,pgd5", "--n", "100", "--no-guards", cwd=tmp)
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp / "eval_mlp_n100.json").read_text())
    assert ev["n"] == 100 and ev["subset"] and ev["model"] == "mlp" and ev["eps"] == pytest.approx(0.1)
    assert not ev["guards_ran"]
    r = arow("eval", "--model-factory", "mynets:quantised", "--dataset", "fashion-mnist", "--eps", "0.1",
             "--attacks", "clean,pgd20", "--n", "200", cwd=tmp)
    assert r.returncode == 3 and "tripped" in r.stderr
    r = arow("eval", "--model-factory", "mynets:mlp", "--dataset", "fashion-mnist", cwd=tmp)
    assert r.returncode == 2 and "--eps is required" in r.stderr
    r = arow("eval", "--model-factory", "mynets:mlp", "--eps", "8/255", cwd=tmp)
    assert r.returncode == 2 and "--dataset is required" in r.stderr

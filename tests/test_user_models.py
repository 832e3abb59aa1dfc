"""`arow eval` on models arow did not build: a factory + weights, TorchScript, an exported program;
code from a file runs only with --trust-code, and every flag is checked before anything is loaded."""
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import fmnist_available

from arow.evaluation.sources import (ExportedModel, UserModelError, declared_kind, load_source, load_weights,
                                     open_source)

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


def _export(model: nn.Module, path: Path) -> None:
    torch.export.save(torch.export.export(model.eval(), (torch.rand(2, 1, 28, 28),),
                                          dynamic_shapes=({0: torch.export.Dim("b")},)), str(path))


class Payload:
    """Unpickling this creates ``marker``: what a malicious file would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _live_exported_program(path: Path, marker: Path) -> Path:
    """A real exported program whose sample inputs are replaced by a pickle that creates ``marker``:
    torch.export.load unpickles them with the full unpickler after its safe try fails."""
    good = path.with_name("good.pt2")
    _export(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), good)
    buf = io.BytesIO()
    torch.save(((Payload(marker),), {}), buf)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            out.writestr(info, buf.getvalue() if info.filename.endswith("sample_inputs/model.pt")
                         else src.read(info.filename))
    good.unlink()
    return path


def test_factory_weights_torchscript_and_export_give_the_same_logits(project):
    tmp, mynets = project
    ref = mynets.mlp()
    with torch.no_grad():
        ref[1].weight.mul_(2.0)  # weights that differ from the factory's fresh ones
    from safetensors.torch import save_file

    save_file(ref.state_dict(), str(tmp / "w.safetensors"))
    torch.save({"state_dict": ref.state_dict()}, tmp / "w.pt")
    torch.jit.script(ref).save(str(tmp / "ts.pt"))
    _export(ref, tmp / "m.pt2")
    x = torch.rand(5, 1, 28, 28)
    want = ref(x)
    ds = "fashion-mnist"
    loaded = [load_source(model_factory="mynets:mlp", weights=tmp / "w.safetensors", dataset=ds),
              load_source(model_factory="mynets:mlp", weights=tmp / "w.pt", dataset=ds),
              load_source(tmp / "ts.pt", dataset=ds, trust_code=True),
              load_source(tmp / "m.pt2", dataset=ds, trust_code=True)]
    for lm in loaded:
        assert not lm.model.training and lm.dataset == ds and lm.eps is None and lm.norm is None
        torch.testing.assert_close(lm.model(x), want)
    assert [lm.source.kind for lm in loaded] == ["factory", "factory", "torchscript", "exported-program"]
    assert loaded[0].source.results_path(100, 10000, "linf") == tmp / "eval_w_n100.json"  # named after the weights
    assert loaded[2].source.results_path(10000, 10000, "l2") == tmp / "eval_ts_l2.json"
    assert isinstance(loaded[3].model, ExportedModel) and loaded[3].model.train().training  # mode switch is fine
    with pytest.raises(UserModelError, match="returned int"):
        load_source(model_factory="mynets:not_a_model", dataset=ds)
    with pytest.raises(UserModelError, match="cannot import"):
        load_source(model_factory="nosuchpkg.nets:mlp", dataset=ds)
    with pytest.raises(UserModelError, match="must be pkg.module:function"):
        open_source(model_factory="mynets", dataset=ds)
    with pytest.raises(UserModelError, match="do not fit"):
        load_weights(nn.Linear(2, 2), tmp / "w.safetensors")


def test_code_is_loaded_only_with_trust_code_and_by_its_declared_kind(project):
    tmp, mynets = project
    torch.jit.script(mynets.mlp()).save(str(tmp / "ts.pt"))
    _export(mynets.mlp(), tmp / "m.pt2")
    (tmp / "m.pt").write_bytes((tmp / "m.pt2").read_bytes())  # an exported program named like a checkpoint
    for name in ("ts.pt", "m.pt2"):
        with pytest.raises(UserModelError, match="--trust-code"):
            open_source(tmp / name, dataset="fashion-mnist")
    assert declared_kind(tmp / "ts.pt") == "torchscript" and declared_kind(tmp / "m.pt2") == "exported-program"
    assert declared_kind(tmp / "m.pt") == "checkpoint"  # never sniffed into a program
    assert declared_kind(tmp / "m.pt", "exported-program") == "exported-program"
    for trust in (False, True):
        with pytest.raises(UserModelError, match="not .pt2"):
            open_source(tmp / "m.pt", dataset="fashion-mnist", trust_code=trust)
    m = load_source(tmp / "m.pt", dataset="fashion-mnist", trust_code=True, model_format="exported-program")
    assert isinstance(m.model, ExportedModel)
    with pytest.raises(UserModelError, match="not both"):
        open_source(tmp / "m.pt2", model_factory="mynets:mlp", dataset="fashion-mnist", trust_code=True)
    with pytest.raises(UserModelError, match="--weights goes with --model-factory"):
        open_source(tmp, weights=tmp / "ts.pt")


def test_a_whole_pickled_model_is_refused_with_advice_that_works(project):
    tmp, mynets = project
    torch.save(mynets.mlp(), tmp / "whole.pt")  # torch.save(model): a pickle of the class, not weights
    with pytest.raises(UserModelError) as e:
        open_source(tmp / "whole.pt")
    msg = str(e.value)
    assert "--model-factory" in msg and "--weights" in msg and "convert" not in msg and "Sequential" in msg
    r = arow("eval", "whole.pt", cwd=tmp)
    assert r.returncode == 2 and "--model-factory" in r.stderr and "arow convert" not in r.stderr, r.stderr


def test_a_payload_in_an_exported_program_never_runs_without_trust_code(tmp_path):
    """A .pt2 (or the same zip named .pt) whose loading runs code: refused before anything is read."""
    marker = tmp_path / "PWNED"
    evil = _live_exported_program(tmp_path / "evil.pt2", marker)
    (tmp_path / "zoo_checkpoint.pt").write_bytes(evil.read_bytes())
    for args in (["evil.pt2", "--dataset", "fashion-mnist", "--eps", "0.1"],  # no --trust-code
                 ["evil.pt2"],
                 ["evil.pt2", "--trust-code"],  # --dataset is required: said before loading
                 ["evil.pt2", "--trust-code", "--dataset", "fashion-mnist"],  # --eps is required
                 ["evil.pt2", "--trust-code", "--dataset", "fashion-mnist", "--eps", "0.1", "--n", "0"],
                 ["evil.pt2", "--trust-code", "--dataset", "fashion-mnist", "--eps", "0.1", "--attacks", "pgdx"],
                 ["zoo_checkpoint.pt", "--dataset", "fashion-mnist", "--eps", "0.1"],
                 ["zoo_checkpoint.pt", "--trust-code", "--dataset", "fashion-mnist", "--eps", "0.1"]):
        r = arow("eval", *args, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert not marker.exists(), args
    r = arow("eval", "evil.pt2", "--dataset", "fashion-mnist", "--eps", "0.1", cwd=tmp_path)
    assert "--trust-code" in r.stderr
    r = arow("eval", "evil.pt2", "--trust-code", cwd=tmp_path)
    assert "--dataset is required" in r.stderr
    # the file is live: loading it as an exported program, trusted, runs its payload
    try:
        load_source(evil, dataset="fashion-mnist", trust_code=True)
    except UserModelError:
        pass
    assert marker.exists()


def test_a_run_of_your_own_model_class_asks_for_the_factory_at_once(project):
    tmp, mynets = project
    from arow.config import TrainConfig
    from arow.data import from_tensors
    from arow.pipelines import build_trainer

    data = from_tensors(torch.rand(64, 1, 28, 28), torch.arange(64) % 10, name="fashion-mnist")
    cfg = TrainConfig(method="pgd-at", epochs=1, batch_size=32, eps=0.1, attack_steps=1, val_size=0,
                      out=str(tmp / "mine"), schedule="constant", warmup_epochs=0)
    build_trainer(cfg, mynets.mlp(), data, plots=False).fit()
    with pytest.raises(UserModelError, match="--model-factory pkg.module:function"):
        open_source(tmp / "mine")
    src = open_source(tmp / "mine", model_factory="mynets:mlp", dataset="fashion-mnist")
    assert (src.kind, src.trained_eps, src.trained_norm) == ("factory", 0.1, "linf")
    assert src.results_path(50, 10000, "linf") == tmp / "mine" / "eval_n50.json"
    model = src.load().model
    saved = torch.load(tmp / "mine" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    r = arow("eval", "mine", "--n", "10", cwd=tmp)
    assert r.returncode == 2 and "--model-factory" in r.stderr and "Traceback" not in r.stderr, r.stderr


@needs_fmnist
def test_cli_evaluates_a_factory_model_and_its_guards_catch_masking(project):
    tmp, mynets = project
    (tmp / "weights").mkdir()
    torch.save(mynets.mlp().state_dict(), tmp / "weights" / "w.pt")
    r = arow("eval", "--model-factory", "mynets:mlp", "--weights", "weights/w.pt", "--dataset", "fashion-mnist",
             "--eps", "0.1", "--attacks", "clean,pgd5", "--n", "100", "--no-guards", cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert not list(tmp.glob("eval*.json"))  # never into the working directory
    ev = json.loads((tmp / "weights" / "eval_w_n100.json").read_text())  # beside the weights, named after them
    assert ev["n"] == 100 and ev["subset"] and ev["model"] == "mlp" and ev["eps"] == pytest.approx(0.1)
    assert not ev["guards_ran"] and ev["source"] == "user model (mynets:mlp)"
    r = arow("eval", "--model-factory", "mynets:quantised", "--dataset", "fashion-mnist", "--eps", "0.1",
             "--attacks", "clean,pgd20", "--n", "200", "--json", "q.json", cwd=tmp)
    assert r.returncode == 3 and "tripped" in r.stderr
    r = arow("eval", "--model-factory", "mynets:quantised", "--dataset", "fashion-mnist", "--eps", "0.1", cwd=tmp)
    assert r.returncode == 2 and "--json is required" in r.stderr  # no file to write beside
    r = arow("eval", "--model-factory", "mynets:mlp", "--dataset", "fashion-mnist", cwd=tmp)
    assert r.returncode == 2 and "--eps is required" in r.stderr
    r = arow("eval", "--model-factory", "mynets:mlp", "--eps", "8/255", cwd=tmp)
    assert r.returncode == 2 and "--dataset is required" in r.stderr


@needs_fmnist
def test_a_torchscript_model_with_trust_code_runs_the_guards(project):
    tmp, mynets = project
    torch.jit.script(mynets.mlp()).save(str(tmp / "ts.pt"))
    r = arow("eval", "ts.pt", "--dataset", "fashion-mnist", "--eps", "0.1", "--n", "50", "--attacks", "clean,pgd5",
             "--guards-n", "20", "--allow-guard-failures", cwd=tmp)
    assert r.returncode == 2 and "--trust-code" in r.stderr
    r = arow("eval", "-q", "ts.pt", "--trust-code", "--dataset", "fashion-mnist", "--eps", "0.1", "--n", "50",
             "--attacks", "clean,pgd5", "--guards-n", "20", "--allow-guard-failures", cwd=tmp)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    ev = json.loads((tmp / "eval_ts_n50.json").read_text())
    assert ev["guards_ran"] and "eval-mode" in {g["name"] for g in ev["guards"]}

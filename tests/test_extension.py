"""A new method, data set or attack is ONE dropped file: proven on a copy of the package.

The package source is copied into a temporary folder and three new files are dropped into the copy,
touching no other file: ``methods/mixed.py`` (Mixed AT, registered as ``mixed-at``),
``data/tinyset.py`` (a reader of small synthetic ``.npz`` files in ``--data-dir``, registered as
``tinyset``) and ``attacks/bim.py`` (the Basic Iterative Method, registered as ``bim``). The copy's
command line then runs in subprocesses (``PYTHONPATH`` = the copy, ``python -m arow ...``), and each
new name must appear everywhere the package shows its methods, data sets and attacks: ``arow list``,
the flags, the pass table, a training run with its evaluation, ``arow report``, ``arow plot``, the
RobustBench entry and ``arow study``. No registry is patched: the copy's own imports find the files.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from arow.attacks import ATTACKS
from arow.data import DATASETS
from arow.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
METHOD, DATASET, ATTACK = "mixed-at", "tinyset", "bim"
PAPER_TITLE = "Explaining and Harnessing Adversarial Examples"
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

METHOD_FILE = '''\
"""Mixed AT (Goodfellow et al. 2015, with PGD): (1 - mix) CE(f(x)) + mix CE(f(x_adv))."""
from __future__ import annotations

import torch.nn.functional as F

from ..attacks import ce_loss, pgd
from .base import Hparam, Method, MethodOutput, Passes
from .registry import METHODS


@METHODS.register("mixed-at")
class MixedAT(Method):
    """Mixed AT (Goodfellow et al. 2015, with PGD): (1 - mix) CE(f(x)) + mix CE(f(x_adv)); CE-PGD."""

    hparams = {"mix": Hparam(0.5, "Mixed AT: weight of the adversarial CE term", min=0, max=1)}
    paper = "Goodfellow, Shlens, Szegedy: Explaining and Harnessing Adversarial Examples, ICLR 2015"
    url = "https://arxiv.org/abs/1412.6572"
    passes = Passes(target=0, attack=1, train=2)
    test_settings = {"mix": 0.75}

    def attack(self, model, x, y, rng=None):
        return pgd(model, x, y, self.threat, ce_loss, rng=rng)

    def objective(self, model, x, y, x_adv) -> MethodOutput:
        logits_clean, logits_adv = model(x), model(x_adv)
        natural = F.cross_entropy(logits_clean.float(), y)
        robust = F.cross_entropy(logits_adv.float(), y)
        loss = (1 - self.hp.mix) * natural + self.hp.mix * robust
        return MethodOutput(loss, logits_clean, logits_adv, {"natural": natural.detach(), "robust": robust.detach()})
'''

DATASET_FILE = f'''\
"""Tinyset: 10 classes of 1x28x28 grey images in ``tinyset_train.npz`` / ``tinyset_test.npz``
(arrays ``image``: uint8 N x 1 x 28 x 28, ``label``: integers 0..9) in ``--data-dir``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import DATASETS, DataError, DatasetInfo


def load_tinyset(root: Optional[Path], train: bool) -> "tuple[torch.Tensor, torch.Tensor]":
    """uint8 images (N, 1, 28, 28) and int64 labels of one split."""
    if root is None:
        raise DataError("tinyset: pass --data-dir, the folder with tinyset_train.npz and tinyset_test.npz")
    path = Path(root) / f"tinyset_{{'train' if train else 'test'}}.npz"
    if not path.is_file():
        raise DataError(f"{{path}}: no such file (tinyset expects tinyset_train.npz and tinyset_test.npz)")
    with np.load(path, allow_pickle=False) as f:
        x, y = f["image"], f["label"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (1, 28, 28) or y.shape != (len(x),):
        raise DataError(f"{{path}}: expected uint8 images N x 1 x 28 x 28 and N labels")
    if y.min() < 0 or y.max() > 9:
        raise DataError(f"{{path}}: expected labels in 0..9")
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))


DATASETS.register("tinyset", help="Tinyset: synthetic 1x28x28 .npz files (needs --data-dir), eps 0.1")(
    DatasetInfo("tinyset", 10, 1, 28, None, "none", 0.1, load_tinyset, eps_l2=1.5,
                class_names={CLASS_NAMES!r})
)
'''

ATTACK_FILE = '''\
"""BIM (Kurakin et al. 2017): PGD on cross-entropy from x itself (no random start), 5 steps of eps/4."""
from __future__ import annotations

from ..threat import ThreatModel
from . import ATTACKS, Attack
from .base import ce_loss
from .pgd import pgd


@ATTACKS.register("bim", help="BIM: 5 steps of eps/4 on CE from x (no random start)")
def _bim(eps: float, name: str = "bim", norm: str = "linf") -> Attack:
    tm = ThreatModel(eps=eps, steps=5, start="none", norm=norm)
    return Attack(name, lambda m, x, y: pgd(m, x, y, tm, ce_loss, keep_best=True), "BIM-5", norm=norm)
'''


# --------------------------------------------------------------------------- the copy and its data
@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    """The package copied with the three new files dropped in; returns the folder to put on PYTHONPATH."""
    top = tmp_path_factory.mktemp("ext")
    pkg = top / "arow"
    shutil.copytree(ROOT / "src" / "arow", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, text in [("methods/mixed.py", METHOD_FILE), ("data/tinyset.py", DATASET_FILE),
                      ("attacks/bim.py", ATTACK_FILE)]:
        assert not (pkg / rel).exists()
        (pkg / rel).write_text(text)
    return top


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Tinyset's files: 96 training and 32 test images, each class a brighter square at its own place."""
    d = tmp_path_factory.mktemp("tinyset")
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("test", 32)):
        y = np.arange(n) % 10
        x = rng.integers(0, 80, (n, 1, 28, 28), dtype=np.uint8)
        for i, k in enumerate(y):
            r, c = divmod(int(k), 5)
            x[i, 0, 4 + 10 * r:12 + 10 * r, 1 + 5 * c:6 + 5 * c] = 220
        np.savez(d / f"tinyset_{split}.npz", image=x, label=y)
    return d


def run(copy: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m arow *args`` of the copy."""
    env = dict(os.environ, PYTHONPATH=str(copy), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "arow", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=copy)


def python(copy: Path, code: str, timeout: float = 300) -> dict:
    """Run ``code`` with the copy (and tests/, for ``passes``) on the path; it prints one JSON object."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(copy), str(TESTS)]), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=copy)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_copy_is_what_runs_and_this_process_never_sees_the_new_files(copy):
    out = python(copy, """
        import json, arow, arow.attacks, arow.data, arow.methods
        print(json.dumps({"file": arow.__file__, "methods": arow.methods.METHODS.names(),
                          "datasets": arow.data.DATASETS.names(), "attacks": arow.attacks.ATTACKS.names()}))
    """)
    assert Path(out["file"]).is_relative_to(copy)
    assert METHOD in out["methods"] and DATASET in out["datasets"] and ATTACK in out["attacks"]
    assert {*METHODS.names(), METHOD} == set(out["methods"])  # exactly one more, nothing lost
    assert {*DATASETS.names(), DATASET} == set(out["datasets"])
    assert {*ATTACKS.names(), ATTACK} == set(out["attacks"])
    assert METHOD not in METHODS and DATASET not in DATASETS and ATTACK not in ATTACKS


def test_list_and_flags_show_the_new_files(copy, data_dir, tmp_path):
    r = run(copy, "list")
    assert r.returncode == 0, r.stderr
    sections = r.stdout.split("\n")
    lines = {ln.split()[0]: ln for ln in sections if ln.startswith("  ")}
    assert lines[METHOD].split(None, 1)[1].startswith("Mixed AT (Goodfellow et al. 2015")
    assert "Tinyset: synthetic 1x28x28" in lines[DATASET]
    assert "BIM: 5 steps of eps/4" in lines[ATTACK]
    r = run(copy, "train", "--help")
    assert r.returncode == 0, r.stderr
    help_text = " ".join(r.stdout.split())
    assert "mixed-at" in help_text and "tinyset" in help_text  # --method and --dataset choices
    assert "--mix MIX Mixed AT: weight of the adversarial CE term" in help_text  # the method's flag
    r = run(copy, "train", "--method", METHOD, "--dataset", DATASET, "--norm", "l2", "--print-config")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["method"] == METHOD and cfg["norm"] == "l2" and cfg["eps"] == 1.5  # the data set's L2 default
    r = run(copy, "train", "--method", METHOD, "--mix", "1.5", "--dataset", DATASET, "--data-dir", str(data_dir),
            "--out", str(tmp_path / "r"))
    err = r.stderr.strip()
    assert r.returncode == 2 and err.splitlines()[-1] == "arow: error: --mix must be <= 1, got 1.5", err
    assert "Traceback" not in err and not (tmp_path / "r" / "last.pt").exists()


def test_the_pass_table_counts_the_new_method(copy):
    out = python(copy, """
        import json, torch, torch.nn as nn
        from arow.methods import METHODS, build_method, pass_table
        from arow.rng import BatchRNG
        from arow.threat import ThreatModel
        from passes import PASS_TABLE, count_passes, documented_passes

        m = build_method("mixed-at", ThreatModel(eps=0.1, steps=2), mix=0.75)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 10))
        c = count_passes(m, model, torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,)), rng=BatchRNG(0))
        want = documented_passes("mixed-at", 2)
        row = [ln for ln in pass_table().splitlines() if ln.startswith("| mixed-at |")]
        print(json.dumps({"row": row, "in_table": "mixed-at" in PASS_TABLE,
                          "counted": [c.target, c.attack, c.train, c.helper, c.backward],
                          "documented": [want.target, want.attack, want.train, want.helper]}))
    """)
    assert out["row"] == ["| mixed-at | 0 | K | 2 | 0 | 2K+6 |"]
    assert out["in_table"] and out["documented"] == [0, 2, 2, 0]
    assert out["counted"] == [*out["documented"], 1]  # what one step ran is what the class declares


def test_a_bad_data_dir_of_the_new_data_set_is_one_line(copy, tmp_path):
    r = run(copy, "train", "--method", METHOD, "--dataset", DATASET, "--data-dir", str(tmp_path / "none"),
            "--epochs", "1", "--out", str(tmp_path / "r"))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "tinyset_train.npz" in err, err


# --------------------------------------------------------------------------- one run, end to end
@pytest.fixture(scope="module")
def trained(copy, data_dir, tmp_path_factory) -> Path:
    """One epoch of the new method on the new data set, evaluated with the new attack."""
    out = tmp_path_factory.mktemp("runs") / "mixed-tiny"
    r = run(copy, "train", "--method", METHOD, "--mix", "0.75", "--dataset", DATASET, "--data-dir", str(data_dir),
            "--epochs", "1", "--limit-train", "64", "--val-size", "16", "--batch-size", "32", "--attack-steps", "2",
            "--val-attack", ATTACK, "--eval-attacks", f"clean,{ATTACK}", "--eval-n", "16", "--no-guards",
            "--device", "cpu", "--amp", "off", "--seed", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_the_run_trains_and_evaluates_with_the_new_files(trained):
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["method"] == METHOD and cfg["dataset"] == DATASET and cfg["method_args"]["mix"] == 0.75
    assert cfg["eps"] == pytest.approx(0.1)  # the data set's default radius
    hist = [json.loads(ln) for ln in (trained / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    epoch = [h for h in hist if h.get("epoch") == 1 and "train_loss" in h][-1]
    assert epoch["train_loss"] == pytest.approx(0.25 * epoch["train_natural"] + 0.75 * epoch["train_robust"],
                                                rel=1e-4)
    ev = json.loads((trained / "eval_n16.json").read_text())
    assert ev["method"] == METHOD and ev["dataset"] == DATASET and ev["n"] == 16
    assert set(ev["accuracy"]) >= {"clean", ATTACK}
    assert ev["accuracy"][ATTACK] <= ev["accuracy"]["clean"]  # the attack keeps the first fooling iterate
    assert len(ev["per_class"][ATTACK]) == 10


def test_report_names_the_new_method_and_attack(copy, trained, tmp_path):
    labels = python(copy, """
        import json
        from arow.reporting.labels import attack_label
        print(json.dumps({"attack": attack_label("bim")}))
    """)
    r = run(copy, "report", str(trained), "--out", str(tmp_path / "report.md"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "report.md").read_text()
    cols, *rows = table(md)
    assert len(rows) == 1
    cells = dict(zip(cols, rows[0]))
    # the table names every method by its registered name, and each attack column by its label
    assert cells["method"] == METHOD and cells["dataset"] == DATASET and cells["eps"] == "0.1"
    assert labels["attack"] in cols and cells[labels["attack"]].endswith("(n=16)")
    assert f"val {labels['attack']} (last)" in cols


def test_plot_labels_the_new_method_data_set_and_attack(copy, trained):
    r = run(copy, "plot", str(trained))
    assert r.returncode == 0, r.stderr
    assert (trained / "curves.png").is_file() and (trained / "per_class.png").is_file()
    out = python(copy, f"""
        import json
        from arow.reporting.labels import attack_label, method_label
        from arow.reporting.plots import common
        from arow.reporting.tables import load_run
        run = load_run({str(trained)!r})
        print(json.dumps({{"protocol": common.protocol(run), "classes": common.class_names("tinyset"),
                          "attack": attack_label("bim"), "method": method_label("mixed-at")}}))
    """)
    assert out["classes"] == list(CLASS_NAMES)  # per_class.png's tick labels
    # every figure's title line: the method by its registered name with its settings, the data set and
    # its default radius
    assert out["protocol"] == f"{METHOD} (mix=0.75) / small-cnn on {DATASET}, L-inf eps=0.1, seed 0"
    assert out["attack"] == ATTACK  # legends: a registered attack without a fixed label is shown by its name
    assert out["method"] == "Mixed-AT"  # the display name: class MixedAT hyphenated as its registered name


def test_the_robustbench_entry_cites_the_new_method(copy, trained):
    ev_path = trained / "eval_n16.json"
    out = python(copy, f"""
        import json
        from arow.reporting.robustbench import model_info, paper_entry
        ev = json.load(open({str(ev_path)!r}))
        entry = paper_entry(ev["method"])
        # model_info needs an AutoAttack number; the run's BIM accuracy stands in for it here (not a claim)
        ev["accuracy"]["autoattack"] = ev["accuracy"]["bim"]
        info = model_info(ev)
        print(json.dumps({{"entry": entry, "info": info}}))
    """)
    assert out["entry"] == {"link": "https://arxiv.org/abs/1412.6572", "name": PAPER_TITLE,
                            "authors": "Goodfellow, Shlens, Szegedy", "venue": "ICLR 2015"}
    info = out["info"]
    assert {k: info[k] for k in ("link", "name", "authors", "venue")} == out["entry"]
    assert info["dataset"] == DATASET and info["eps"] == "0.1" and f"method {METHOD}" in info["footnote"]


# --------------------------------------------------------------------------- a study
def test_a_tiny_study_compares_the_new_method(copy, data_dir, tmp_path):
    out = tmp_path / "study"
    r = run(copy, "study", "--methods", f"{METHOD},trades", "--seeds", "0", "--baseline", "trades",
            "--attacks", f"clean,{ATTACK}", "--eval-n", "16", "--aa-n", "0", "--eps-curve-n", "0", "--no-guards",
            "--set", f"dataset={DATASET}", "--set", f"data_dir={data_dir}", "--set", "epochs=1",
            "--set", "limit_train=64", "--set", "val_size=16", "--set", "batch_size=32",
            "--set", "attack_steps=2", "--set", f"val_attack={ATTACK}", "--set", "device=cpu", "--set", "amp='off'",
            "--out", str(out))
    assert r.returncode == 0, r.stderr + r.stdout
    res = json.loads((out / "results.json").read_text())
    by = {c["label"]: c for c in res["cells"]}
    assert by[METHOD]["status"] == "done" and by["trades"]["status"] == "done"
    assert ATTACK in by[METHOD]["accuracy"]
    cfg = json.loads((out / by[METHOD]["folder"] / "config.json").read_text())
    assert cfg["method"] == METHOD and cfg["dataset"] == DATASET and cfg["eps"] == pytest.approx(0.1)
    md = (out / "results.md").read_text()
    header, *rows = table(md.split("## Mean over seeds")[1])
    assert f"{ATTACK} (first 16 test images, SUBSET)" in header and [r[0] for r in rows] == [METHOD, "trades"]
    _, *rows = table(md.split("## Against `trades`, paired by seed")[1])
    assert sorted(r[:2] for r in rows) == [[METHOD, ATTACK], [METHOD, "clean"]]


def table(text: str) -> list[list[str]]:
    """The cells of the first Markdown table in ``text``: its header, then its rows (no separator)."""
    lines = [ln for ln in text.split("\n## ")[0].splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if not ln.startswith("|-")]

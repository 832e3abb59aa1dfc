"""Experiment trackers a run also logs to: Weights & Biases (``--wandb``) and MLflow (``--mlflow``).

Each tracker is an optional package (``pip install -e '.[wandb]'``, ``'.[mlflow]'`` in the arow checkout), imported
here and only when asked for; a missing one is refused when the run is set up (one line), not after
the first epoch. :func:`open_trackers` makes the trackers a config asks for, and
:class:`~arow.training.callbacks.TrackerWriter` drives each on rank 0, as TensorBoard is driven: the
resolved config as the run's parameters once, every record of ``metrics.jsonl`` against the global
optimiser step, the final validation numbers as the run's summary, and the tracker's run closed also
when training fails. A tracker that cannot take a record only warns: ``metrics.jsonl`` keeps them all.

W&B's own settings apply (``WANDB_MODE=offline`` logs without network, ``WANDB_API_KEY``,
``WANDB_ENTITY``, ...): the mode is never forced. Its files go to ``WANDB_DIR`` if set, else into the
run folder (``DIR/wandb``). MLflow logs to ``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else a
local file store in the run folder (``file:DIR/mlruns``), in the experiment ``MLFLOW_EXPERIMENT_NAME``
(default ``arow``).

>>> trackers = open_trackers(TrainConfig(mlflow=True, out="runs/x"), Path("runs/x"))  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from ..config.schema import ConfigError, TrainConfig
from ..runs.rundir import RunDir

log = logging.getLogger(__name__)

#: the local MLflow store inside a run folder (the default of ``--mlflow-uri``)
#: MLflow's limits: parameters per call, and characters of a parameter's value (the smallest of 2.x)
_MLFLOW_PARAMS_PER_CALL, _MLFLOW_PARAM_CHARS = 100, 500


def require(module: str, flag: str, extra: str) -> Any:
    """Import the optional package ``module`` for ``flag``, or a one-line ConfigError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{flag} needs {module}: pip install -e '.[{extra}]'") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class Tracker:
    """An experiment tracker's run: started once, metrics logged by step, a summary, finished once."""

    flag = ""

    def __init__(self) -> None:
        self._warned = False

    def start(self, name: Optional[str], params: dict[str, Any]) -> None:
        """Open the tracker's run named ``name`` (None: the tracker's choice) with the settings ``params``."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` at the global optimiser step ``step``."""

    def summary(self, metrics: dict[str, float], step: int) -> None:
        """Record the run's final numbers ``metrics`` (reached at ``step``)."""

    def finish(self, error: Optional[BaseException] = None) -> None:
        """Close the run: finished, or failed when ``error`` ended the training."""

    def _warn(self, what: str, e: Exception) -> None:
        """A tracker that cannot take a record warns once; the training goes on (metrics.jsonl has it)."""
        if not self._warned:
            log.warning("%s: could not %s (%s); the run goes on, metrics.jsonl keeps every record",
                        self.flag, what, _first_line(e))
            self._warned = True


class WandbTracker(Tracker):
    """A Weights & Biases run (``--wandb``): ``wandb.init`` with the project, the run folder's name and
    the settings as its config; ``run.log`` by step, ``run.summary``, ``run.finish``."""

    flag = "--wandb"

    def __init__(self, project: str, folder: Optional[Path] = None) -> None:
        super().__init__()
        if not project.strip():
            raise ConfigError("--wandb-project must not be empty")
        self.wandb = require("wandb", "--wandb", "wandb")
        self.project, self.folder, self.run = project, folder, None

    def start(self, name: Optional[str], params: dict[str, Any]) -> None:
        kw: dict[str, Any] = {"project": self.project, "name": name, "config": params}
        if self.folder is not None and not os.environ.get("WANDB_DIR"):
            kw["dir"] = str(self.folder)
        if _version(self.wandb.__version__) >= (0, 19, 10):  # a run of the user's own stays untouched
            kw["reinit"] = "create_new"
        try:
            self.run = self.wandb.init(**kw)
        except Exception as e:  # noqa: BLE001 - whatever W&B raised (not logged in, no network): one line
            raise ConfigError(f"--wandb: W&B could not start a run ({_first_line(e)}); log in with `wandb login`, "
                              f"or set WANDB_MODE=offline to log without network") from None

    def log(self, metrics: dict[str, float], step: int) -> None:
        try:
            self.run.log(metrics, step=step)
        except Exception as e:  # noqa: BLE001
            self._warn("log a record", e)

    def summary(self, metrics: dict[str, float], step: int) -> None:
        try:
            self.run.summary.update(metrics)
        except Exception as e:  # noqa: BLE001
            self._warn("write the summary", e)

    def finish(self, error: Optional[BaseException] = None) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=0 if error is None else 1)
        except Exception as e:  # noqa: BLE001 - never hide the training's own error
            self._warn("finish the run", e)


class MlflowTracker(Tracker):
    """An MLflow run (``--mlflow``) through ``MlflowClient`` (no global active run): the settings as its
    parameters, metrics by step, the final numbers as metrics at the last step, then terminated
    (FINISHED, FAILED, or KILLED when interrupted)."""

    flag = "--mlflow"

    def __init__(self, uri: str, experiment: str = "arow") -> None:
        super().__init__()
        require("mlflow", "--mlflow", "mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        if urlparse(uri).scheme in ("", "file"):  # a local file store: chosen here, so allowed by MLflow 3
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri, self.experiment, self.run_id = uri, experiment, None
        self.client, self._metric, self._param = MlflowClient(tracking_uri=uri), Metric, Param

    def start(self, name: Optional[str], params: dict[str, Any]) -> None:
        try:
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.experiment)
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            items = [self._param(k, str(v)[:_MLFLOW_PARAM_CHARS]) for k, v in params.items()]
            for i in range(0, len(items), _MLFLOW_PARAMS_PER_CALL):
                self.client.log_batch(self.run_id, params=items[i:i + _MLFLOW_PARAMS_PER_CALL])
        except Exception as e:  # noqa: BLE001 - whatever MLflow raised (server, store): one line
            self.finish(e)
            raise ConfigError(f"--mlflow: MLflow could not start a run at {self.uri} ({_first_line(e)})") from None

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[self._metric(k, float(v), now, step)
                                                        for k, v in metrics.items()])
        except Exception as e:  # noqa: BLE001
            self._warn("log a record", e)

    def summary(self, metrics: dict[str, float], step: int) -> None:
        self.log(metrics, step)

    def finish(self, error: Optional[BaseException] = None) -> None:
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        try:
            self.client.set_terminated(run_id, status)
        except Exception as e:  # noqa: BLE001 - never hide the training's own error
            self._warn("close the run", e)


def mlflow_uri(cfg: TrainConfig, folder: Optional[Path]) -> str:
    """Where ``--mlflow`` logs: ``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else ``file:DIR/mlruns``."""
    uri = cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if folder is None:
        raise ConfigError("--mlflow needs a run folder (--out) for its local store DIR/mlruns, or --mlflow-uri")
    return RunDir(folder).file(RunDir.MLRUNS).resolve().as_uri()


def open_trackers(cfg: TrainConfig, folder: Optional[Path]) -> list[Tracker]:
    """The trackers ``cfg`` asks for (``--wandb``, ``--mlflow``), their packages imported and their
    settings checked now; nothing is started yet. ``folder``: the run folder (None: none)."""
    trackers: list[Tracker] = []
    if cfg.wandb:
        trackers.append(WandbTracker(cfg.wandb_project, folder))
    if cfg.mlflow:
        trackers.append(MlflowTracker(mlflow_uri(cfg, folder), os.environ.get("MLFLOW_EXPERIMENT_NAME") or "arow"))
    return trackers


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])

"""A training run's records fanned out to experiment trackers, each through its own library.

`--report-to tensorboard,mlflow,wandb` (any of them). Every record written to metrics.jsonl
goes to each tracker at its step; the resolved config goes in at the start, and the final
adapter (adapter_config.json + adapter_model.safetensors) is logged as an artifact where
the tracker has them (MLflow, W&B).

Where things go, unless the tracker's own environment variables say otherwise:

    tensorboard   OUTPUT/tensorboard/        (tensorboard --logdir OUTPUT/tensorboard)
    mlflow        $MLFLOW_TRACKING_URI, else a file store in OUTPUT/mlruns; experiment
                  $MLFLOW_EXPERIMENT_NAME, else "lorakit"
    wandb         project $WANDB_PROJECT, else "lorakit"; files under OUTPUT/wandb;
                  $WANDB_MODE, else online with $WANDB_API_KEY set and offline without
                  (an offline run never touches the network: `wandb sync` uploads it later)
"""

from __future__ import annotations

import atexit
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "mlflow", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def parse_report_to(text: str | None) -> list[str]:
    """`tensorboard,mlflow,wandb` (any subset, any order) -> names; None, '' or 'none' -> []."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"--report-to: unknown tracker {unknown[0]!r}; accepted: {', '.join(TRACKERS)} "
                         "(comma-separated) or none")
    for name in names:
        try:
            __import__(PACKAGES[name])
        except ImportError:
            raise ValueError(f"--report-to {name}: the {PACKAGES[name]} package is not installed; "
                             "pip install 'lorakit[track]'") from None
    return list(dict.fromkeys(names))


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return out


class TensorBoard:
    def __init__(self, output: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output / "tensorboard"))
        text = "\n".join(f"    {k}: {v}" for k, v in _flat(config).items())  # indented: a code block in markdown
        self.writer.add_text("config", text, 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, adapter: Path | None, failed: bool) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, output: Path, config: dict[str, Any], run_name: str) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow keeps its file store for people who ask for it; a run directory is such a place.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (output / "mlruns").resolve().as_uri()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorakit")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, v[:6000]) for k, v in _flat(config).items()]
        for start in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_dict(self.run_id, config, "train_config.json")
        self.uri = uri

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, adapter: Path | None, failed: bool) -> None:
        if adapter is not None:
            for name in ADAPTER_FILES:
                if (adapter / name).exists():
                    self.client.log_artifact(self.run_id, str(adapter / name), "adapter")
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class Wandb:
    def __init__(self, output: Path, config: dict[str, Any], run_name: str) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.mode = mode
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lorakit"), dir=str(output),
                              name=run_name, config=config, mode=mode)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, adapter: Path | None, failed: bool) -> None:
        import wandb

        if adapter is not None:
            artifact = wandb.Artifact(name=f"adapter-{self.run.id}", type="model")
            for name in ADAPTER_FILES:
                if (adapter / name).exists():
                    artifact.add_file(str(adapter / name))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """The trackers of one run; `log` takes metrics.jsonl's records as they are."""

    def __init__(self, names: Sequence[str], output: Path, config: dict[str, Any]) -> None:
        run_name = output.resolve().name
        self.names = list(names)
        self.open: list[Any] = []
        try:
            for name in self.names:
                if name == "tensorboard":
                    self.open.append(TensorBoard(output, config))
                elif name == "mlflow":
                    self.open.append(MLflow(output, config, run_name))
                else:
                    self.open.append(Wandb(output, config, run_name))
        except Exception:
            self.close(failed=True)
            raise
        # A run that ends in an exception or Ctrl-C is closed as failed when the process exits.
        atexit.register(self.close, None, True)

    def describe(self) -> str:
        where = []
        for tracker in self.open:
            if isinstance(tracker, TensorBoard):
                where.append(f"tensorboard ({tracker.writer.log_dir})")
            elif isinstance(tracker, MLflow):
                where.append(f"mlflow ({tracker.uri})")
            else:
                where.append(f"wandb ({tracker.mode}, {tracker.run.dir})")
        return "tracking: " + ", ".join(where)

    def log(self, record: dict[str, Any]) -> None:
        values = _numbers(record)
        for tracker in self.open:
            tracker.log(int(record["step"]), values)

    def close(self, adapter: Path | None = None, failed: bool = False) -> None:
        """Log the adapter (if given) and end each run; a second call does nothing."""
        atexit.unregister(self.close)
        trackers, self.open = self.open, []
        for tracker in trackers:
            tracker.finish(adapter, failed)

"""``ranker tune``: hyperparameter search with Optuna over ``ranker fit``.

    ranker tune --space configs/tune/home.yaml --trials 20 \\
                --data.dataset configs/data/kuairand.yaml     # any other `ranker fit` flag

Each trial is one ``ranker fit`` (in this process) with the sampled values as flags, tracked
as a child MLflow run under one parent run of the study; the objective is the best
``val/monitor`` of the trial (the metric its checkpoint was chosen on: mean GAUC where users
group, else mean AUC). TPE samples, the median pruner stops a trial whose validation falls
below the median of earlier trials at the same epoch (through Optuna's Lightning callback).
The study lives in SQLite (``optuna.db`` beside a SQLite ``mlflow.db``): the same command
continues it up to ``--trials`` finished trials. The best trial's resolved config is written as
a YAML that ``ranker fit --config`` takes.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import optuna
import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from mlflow.tracking import MlflowClient
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna_integration import PyTorchLightningPruningCallback
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.table import Table

from features.config import ConfigError
from pipelines.cli import RankerCLI, fit_cli
from pipelines.render import wide_console
from pipelines.tracking import resolve_tracking_uri
from ranker.module import MONITOR

TRIAL_RUN = "mlflow_run"  # a trial's user attribute: its MLflow run id

# -- the search space ----------------------------------------------------------------------------


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FloatParam(_Param):
    """``trial.suggest_float``: ``low <= x <= high``, log-uniform with ``log: true``."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        return _check_range(self)

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    def bounds(self) -> list[Any]:
        return [self.low, self.high]


class IntParam(_Param):
    """``trial.suggest_int``: an integer in ``[low, high]``."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        return _check_range(self)

    def suggest(self, trial: optuna.Trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log, step=self.step)

    def bounds(self) -> list[Any]:
        return [self.low, self.high]


class CategoricalParam(_Param):
    """``trial.suggest_categorical``; a choice may be a list (``expert_hidden: [256, 128]``)."""

    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        # Optuna stores scalars only: a list choice is suggested by its JSON text.
        labels = [c if _scalar(c) else json.dumps(c) for c in self.choices]
        picked = trial.suggest_categorical(name, labels)
        return self.choices[labels.index(picked)]

    def bounds(self) -> list[Any]:
        return self.choices


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _check_range(param: FloatParam | IntParam) -> Any:
    if not param.low < param.high:
        raise ValueError(f"empty range: low {param.low} must be below high {param.high}")
    if param.log and param.low <= 0:
        raise ValueError("a log range needs low > 0")
    if param.log and param.step != (1 if isinstance(param, IntParam) else None):
        raise ValueError("log and step cannot be combined")
    return param


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class SearchSpace(BaseModel):
    """A ``--space`` YAML file::

    configs: [../trainer.yaml, ../model/home.yaml]   # `ranker fit --config`s, relative
    parameters:                                       # `ranker fit` keys
      model.learning_rate: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}
      model.network.init_args.expert_hidden:
        {type: categorical, choices: [[128, 64], [256, 128]]}
    """

    model_config = ConfigDict(extra="forbid")
    configs: list[Path] = []
    parameters: dict[str, Param] = Field(min_length=1)

    @classmethod
    def load(cls, path: Path) -> SearchSpace:
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"search space {path}: {err}") from None
        try:
            space = cls.model_validate(raw if raw is not None else {})
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(k) for k in e['loc'])}: {e['msg']}" for e in err.errors()
            )
            raise ConfigError(f"search space {path}: {problems}") from None
        space.configs = [(path.parent / c).resolve() for c in space.configs]
        for config in space.configs:
            if not config.is_file():
                raise ConfigError(f"search space {path}: configs: no such file {config}")
        return space

    def fit_args(self) -> list[str]:
        return [a for c in self.configs for a in ("--config", str(c))]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        return {name: p.suggest(trial, name) for name, p in self.parameters.items()}


def flags(values: dict[str, Any]) -> list[str]:
    """``{key: value}`` -> ``ranker fit`` flags (``--key=value``, values as flow YAML)."""
    return [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items()]


# -- checks before any trial -------------------------------------------------------------------


class _Parsed(Exception):  # noqa: N818 -- control flow, not an error
    def __init__(self, config: Namespace) -> None:
        self.config = config


class _ParseOnly(RankerCLI):
    """Parses (and type-checks) a ``ranker fit`` command line, then stops."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config)


@contextmanager
def _own_args() -> Iterator[None]:
    """`ranker tune` hands each fit its own args while sys.argv holds tune's: as meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        yield


def parse_fit(args: list[str], space: Path) -> Namespace:
    try:
        with _own_args():
            fit_cli(args, cli=_ParseOnly, run=False, parser_kwargs={"exit_on_error": False})
    except _Parsed as parsed:
        return parsed.config
    except Exception as err:  # the parser's error: an unknown key, a value of the wrong type
        raise ConfigError(f"search space {space}: {err}") from None
    raise AssertionError("unreachable: _ParseOnly stops after parsing")


def check(space: SearchSpace, path: Path, fit_args: list[str]) -> Namespace:
    """Every parameter is a ``ranker fit`` key taking every value of its range, and the
    trainer keeps a checkpoint on ``val/monitor``; the base command's config is returned."""
    config = parse_fit(fit_args, path)
    widest = max(len(p.bounds()) for p in space.parameters.values())
    for i in range(widest):  # each choice (or bound) at least once
        values = {n: p.bounds()[min(i, len(p.bounds()) - 1)] for n, p in space.parameters.items()}
        parse_fit(fit_args + flags(values), path)
    logger = config.trainer.logger
    if not isinstance(logger, Namespace) or not logger.class_path.endswith(".MLflowLogger"):
        raise ConfigError(
            "ranker tune tracks trials in MLflow: the trainer's logger must be "
            "pipelines.tracking.MLflowLogger (configs/trainer.yaml sets it)"
        )
    monitors = [
        (c.init_args.get("monitor"), c.init_args.get("mode"))
        for c in config.trainer.callbacks or []
        if c.class_path.endswith("ModelCheckpoint")
    ]
    if (MONITOR, "max") not in monitors:
        raise ConfigError(
            f"ranker tune scores a trial by its best {MONITOR}: the trainer needs a "
            f"ModelCheckpoint monitoring {MONITOR} (configs/trainer.yaml has one)"
        )
    return config


# -- trials ------------------------------------------------------------------------------------


class FitPruning(PyTorchLightningPruningCallback):
    """Optuna's pruning callback, fed only by training's validations: the validation of the
    best checkpoint after training is not another epoch."""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit":
            super().on_validation_end(trainer, pl_module)


class TrialCLI(RankerCLI):
    """``ranker fit`` as one trial: its MLflow run is a child of the study's run."""

    def __init__(self, *args: Any, trial: optuna.Trial, parent: str, **kwargs: Any) -> None:
        self.trial, self.parent = trial, parent
        super().__init__(*args, **kwargs)

    def before_fit(self) -> None:
        super().before_fit()  # a warm start, when asked
        logger = self.trainer.logger
        client, run = logger.experiment, logger.run_id
        client.set_tag(run, "mlflow.parentRunId", self.parent)
        client.set_tag(run, "mlflow.runName", f"{self.trial.study.study_name}-{self.trial.number}")
        client.set_tag(run, "optuna.study", self.trial.study.study_name)
        client.set_tag(run, "optuna.trial", str(self.trial.number))
        self.trial.set_user_attr(TRIAL_RUN, run)


def default_storage(tracking_uri: str) -> str:
    """``optuna.db`` beside a SQLite MLflow store, else in the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        beside = Path(tracking_uri.removeprefix("sqlite:///")).parent / "optuna.db"
        return f"sqlite:///{beside}"
    return "sqlite:///optuna.db"


def open_study(
    name: str, storage: str, seed: int, pruner: str, startup_trials: int
) -> optuna.Study:
    """Creates or continues a study; a trial whose process died is failed after its heartbeat
    stops (2 min) and its parameters tried again. The median pruner waits for
    ``startup_trials`` finished trials, and never prunes at the first epoch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        rdb = RDBStorage(
            storage,
            heartbeat_interval=30,
            grace_period=120,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    study = optuna.create_study(
        study_name=name,
        storage=rdb,
        direction="maximize",
        load_if_exists=True,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=1)
        if pruner == "median"
        else optuna.pruners.NopPruner(),
    )
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(
            f"study '{name}' in {storage} minimises: ranker tune maximises {MONITOR} "
            f"(name a new --study)"
        )
    # Seeded per continuation: a resumed study does not replay its first trials' samples.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def _same_study(study: optuna.Study, fit_args: list[str], space: SearchSpace) -> None:
    recorded = {"fit_args": fit_args, "space": space.model_dump(mode="json")}
    for key, value in recorded.items():
        earlier = study.user_attrs.get(key)
        if earlier is None:
            study.set_user_attr(key, value)
        elif earlier != value:
            raise ConfigError(
                f"study '{study.study_name}' was run with another {key.replace('_', ' ')} "
                f"({earlier}): continue it with the same command, or name a new --study"
            )


def parent_run(study: optuna.Study, client: MlflowClient, experiment: str, space: Path) -> str:
    """The study's MLflow run: created once, found again when the study continues."""
    run_id = study.user_attrs.get("mlflow_parent_run")
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    tags = {"optuna.study": study.study_name, "ranker.command": "tune"}
    run_id = client.create_run(experiment_id, run_name=study.study_name, tags=tags)
    run_id = run_id.info.run_id
    client.log_artifact(run_id, str(space), "search_space")
    study.set_user_attr("mlflow_parent_run", run_id)
    return run_id


def run_trial(
    trial: optuna.Trial, space: SearchSpace, fit_args: list[str], parent: str, client: MlflowClient
) -> float:
    values = space.suggest(trial)
    cli = functools.partial(TrialCLI, trial=trial, parent=parent)
    pruning = FitPruning(trial, monitor=MONITOR)
    try:
        with _own_args():
            done = fit_cli(
                ["fit", *fit_args, *flags(values)],
                cli=cli,
                trainer_defaults={"callbacks": [pruning]},
            )
    except optuna.TrialPruned:
        run_id = trial.user_attrs.get(TRIAL_RUN)
        if run_id is not None:
            client.set_tag(run_id, "optuna.state", "pruned")
            client.set_terminated(run_id, "KILLED")
        raise
    best = next(c for c in done.trainer.checkpoint_callbacks if c.monitor == MONITOR)
    score = best.best_model_score
    return float(score) if score is not None else math.nan


# -- the command -------------------------------------------------------------------------------


def tune(
    space_path: Path,
    fit_args: list[str],
    trials: int = 20,
    study_name: str | None = None,
    storage: str | None = None,
    out: Path | None = None,
    seed: int = 0,
    pruner: Literal["median", "none"] = "median",
    startup_trials: int = 5,
    timeout: float | None = None,
) -> Path:
    """Runs (or continues) the study to ``trials`` finished trials; returns the best config."""
    space = SearchSpace.load(space_path)
    fit_args = [*space.fit_args(), *fit_args]
    config = check(space, space_path, fit_args)
    logger = config.trainer.logger.init_args
    uri = resolve_tracking_uri(logger.get("tracking_uri"))
    client = MlflowClient(uri)
    name = study_name or f"tune-{space_path.stem}"
    study = open_study(name, storage or default_storage(uri), seed, pruner, startup_trials)
    _same_study(study, fit_args, space)
    parent = parent_run(study, client, logger.get("experiment_name") or "ranker", space_path)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = trials - len(study.get_trials(deepcopy=False, states=finished))
    try:
        if remaining > 0:
            # A trial that fails (a size its model refuses, out of memory) is recorded as
            # failed, its traceback printed, and the study goes on.
            study.optimize(
                lambda trial: run_trial(trial, space, fit_args, parent, client),
                n_trials=remaining,
                timeout=timeout,
                catch=(Exception,),
                gc_after_trial=True,
            )
    except BaseException:
        client.set_terminated(parent, "KILLED")  # interrupted: the same command continues it
        raise
    return report(study, client, parent, out or Path("tuned") / f"{name}.yaml")


def report(study: optuna.Study, client: MlflowClient, parent: str, out: Path) -> Path:
    """Prints the trials, writes the best config, logs both to the study's run."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        client.set_terminated(parent, "FAILED")
        raise ConfigError(f"study '{study.study_name}': no trial finished")
    best = study.best_trial
    run_id = best.user_attrs[TRIAL_RUN]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text()
    header = (
        f"# Best of study '{study.study_name}': trial {best.number}, {MONITOR} "
        f"{best.value:.5f}, MLflow run {run_id}.\n# ranker fit --config {out}\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    text = header + config
    out.write_text(text)
    client.log_text(parent, text, "best_config.yaml")
    frame = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params"))
    client.log_text(parent, frame.to_csv(index=False), "trials.csv")
    client.log_metric(parent, "best/value", best.value)
    client.log_metric(parent, "trials/finished", len(done))
    client.set_tag(parent, "best.trial", str(best.number))
    client.set_tag(parent, "best.run", run_id)
    client.set_terminated(parent)
    print_trials(study)
    print(f"best: trial {best.number} ({MONITOR} {best.value:.5f}), config written to {out}")
    return out


def print_trials(study: optuna.Study) -> None:
    names = list(study.trials[0].params) if study.trials else []
    table = Table(title=f"study {study.study_name}: {MONITOR} (higher is better)")
    for column in ("trial", "state", "value", "s", *(n.rsplit(".", 1)[-1] for n in names)):
        table.add_column(column)
    ranked = sorted(study.trials, key=lambda t: -(t.value if t.value is not None else -math.inf))
    for t in ranked:
        seconds = f"{t.duration.total_seconds():.0f}" if t.duration else ""
        value = f"{t.value:.5f}" if t.value is not None else ""
        params = [_short(t.params.get(n, "")) for n in names]
        table.add_row(str(t.number), t.state.name, value, seconds, *params)
    wide_console().print(table)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)

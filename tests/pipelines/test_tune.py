"""`ranker tune`: an Optuna study over real `ranker fit` trials, tracked in MLflow, resumable."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from features.config import ConfigError
from pipelines.commands import main
from pipelines.tune import TRIAL_RUN, SearchSpace, flags
from tests.conftest import CONFIGS, SYNTHETIC_CONFIG

SPACE = {
    "configs": [str(CONFIGS / "trainer.yaml"), str(CONFIGS / "model" / "mmoe.yaml")],
    "parameters": {
        "model.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "model.network.init_args.tower_dropout": {"type": "float", "low": 0.0, "high": 0.2},
        "model.network.init_args.expert_hidden": {
            "type": "categorical",
            "choices": [[16], [32, 16]],
        },
    },
}


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space))
    return path


def tune_args(space: Path, log: Path, root: Path, trials: int) -> list[str]:
    return [
        "tune",
        "--space",
        str(space),
        "--trials",
        str(trials),
        "--out",
        str(root / "best.yaml"),
        "--data.dataset",
        str(SYNTHETIC_CONFIG),
        "--data.log_path",
        str(log),
        "--data.batch_size",
        "1024",
        "--model.network.init_args.num_experts",
        "2",
        "--trainer.max_epochs",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.tracking_uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--trainer.logger.init_args.checkpoint_dir",
        str(root / "checkpoints"),
    ]


def test_three_trials_are_child_runs_and_the_best_config_fits(
    tiny_log: Path, tmp_path: Path
) -> None:
    space = write_space(tmp_path / "space.yaml", SPACE)
    main(tune_args(space, tiny_log, tmp_path, trials=3))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ranker").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [r for r in runs if r.data.tags.get("ranker.command") == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and len(runs) == 4
    assert {r.data.tags["optuna.trial"] for r in children} == {"0", "1", "2"}
    # The study sits beside mlflow.db; each trial knows its run and scored its best val/monitor.
    study = optuna.load_study(study_name="tune-space", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len(study.trials) == 3
    # Each trial reported its training validations only (not the best one's, validated again).
    assert all(len(t.intermediate_values) == 2 for t in study.trials)
    for trial in study.trials:
        (run,) = [r for r in children if r.info.run_id == trial.user_attrs[TRIAL_RUN]]
        assert trial.value == pytest.approx(
            max(m.value for m in client.get_metric_history(run.info.run_id, "val/monitor"))
        )
        assert float(run.data.params["model.learning_rate"]) == trial.params["model.learning_rate"]
    best = tmp_path / "best.yaml"
    assert parent.data.tags.get("optuna.study") == "tune-space"
    parent = client.get_run(parent.info.run_id)
    assert parent.data.tags["best.trial"] == str(study.best_trial.number)
    config = yaml.safe_load(best.read_text())
    assert config["model"]["learning_rate"] == study.best_params["model.learning_rate"]

    # Resumable: the same command with --trials 4 runs one more trial under the same parent.
    main(tune_args(space, tiny_log, tmp_path, trials=4))
    study = optuna.load_study(study_name="tune-space", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert len(study.trials) == 4
    runs = client.search_runs([experiment])
    assert sum(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs) == 4

    # The best config is a `ranker fit` config as it stands.
    main(
        [
            "fit",
            "--config",
            str(best),
            "--trainer.max_epochs",
            "1",
            "--trainer.logger.init_args.tracking_uri",
            f"sqlite:///{tmp_path / 'refit.db'}",
        ]
    )
    refit = MlflowClient(f"sqlite:///{tmp_path / 'refit.db'}")
    (run,) = refit.search_runs([refit.get_experiment_by_name("ranker").experiment_id])
    assert run.info.status == "FINISHED" and "test/gauc/mean" in run.data.metrics


@pytest.mark.parametrize(
    ("direction", "message"),
    [("maximize", "was run with another fit args"), ("minimize", "minimises")],
)
def test_a_study_continues_only_with_the_same_command(
    tiny_log: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    direction: str,
    message: str,
) -> None:
    space = write_space(tmp_path / "space.yaml", SPACE)
    study = optuna.create_study(
        study_name="tune-space", storage=f"sqlite:///{tmp_path}/optuna.db", direction=direction
    )
    study.set_user_attr("fit_args", ["--config", "other.yaml"])
    with pytest.raises(SystemExit) as stop:
        main(tune_args(space, tiny_log, tmp_path, trials=1))
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"model.learnin_rate": {"type": "float", "low": 0.1, "high": 1}}, "model.learnin_rate"),
        ({"model.learning_rate": {"type": "float", "low": 0.1, "high": 0.1}}, "empty range"),
        ({"model.learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}}, "low > 0"),
        (
            {
                "model.learning_rate": {
                    "type": "float",
                    "low": 0.1,
                    "high": 1,
                    "log": True,
                    "step": 0.1,
                }
            },
            "log and step",
        ),
        ({"model.lr_schedule": {"type": "categorical", "choices": ["none", "cosine"]}}, "cosine"),
        ({"model.lr_schedule": {"type": "categorical", "choices": []}}, "choices"),
        ({"model.learning_rate": {"type": "uniform", "low": 0, "high": 1}}, "type"),
        ({"model.learning_rate": {"type": "float", "lo": 0, "high": 1}}, "lo"),
        ({}, "parameters"),
    ],
)
def test_a_bad_search_space_is_refused_before_training(
    tiny_log: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    parameters: dict,
    message: str,
) -> None:
    space = write_space(tmp_path / "bad.yaml", {**SPACE, "parameters": parameters})
    with pytest.raises(SystemExit) as stop:
        main(tune_args(space, tiny_log, tmp_path, trials=1))
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert f"search space {space}" in error and message in error, error
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "checkpoints").exists()


def test_a_missing_base_config_is_named(tmp_path: Path) -> None:
    space = write_space(tmp_path / "space.yaml", {**SPACE, "configs": ["nowhere.yaml"]})
    with pytest.raises(ConfigError, match=r"configs: no such file .*nowhere\.yaml"):
        SearchSpace.load(space)


def test_list_choices_are_suggested_and_passed_as_flow_yaml() -> None:
    space = SearchSpace.model_validate(SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        values = space.suggest(trial)
        seen.add(tuple(values["model.network.init_args.expert_hidden"]))
        study.tell(trial, 0.0)
    assert seen == {(16,), (32, 16)}
    assert flags({"a.b": [32, 16], "c": "plateau", "d": 0.5}) == [
        "--a.b=[32, 16]",
        "--c=plateau",
        "--d=0.5",
    ]


def test_a_trial_below_the_median_is_pruned_and_its_run_marked(
    tiny_log: Path, tmp_path: Path
) -> None:
    """Two planted trials: one learns, one cannot (learning rates 1e-7). With pruning from the
    first finished trial, the second stops at its first prunable epoch."""
    space = {
        **SPACE,
        "parameters": {
            "model.learning_rate": {"type": "categorical", "choices": [0.01, 1e-7]},
        },
    }
    path = write_space(tmp_path / "space.yaml", space)
    study = optuna.create_study(
        study_name="tune-space", storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize"
    )
    study.enqueue_trial({"model.learning_rate": 0.01})
    study.enqueue_trial({"model.learning_rate": 1e-7})
    args = tune_args(path, tiny_log, tmp_path, trials=2)
    args += ["--startup_trials", "1", "--trainer.max_epochs", "3"]
    rates = ["--model.embedding_learning_rate", "1e-7"]
    main([*args, *rates, "--model.small_vocabulary_learning_rate", "1e-7"])
    study = optuna.load_study(study_name="tune-space", storage=f"sqlite:///{tmp_path}/optuna.db")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    pruned = client.get_run(study.trials[1].user_attrs[TRIAL_RUN])
    assert pruned.info.status == "KILLED" and pruned.data.tags["optuna.state"] == "pruned"
    assert len(client.get_metric_history(pruned.info.run_id, "val/monitor")) == 2  # epochs 0, 1

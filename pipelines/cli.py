"""The ``ranker`` command.

    ranker synth --out data/synthetic --rows 1000000      # generate a behaviour log
    ranker fit --config configs/trainer.yaml --config configs/model/mmoe.yaml \\
               --data.dataset configs/data/synthetic.yaml  # train, track in MLflow, report
    ranker evaluate --run <run id | checkpoint> [--split test]  # HTML + markdown report
    ranker compare <run> <run> ... [--split test]          # side by side, per task
    ranker export --run <run id | checkpoint>             # ONNX, parity-checked, registered
    ranker promote --name ranker-synthetic --alias champion

``fit`` / ``validate`` / ``test`` are LightningCLI subcommands: every model and DataModule
argument is a flag or a YAML key, checked before anything runs.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from jsonargparse import CLI, ArgumentParser
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from features.config import SPLITS, ConfigError
from features.datamodule import RankerDataModule
from pipelines.report import fit_report, print_report
from pipelines.tracking import MLflowLogger
from ranker.module import RankerModule


class LogConfigToMLflow(SaveConfigCallback):
    """Records the resolved config (artifact + flattened params) and the FeatureState, and
    stamps every checkpoint with its MLflow run (so ``ranker evaluate <ckpt>`` finds it)."""

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        logger = trainer.logger
        if isinstance(logger, MLflowLogger):
            checkpoint["mlflow"] = {"run_id": logger.run_id, "tracking_uri": logger.tracking_uri}

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLflowLogger):
            return
        client, run_id = logger.experiment, logger.run_id
        client.log_text(run_id, self.parser.dump(self.config, skip_none=False), "config.yaml")
        params = {k: str(v)[:500] for k, v in _flatten(self.config.as_dict()).items()}
        logger.log_hyperparams(params)
        datamodule = trainer.datamodule
        if isinstance(datamodule, RankerDataModule):
            with tempfile.TemporaryDirectory() as tmp:
                datamodule.save_state(tmp)
                client.log_artifacts(run_id, tmp, "feature_state")
            if datamodule.config.source:
                client.log_artifact(run_id, str(datamodule.config.source), "dataset")
            for split, rows in datamodule.split_rows.items():
                client.log_metric(run_id, f"data/rows/{split}", rows)
        params = sum(p.numel() for p in pl_module.network.parameters())
        client.log_metric(run_id, "model/params", params)
        client.set_tag(run_id, "model", type(pl_module.network).__name__)
        client.set_tag(run_id, "dataset", datamodule.config.name if datamodule else "")


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif key not in ("callbacks", "logger"):
            flat[name] = value
    return flat


class RankerCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The model's inputs and tasks come from the fitted data, not from its config.
        parser.link_arguments("data.input_spec", "model.inputs", apply_on="instantiate")
        parser.link_arguments("data.tasks", "model.tasks", apply_on="instantiate")

    def after_fit(self) -> None:
        """Score the best checkpoint on validation and test; print and log the report."""
        if self.trainer.fast_dev_run or not self.trainer.checkpoint_callback:
            return
        best = self.trainer.checkpoint_callback.best_model_path or None
        self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
        report = fit_report(self.model, self.datamodule)
        logger = self.trainer.logger
        if isinstance(logger, MLflowLogger):
            logger.log_metrics(report.oracle_metrics())
            logger.experiment.log_text(logger.run_id, report.markdown(), "report.md")
            report.run_id = logger.run_id
        print_report(report)


def fit_cli(args: list[str] | None) -> None:
    RankerCLI(
        RankerModule,
        RankerDataModule,
        args=args,
        save_config_callback=LogConfigToMLflow,
        save_config_kwargs={"save_to_log_dir": False},
        auto_configure_optimizers=False,
    )


def synth(
    out: Path = Path("data/synthetic"),
    rows: int = 1_000_000,
    days: int = 14,
    start: str = "2024-01-01",
    users: int = 20_000,
    items: int = 50_000,
    authors: int = 5_000,
    seed: int = 0,
    rows_per_group: int = 65_536,
) -> None:
    """Generate a synthetic Kuaishou-like behaviour log (hive-partitioned Parquet by date).

    Args:
        out: output directory (replaced if it holds an earlier log).
        rows: impressions.
        days: days, one partition each.
        start: first date, YYYY-MM-DD.
        users: distinct users.
        items: distinct items.
        authors: distinct authors.
        seed: random seed; the same arguments give the same log.
        rows_per_group: Parquet row-group size.
    """
    from features.synth import generate_log, write_log
    from pipelines.report import print_synth_summary

    frame = generate_log(
        rows=rows, days=days, start=start, users=users, items=items, authors=authors, seed=seed
    )
    path = write_log(frame, out, rows_per_group=rows_per_group)
    print_synth_summary(frame, path)


def compare_cli(args: list[str]) -> None:
    from pipelines.evaluate import compare

    parser = ArgumentParser(prog="ranker compare", description=compare.__doc__)
    parser.add_argument("runs", nargs="+", help="MLflow run ids or checkpoint paths (2 or more)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to compare on")
    parser.add_argument("--out", type=Path, default=None, help="report directory")
    parser.add_argument("--tracking_uri", default=None, help="MLflow store")
    options = parser.parse_args(args)
    compare(options.runs, options.split, options.out, options.tracking_uri)


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else argv
    try:
        if words and words[0] == "synth":
            CLI(synth, args=words[1:])
        elif words and words[0] == "evaluate":
            from pipelines.evaluate import evaluate

            CLI(evaluate, args=words[1:])
        elif words and words[0] == "compare":
            compare_cli(words[1:])
        elif words and words[0] in ("export", "promote"):
            from pipelines import export

            CLI(getattr(export, words[0]), args=words[1:])
        else:
            fit_cli(argv)  # None: LightningCLI reads sys.argv itself
    except ConfigError as err:
        print(f"ranker: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

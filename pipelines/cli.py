"""``ranker fit`` (and ``validate`` / ``test``): LightningCLI over RankerModule and
RankerDataModule, logging to MLflow; every model and DataModule argument is a flag or a YAML
key, checked before anything runs."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import polars as pl
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from mlflow.tracking import MlflowClient

from features.config import SPLITS
from features.datamodule import RankerDataModule
from pipelines.calibrate import calibrate
from pipelines.checkpoints import (
    ElasticMark,
    RunError,
    checkpoint_run,
    find_run,
    requeued_checkpoint,
    restarted_run,
    with_atomic_checkpoints,
)
from pipelines.precision import Hardware, default_precision
from pipelines.render import Table, fmt
from pipelines.report import fit_report, print_report
from pipelines.tracking import MLflowLogger, resolve_tracking_uri
from pipelines.warm_start import Parent, resolve, save_state, warm_start
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
        config = self.parser.dump(self.config, skip_none=False)
        params = {k: str(v)[:500] for k, v in _flatten(self.config.as_dict()).items()}
        resumed_from = self.config.get("ckpt_path")
        if resumed_from:
            # The same run, continued: MLflow params cannot change, so only new ones are
            # logged; the resumed command's whole config sits beside the original.
            logged = client.get_run(run_id).data.params
            params = {k: v for k, v in params.items() if k not in logged}
            client.set_tag(run_id, "resumed_from", str(resumed_from))
            client.update_run(run_id, status="RUNNING")  # a requeued job ended it when it left
        client.log_text(run_id, config, "config.resumed.yaml" if resumed_from else "config.yaml")
        if params:
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
            accounting = accounting_table(datamodule.accounting)
            unassigned = datamodule.accounting.filter(pl.col("split") == "none")["rows"].sum()
            client.log_metric(run_id, "data/rows/none", int(unassigned))
            client.log_text(run_id, accounting, "data/accounting.md")
            print(accounting, flush=True)
            skipped = datamodule.source.skipped
            client.log_metric(run_id, "data/skipped_files", len(skipped))
            if skipped:
                listing = "".join(f"{file}\t{why}\n" for file, why in skipped.items())
                client.log_text(run_id, listing, "data/skipped_files.tsv")
        params = sum(p.numel() for p in pl_module.network.parameters())
        client.log_metric(run_id, "model/params", params)
        if isinstance(datamodule, RankerDataModule):
            rows = " / ".join(f"{datamodule.split_rows.get(s, 0):,}" for s in SPLITS)
            print(
                f"{type(pl_module.network).__name__} ({params:,} parameters) on "
                f"{datamodule.config.name}: {rows} rows ({' / '.join(SPLITS)}); "
                f"MLflow run {run_id} in {logger.tracking_uri}",
                flush=True,
            )
        client.set_tag(run_id, "model", type(pl_module.network).__name__)
        client.set_tag(run_id, "dataset", datamodule.config.name if datamodule else "")


def accounting_table(accounting: pl.DataFrame) -> str:
    """Where the log's rows went (``RankerDataModule.accounting``), as markdown."""
    labels = [c for c in accounting.columns if c not in ("split", "reason", "rows")]
    table = Table(["split", "rows", *(f"{label} observed" for label in labels)])
    for row in accounting.iter_rows(named=True):
        name = row["split"] if row["split"] != "none" else f"none: {row['reason']}"
        table.add([name, fmt(row["rows"]), *(fmt(row[label]) for label in labels)])
    return table.markdown()


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif key not in ("callbacks", "logger", "ckpt_path"):
            flat[name] = value
    return flat


def resume_point(root: str | None) -> tuple[Path | None, str | None]:
    """Where a job its scheduler started again resumes (a checkpoint, an MLflow run): SLURM's
    requeue checkpoint; under torchrun after a restart, the first attempt's last checkpoint
    (its run alone when it died before one); nothing else."""
    requeued = requeued_checkpoint(root)
    if requeued is not None:
        return requeued, None
    return restarted_run(root) or (None, None)


def continue_run(logger: Any, path: str | Path | None, run_id: str | None) -> None:
    """Points the MLflow logger (unless given one) at ``run_id``, or at the run that wrote the
    checkpoint ``path``; an error when the store does not hold it."""
    if not isinstance(logger, Namespace) or not logger.class_path.endswith("MLflowLogger"):
        return
    if logger.init_args.get("run_id"):
        return
    run_id = run_id or (checkpoint_run(path) if path is not None else None)
    if run_id is None:
        return
    uri = resolve_tracking_uri(logger.init_args.get("tracking_uri"))
    if find_run(MlflowClient(uri), run_id) is None:
        origin = path if path is not None else "torchrun's first attempt"
        raise RunError(
            f"{origin} was written by MLflow run '{run_id}', which is not in the tracking "
            f"store {uri} (set MLFLOW_TRACKING_URI to the store that holds it)"
        )
    logger.init_args.run_id = run_id


class RankerCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, its checkpoints written atomically (``AtomicCheckpointIO``), marking
        under torchrun what a restart continues (``ElasticMark``)."""
        config = self.config_init.get(self.subcommand) if self.subcommand else self.config_init
        kwargs.setdefault("plugins", with_atomic_checkpoints(config["trainer"].get("plugins")))
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(ElasticMark())  # a no-op outside torchrun
        return trainer

    def before_instantiate_classes(self) -> None:
        """``--ckpt_path`` continues the checkpoint's MLflow run rather than starting one; so
        do a SLURM job requeued by Lightning and the workers torchrun restarts
        (``--max-restarts``): each resumes from the last checkpoint saved."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        self.choose_precision(config)
        self.warm_start_parent(config)
        if config is not None and config.get("data") is not None and config.data.seed is None:
            # One seed: the data order follows seed_everything (an explicit --data.seed wins).
            seed = config.get("seed_everything")
            config.data.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
        path = config.get("ckpt_path") if config else None
        run_id = None
        if self.subcommand == "fit" and path is None:
            path, run_id = resume_point(config.trainer.get("default_root_dir"))
            if path is not None:  # the file Lightning would pick, named: one way to resume
                config.ckpt_path = str(path)
        if path is not None or run_id is not None:
            continue_run(config.trainer.logger, path, run_id)

    def choose_precision(self, config: Namespace | None) -> None:
        """``ranker fit`` without ``--trainer.precision``: the hardware's
        (``pipelines.precision``), printed here and tagged on the run (``before_fit``). A
        resumed run chooses again on the machine it resumes on; the tag says what it resumed
        with (the ``trainer.precision`` param keeps the first attempt's)."""
        self.precision_why = "set by --trainer.precision"
        trainer = config.get("trainer") if config is not None else None
        if trainer is None or self.subcommand != "fit":  # validate / test: as given (fp32)
            return
        if trainer.get("precision") is None:
            hardware = Hardware.probe(str(trainer.get("accelerator") or "auto"))
            trainer.precision, self.precision_why = default_precision(hardware)
        rank_zero_info(f"precision: {trainer.precision} ({self.precision_why})")

    def warm_start_parent(self, config: Namespace) -> None:
        """``--warm_start``: the parent downloaded (kept for the run), its FeatureState handed
        to the DataModule."""
        self.warm_parent: Parent | None = None
        reference = config.get("warm_start") if self.subcommand == "fit" else None
        if not reference:
            return
        logger = config.trainer.logger
        given = logger.init_args.get("tracking_uri") if isinstance(logger, Namespace) else None
        self._parent_files = tempfile.TemporaryDirectory(prefix="ranker-parent-")
        where = Path(self._parent_files.name)
        self.warm_parent = resolve(reference, MlflowClient(resolve_tracking_uri(given)), where)
        config.data.parent_state = save_state(self.warm_parent, where / "parent_state")

    def before_fit(self) -> None:
        """A warm start (not a resumption, whose checkpoint holds it all): the parent's
        weights and optimiser state, the lineage tags."""
        config = self.config.get(self.subcommand)
        logger = self.trainer.logger
        if isinstance(logger, MLflowLogger) and self.trainer.is_global_zero:
            why = f"{config.trainer.precision} ({self.precision_why})"
            logger.experiment.set_tag(logger.run_id, "precision", why)
        if self.warm_parent is not None and not config.get("ckpt_path"):
            warm_start(self.trainer, self.model, self.warm_parent, self.datamodule.state)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--warm_start",
            type=str | None,
            default=None,
            help="start from a trained model: an MLflow run id, a checkpoint, or "
            "models:/<name>@<alias> (or /<version>); its vocabularies grow with this window's "
            "ids (--data.grow_vocabulary, --data.refit_numeric)",
        )
        # The model's inputs and tasks come from the fitted data, not from its config.
        parser.link_arguments("data.input_spec", "model.inputs", apply_on="instantiate")
        parser.link_arguments("data.tasks", "model.tasks", apply_on="instantiate")

    def after_fit(self) -> None:
        """Score the best checkpoint on validation and test; print and log the report."""
        if self.trainer.fast_dev_run or not self.trainer.checkpoint_callback:
            return
        best = self.trainer.checkpoint_callback.best_model_path or None
        self.trainer.validate(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
        calibrated = None
        if best and self.model.hparams.calibration != "none":
            # Fitted on validation, saved into the best checkpoint: test, evaluate, export
            # and the service all read calibrated probabilities from here on.
            calibrated = calibrate(self.model, self.datamodule)
            self.trainer.save_checkpoint(best)
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
        if not self.trainer.is_global_zero:
            return  # under DDP every rank scored its share and holds the metrics; rank 0 reports
        report = fit_report(self.model, self.datamodule, calibrated)
        logger = self.trainer.logger
        if isinstance(logger, MLflowLogger):
            logger.log_metrics({**report.oracle_metrics(), **(calibrated or {})})
            logger.experiment.log_text(logger.run_id, report.markdown(), "report.md")
            report.run_id = logger.run_id
        print_report(report)


def fit_cli(args: list[str] | None, cli: type[RankerCLI] = RankerCLI, **options: Any) -> RankerCLI:
    """``ranker fit`` (and validate / test); ``options`` go to LightningCLI (``run``,
    ``trainer_defaults``, ``parser_kwargs``)."""
    return cli(
        RankerModule,
        RankerDataModule,
        args=args,
        save_config_callback=LogConfigToMLflow,
        save_config_kwargs={"save_to_log_dir": False},
        auto_configure_optimizers=False,
        **options,
    )

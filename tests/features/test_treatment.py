"""The treatment contract of uplift data: arms fitted and carried on every batch; every bad
input (no treatment column, no control, an arm missing from a split, a propensity outside
(0, 1], a row without an arm) one clear error naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from features.config import ConfigError
from features.datamodule import RankerDataModule
from features.state import FeatureState
from features.synth_uplift import generate_uplift
from tests.conftest import CONFIGS

UPLIFT_CONFIG = CONFIGS / "data" / "synthetic_uplift.yaml"


@pytest.fixture(scope="module")
def customers() -> pl.DataFrame:
    return generate_uplift(rows=3000, treatments=3, seed=0, logged=True)


def write(tmp_path: Path, frame: pl.DataFrame, **treatment: object) -> Path:
    log = tmp_path / "customers.parquet"
    frame.write_parquet(log)
    raw = yaml.safe_load(UPLIFT_CONFIG.read_text())
    raw["path"] = str(log)
    raw["treatment"] = {**raw["treatment"], **treatment}
    config = tmp_path / "uplift.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def test_arms_are_fitted_control_first_and_ride_on_every_batch(
    customers: pl.DataFrame, tmp_path: Path
) -> None:
    data = RankerDataModule(
        str(write(tmp_path, customers, propensity="propensity")), batch_size=512
    )
    data.setup("fit")
    assert data.input_spec.arms == ("control", "arm1", "arm2")
    batches = list(data.val_dataloader())
    treatment = np.concatenate([b.treatment.numpy() for b in batches])
    propensity = np.concatenate([b.propensity.numpy() for b in batches])
    val = customers.filter(pl.col("split") == "val")
    expected = val["arm"].replace_strict(["control", "arm1", "arm2"], [0, 1, 2]).to_numpy()
    assert sorted(zip(treatment, propensity, strict=True)) == sorted(
        zip(expected, val["propensity"].to_numpy(), strict=True)
    )
    saved = FeatureState.load(data.state.save(tmp_path / "state"))
    assert saved.treatment == data.state.treatment  # travels with the model


def test_data_without_a_propensity_weighs_every_row_the_same(
    customers: pl.DataFrame, tmp_path: Path
) -> None:
    data = RankerDataModule(str(write(tmp_path, customers.drop("propensity"))), batch_size=512)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.treatment.dtype.is_floating_point is False
    assert (batch.propensity == 1).all()


def test_a_missing_treatment_column_names_it_and_the_file(
    customers: pl.DataFrame, tmp_path: Path
) -> None:
    config = write(tmp_path, customers, column="offer")  # no such column
    with pytest.raises(
        ConfigError,
        match=r"column 'offer' \(treatment.column\) is missing from .*customers.parquet",
    ):
        RankerDataModule(str(config))


def test_no_control_row_is_an_error(customers: pl.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"no row has the control value 'nobody'.*arms are \['arm1', 'arm2', 'control'\]",
    ):
        RankerDataModule(str(write(tmp_path, customers, control="nobody")))


def test_an_arm_without_rows_in_a_split_is_an_error(
    customers: pl.DataFrame, tmp_path: Path
) -> None:
    frame = customers.filter(~((pl.col("arm") == "arm2") & (pl.col("split") == "test")))
    with pytest.raises(
        ConfigError,
        match=r"customers.parquet, column 'arm' \(treatment.column\): "
        r"arm\(s\) \['arm2'\] have no rows in the test split",
    ):
        RankerDataModule(str(write(tmp_path, frame)))


def test_a_propensity_outside_zero_one_is_an_error(customers: pl.DataFrame, tmp_path: Path) -> None:
    frame = customers.with_columns(
        pl.when(pl.col("customer") < 2)
        .then(0.0)
        .otherwise(pl.col("propensity"))
        .alias("propensity")
    )
    with pytest.raises(
        ConfigError,
        match=r"column 'propensity' \(treatment.propensity\): 2 row\(s\) null or outside \(0, 1\]",
    ):
        RankerDataModule(str(write(tmp_path, frame, propensity="propensity")))


def test_a_row_without_an_arm_is_an_error(customers: pl.DataFrame, tmp_path: Path) -> None:
    frame = customers.with_columns(
        pl.when(pl.col("customer") == 7).then(None).otherwise(pl.col("arm")).alias("arm")
    )
    with pytest.raises(
        ConfigError, match=r"column 'arm' \(treatment.column\): 1 row\(s\) name no arm"
    ):
        RankerDataModule(str(write(tmp_path, frame)))


def test_the_treatment_cannot_also_be_a_feature(customers: pl.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"treatment.column 'region' is also a feature"):
        RankerDataModule(str(write(tmp_path, customers, column="region")))

"""Tests for the synthetic behaviour-log generator (features/synth.py)."""

import inspect
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from scipy.stats import rankdata

from features.synth import (
    DEFAULT_DRIFT,
    DEFAULT_EXPOSURE,
    DEFAULT_SWING,
    LATENT_DIM,
    SWING_MEMORY,
    TASKS,
    Exposure,
    SynthTask,
    _drifting_latents,
    _retrieve,
    _swinging,
    generate,
    generate_log,
    write_log,
)
from pipelines.commands import main, synth

BIG_ROWS = 300_000
# Small world for the I/O and determinism tests: fast, yet several row groups per day.
SMALL = {"rows": 20_000, "days": 3, "users": 2_000, "items": 5_000, "authors": 500}

EXPECTED_SCHEMA = {
    "user_id": pl.Int64,
    "item_id": pl.Int64,
    "author_id": pl.Int64,
    "ts": pl.Int64,
    "date": pl.Utf8,
    "user_gender": pl.Utf8,
    "user_age": pl.Utf8,
    "user_city_tier": pl.Int64,
    "user_active_degree": pl.Utf8,
    "user_follow_count": pl.Int64,
    "user_register_days": pl.Int64,
    "item_category": pl.Int64,
    "item_duration_s": pl.Float64,
    "item_upload_days": pl.Int64,
    "hour": pl.Int64,
    "page": pl.Utf8,
    "device": pl.Utf8,
    **{t.name: pl.Int8 for t in TASKS},
    **{f"p_{t.name}": pl.Float32 for t in TASKS},
}


@pytest.fixture(scope="module")
def big() -> pl.DataFrame:
    return generate_log(rows=BIG_ROWS, seed=1)


@pytest.fixture(scope="module")
def small() -> pl.DataFrame:
    return generate_log(**SMALL, seed=7)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC (ties get average ranks)."""
    ranks = rankdata(score)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _logit(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return np.log(p / (1.0 - p))


def _canonical(frame: pl.DataFrame) -> pl.DataFrame:
    """Comparable form: string date, fixed column order, total row order."""
    frame = frame.with_columns(pl.col("date").cast(pl.Utf8))
    return frame.select(list(EXPECTED_SCHEMA)).sort(["date", "ts", "user_id", "item_id"])


# --- API / schema ------------------------------------------------------------------------


def test_tasks_definition() -> None:
    assert all(isinstance(t, SynthTask) for t in TASKS)
    assert [t.name for t in TASKS] == [
        "click", "effective_view", "long_view",
        "like", "comment", "forward", "follow", "collect",
    ]  # fmt: skip
    assert {t.group for t in TASKS} == {"watch", "interaction"}
    assert all(0.0 < t.rate < 1.0 for t in TASKS)


def test_schema_and_domains(big: pl.DataFrame) -> None:
    assert dict(big.schema) == EXPECTED_SCHEMA
    assert big.height == BIG_ROWS
    assert set(big["user_gender"].unique()) <= {"M", "F", "U"}
    assert set(big["user_age"].unique()) <= {"<18", "18-24", "25-30", "31-40", "41-50", "50+"}
    assert set(big["user_active_degree"].unique()) <= {"high", "middle", "low", "new"}
    assert set(big["page"].unique()) == {"featured", "follow", "nearby", "single"}
    assert set(big["device"].unique()) == {"android", "ios"}
    assert big["user_city_tier"].is_between(1, 5).all()
    assert big["hour"].is_between(0, 23).all()
    assert big["item_category"].is_between(0, 39).all()
    assert big["item_upload_days"].is_between(0, 60).all()
    assert big["item_duration_s"].drop_nulls().is_between(5.0, 300.0).all()
    assert (big["user_follow_count"] >= 0).all()
    assert (big["user_register_days"] >= 0).all()
    # Only item duration has missing values, ~2% of rows.
    nulls = {c: n for c, n in zip(big.columns, big.null_count().row(0), strict=True) if n}
    assert set(nulls) == {"item_duration_s"}
    assert 0.015 < nulls["item_duration_s"] / BIG_ROWS < 0.025
    # Evening traffic dominates the early morning.
    hours = big["hour"].to_numpy()
    assert (hours == 21).sum() > 3 * (hours == 4).sum()


def test_time_columns_consistent(big: pl.DataFrame) -> None:
    assert big["ts"].is_sorted()
    day_of_ts = pl.from_epoch(big["ts"], time_unit="s").dt.strftime("%Y-%m-%d")
    assert (day_of_ts == big["date"]).all()
    hour_of_ts = (big["ts"] % 86_400) // 3_600
    assert (hour_of_ts == big["hour"]).all()
    assert big["date"].n_unique() == 14
    assert big["date"].min() == "2024-01-01"
    assert big["date"].max() == "2024-01-14"
    assert big["ts"].min() >= int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())


def test_entity_attributes_are_fixed(big: pl.DataFrame) -> None:
    user_cols = [c for c in big.columns if c.startswith("user_") and c != "user_id"]
    per_user = big.group_by("user_id").agg(pl.col(user_cols).n_unique())
    assert (per_user.select(user_cols).max().row(0)) == (1,) * len(user_cols)
    item_cols = ["author_id", "item_category", "item_upload_days"]
    per_item = big.group_by("item_id").agg(
        pl.col(item_cols).n_unique(), pl.col("item_duration_s").drop_nulls().n_unique()
    )
    assert per_item.select(item_cols).max().row(0) == (1,) * len(item_cols)
    assert per_item["item_duration_s"].max() <= 1


def test_popularity_is_heavy_tailed(big: pl.DataFrame) -> None:
    item_counts = big["item_id"].value_counts()["count"].to_numpy()
    user_counts = big["user_id"].value_counts()["count"].to_numpy()
    assert item_counts.max() > 20 * np.median(item_counts)
    assert user_counts.max() > 10 * np.median(user_counts)


# --- labels -------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS, ids=[t.name for t in TASKS])
def test_rates_near_targets(big: pl.DataFrame, task: SynthTask) -> None:
    y = big[task.name].to_numpy()
    p = big[f"p_{task.name}"].to_numpy()
    assert set(np.unique(y)) <= {0, 1}
    assert p.min() > 0.0
    assert p.max() < 1.0
    std = math.sqrt(task.rate * (1 - task.rate) / BIG_ROWS)
    rel = 0.15 if task.rate < 0.005 else 0.10
    assert abs(y.mean() - task.rate) <= max(rel * task.rate, 4 * std)
    # The bias is calibrated on the rows, so mean p is (nearly) the target exactly, and the
    # realised rate only differs from it by Bernoulli noise.
    assert p.mean() == pytest.approx(task.rate, rel=1e-3)
    assert abs(y.mean() - p.mean()) <= 4 * std


def test_group_correlation(big: pl.DataFrame) -> None:
    logits = np.column_stack([_logit(big[f"p_{t.name}"].to_numpy()) for t in TASKS])
    corr = np.corrcoef(logits, rowvar=False)
    groups = [t.group for t in TASKS]
    n = len(TASKS)
    within = [corr[i, j] for i in range(n) for j in range(i + 1, n) if groups[i] == groups[j]]
    across = [corr[i, j] for i in range(n) for j in range(i + 1, n) if groups[i] != groups[j]]
    assert np.mean(within) > np.mean(across) + 0.2
    # The interaction group still shares some of the watch signal.
    assert np.mean(across) > 0.0


def test_true_probability_auc(big: pl.DataFrame) -> None:
    aucs = {t.name: _auc(big[t.name].to_numpy(), big[f"p_{t.name}"].to_numpy()) for t in TASKS}
    assert 0.65 < aucs["click"] < 0.9
    for t in TASKS:
        assert 0.6 < aucs[t.name] < 0.95, (t.name, aucs[t.name])
    dense = [aucs[t.name] for t in TASKS if t.group == "watch"]
    sparse = [aucs[t.name] for t in TASKS if t.group == "interaction"]
    assert np.mean(sparse) > np.mean(dense)


# --- interest drift ---------------------------------------------------------------------


def test_drifting_latents_walk() -> None:
    users, days, drift = 20_000, 5, 0.3
    u_lat = np.random.default_rng(0).normal(size=(users, LATENT_DIM))
    table = _drifting_latents(u_lat, days, drift, np.random.default_rng(1))
    assert table.shape == (users * days, LATENT_DIM)
    walk = table.reshape(users, days, LATENT_DIM) - u_lat[:, None, :]
    # Row user * days + day; the walk starts at the static latent on day 0.
    assert np.array_equal(table[np.arange(users) * days], u_lat)
    steps = np.diff(walk, axis=1)
    assert steps.std() == pytest.approx(drift, rel=0.01)
    assert abs(steps.mean()) < 0.005
    # Independent steps: the walk's variance grows linearly with the day.
    np.testing.assert_allclose(walk.var(axis=(0, 2)), drift**2 * np.arange(days), rtol=0.02)
    step_corr = np.corrcoef(steps[:, 0].ravel(), steps[:, 1].ravel())[0, 1]
    assert abs(step_corr) < 0.01


def test_drifting_latents_zero_drift_is_static() -> None:
    u_lat = np.random.default_rng(0).normal(size=(50, LATENT_DIM))
    table = _drifting_latents(u_lat, 7, 0.0, np.random.default_rng(1))
    assert np.array_equal(table, np.repeat(u_lat, 7, axis=0))


def _pair_logit_changes(frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Change of the true click logit and the day gap between consecutive impressions of the
    same (user, item) pair."""
    user, item = frame["user_id"].to_numpy(), frame["item_id"].to_numpy()
    order = np.lexsort((frame["ts"].to_numpy(), item, user))
    user, item = user[order], item[order]
    logit = _logit(frame["p_click"].to_numpy()[order])
    day = (frame["ts"].to_numpy()[order] - frame["ts"].min()) // 86_400
    same = (user[1:] == user[:-1]) & (item[1:] == item[:-1])
    return np.diff(logit)[same], np.diff(day)[same]


def test_drift_makes_user_item_affinity_change_over_days() -> None:
    """Only a drifting interest makes the same user-item pair's true logit move further apart
    the more days separate two impressions (context effects are independent of the gap)."""
    world = {"rows": 150_000, "users": 300, "items": 600, "authors": 100, "seed": 5, "swing": 0.0}
    ratios = {}
    for drift in (0.0, DEFAULT_DRIFT):
        change, gap = _pair_logit_changes(generate_log(**world, drift=drift))
        near, far = change[gap <= 1], change[gap >= 7]
        assert min(len(near), len(far)) > 2_000
        ratios[drift] = far.var() / near.var()
    assert 0.85 < ratios[0.0] < 1.15
    assert ratios[DEFAULT_DRIFT] > 2.0


def test_drift_changes_only_the_truth(small: pl.DataFrame) -> None:
    """The walk has its own random stream: drift leaves all other columns as they are (items
    by popularity: the retrieval stage follows the interest, so it moves the items too)."""
    static = generate_log(**SMALL, seed=7, drift=0.0, exposure=Exposure())
    truth = [t.name for t in TASKS] + [f"p_{t.name}" for t in TASKS]
    assert static.drop(truth).equals(generate_log(**SMALL, seed=7, exposure=Exposure()).drop(truth))
    assert not np.array_equal(static["p_click"].to_numpy(), small["p_click"].to_numpy())
    assert generate_log(**SMALL, seed=7, drift=0.5).equals(generate_log(**SMALL, seed=7, drift=0.5))


def test_cli_drift_default_matches() -> None:
    assert inspect.signature(synth).parameters["drift"].default == DEFAULT_DRIFT
    assert inspect.signature(generate).parameters["drift"].default == DEFAULT_DRIFT
    assert inspect.signature(generate_log).parameters["drift"].default == DEFAULT_DRIFT


# --- determinism ------------------------------------------------------------------------


def test_same_seed_same_frame(small: pl.DataFrame) -> None:
    assert generate_log(**SMALL, seed=7).equals(small)


def test_different_seed_differs(small: pl.DataFrame) -> None:
    other = generate_log(**SMALL, seed=8)
    assert not other.equals(small)
    assert not np.array_equal(other["p_click"].to_numpy(), small["p_click"].to_numpy())


# --- Parquet output -------------------------------------------------------------------------


def test_write_log_roundtrip(small: pl.DataFrame, tmp_path: Path) -> None:
    out = write_log(small, tmp_path / "log", rows_per_group=1_000)
    assert out == tmp_path / "log"
    day_dirs = sorted(p.name for p in out.iterdir())
    assert day_dirs == ["date=2024-01-01", "date=2024-01-02", "date=2024-01-03"]
    for day_dir in out.iterdir():
        assert [p.name for p in day_dir.iterdir()] == ["part-0.parquet"]
        pf = pq.ParquetFile(day_dir / "part-0.parquet")
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        assert len(sizes) > 1
        assert max(sizes) <= 1_000
        assert "date" not in pf.schema_arrow.names
        assert pl.read_parquet(day_dir / "part-0.parquet")["ts"].is_sorted()

    back = pl.read_parquet(out, hive_partitioning=True)
    assert _canonical(back).equals(_canonical(small))


def test_write_log_is_byte_deterministic(small: pl.DataFrame, tmp_path: Path) -> None:
    a = write_log(small, tmp_path / "a", rows_per_group=4_096)
    b = write_log(small, tmp_path / "b", rows_per_group=4_096)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.parquet"))
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_write_log_replaces_previous_log(tmp_path: Path) -> None:
    out = tmp_path / "log"
    write_log(generate_log(**{**SMALL, "days": 5}, seed=3), out)
    frame = generate_log(**SMALL, seed=4)
    write_log(frame, out)
    assert len(list(out.iterdir())) == SMALL["days"]
    assert _canonical(pl.read_parquet(out, hive_partitioning=True)).equals(_canonical(frame))


def test_write_log_refuses_foreign_files(small: pl.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "log"
    out.mkdir()
    keep = out / "notes.txt"
    keep.write_text("precious")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        write_log(small, out)
    assert keep.read_text() == "precious"

    nested = tmp_path / "log2"
    write_log(small, nested)
    (nested / "date=2024-01-01" / "README").write_text("x")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        write_log(small, nested)

    a_file = tmp_path / "file.parquet"
    a_file.write_bytes(b"")
    with pytest.raises(ValueError, match="not a directory"):
        write_log(small, a_file)


def test_generate_writes_same_as_write_log(tmp_path: Path) -> None:
    out = generate(tmp_path / "gen", **SMALL, seed=11, rows_per_group=2_000)
    assert out == tmp_path / "gen"
    assert len(list(out.iterdir())) == SMALL["days"]
    expected = _canonical(generate_log(**SMALL, seed=11))
    assert _canonical(pl.read_parquet(out, hive_partitioning=True)).equals(expected)


# --- argument validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rows": 0}, "rows must be a positive integer"),
        ({"rows": -5}, "rows must be a positive integer"),
        ({"days": 0}, "days must be a positive integer"),
        ({"users": 0}, "users must be a positive integer"),
        ({"items": -1}, "items must be a positive integer"),
        ({"authors": 0}, "authors must be a positive integer"),
        ({"start": "2024-13-01"}, "start must be a date string 'YYYY-MM-DD'"),
        ({"start": "yesterday"}, "start must be a date string 'YYYY-MM-DD'"),
        ({"start": "2024/01/01"}, "start must be a date string 'YYYY-MM-DD'"),
        ({"drift": -0.1}, "drift must be a finite number >= 0"),
        ({"drift": float("nan")}, "drift must be a finite number >= 0"),
        ({"drift": float("inf")}, "drift must be a finite number >= 0"),
        ({"drift": "0.2"}, "drift must be a finite number >= 0"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_log(**{"rows": 100, **kwargs})  # type: ignore[arg-type]


def test_bad_rows_per_group(small: pl.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rows_per_group must be a positive integer"):
        write_log(small, tmp_path / "x", rows_per_group=0)
    assert not (tmp_path / "x").exists()


def test_new_items_and_authors_appear_over_the_days_and_are_seen_fresh() -> None:
    frame = generate_log(rows=60_000, days=7, users=2_000, items=4_000, authors=400, seed=3,
                         new_items=0.3)  # fmt: skip
    first = frame.group_by("item_id").agg(pl.col("date").min().alias("first"))
    by_day = first.group_by("first").len().sort("first")
    assert by_day.height == 7 and (by_day["len"][1:] > 0).all()  # new items every day
    # A new item's upload day is its release, after the log's start: never shown before it.
    released = frame.filter(pl.col("item_upload_days") < 0)
    start = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
    day = ((released["ts"] - start) // 86_400).to_numpy()
    assert (day >= -released["item_upload_days"].to_numpy()).all()
    # A realistic share of each later day's impressions is on items younger than a day.
    fresh = (day == -released["item_upload_days"].to_numpy()).sum() / frame.filter(
        pl.col("date") != "2024-01-01"
    ).height
    assert 0.05 < fresh < 0.5, fresh
    authors_first = frame.group_by("author_id").agg(pl.col("date").min()).get_column("date")
    assert (authors_first != "2024-01-01").any()  # new authors too
    with pytest.raises(ValueError, match="new_items must be in"):
        generate_log(rows=10, new_items=1.0)


# --- the retrieval stage and the interest swing (issue 28) --------------------------------

WORLD = {"rows": 20_000, "users": 300, "items": 800, "authors": 100}


@pytest.mark.parametrize(
    ("extra", "pinned"),
    [
        ({"seed": 7}, ([2984948, 7620664, 7931, 576], 2995368.5)),
        ({"seed": 3, "new_items": 0.2}, ([2972516, 8078982, 7980, 583], 3282883.3)),
    ],
)
def test_no_mixing_and_no_swing_is_the_log_as_it_was(extra: dict, pinned: tuple) -> None:
    """Pinned from the generator before the retrieval stage and the swing existed."""
    frame = generate_log(**WORLD, **extra, exposure=Exposure(), swing=0.0)
    sums = [int(frame[c].sum()) for c in ("user_id", "item_id", "click", "like")]
    weighted = float((frame["p_click"].cast(pl.Float64) * frame["item_id"]).sum())
    assert (sums, round(weighted, 1)) == (pinned[0], pytest.approx(pinned[1], abs=0.2))


def test_the_retrieval_stage_picks_by_the_days_interest() -> None:
    """Interest share: the softmax pick among popular candidates (sharp: their best); explore
    share: uniform; the rest keep their popularity draw."""
    rng = np.random.default_rng(0)
    rows, items = 40_000, 2_000
    i_lat = rng.normal(size=(items, LATENT_DIM))
    user_w = rng.normal(size=(500, LATENT_DIM)) / np.sqrt(LATENT_DIM)  # unit-variance scores
    lat_row = rng.integers(0, 500, rows)
    popular = rng.integers(0, 50, rows)  # "popularity": the first 50 items only
    day = np.zeros(rows, np.int64)

    def draw(uniform: bool, on_days: np.ndarray) -> np.ndarray:
        return rng.integers(0, items if uniform else 50, len(on_days))

    def score(item: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.einsum("nk,nk->n", user_w[lat_row[rows]], i_lat[item[rows]])

    exposure = Exposure(interest=0.5, explore=0.2, candidates=20, sharpness=50.0)
    chosen = _retrieve(exposure, popular, day, (user_w, lat_row), i_lat, draw, rng)
    moved = chosen != popular
    explored = chosen >= 50
    assert explored.mean() == pytest.approx(0.2 * (1 - 50 / items), abs=0.01)
    picked = moved & ~explored  # the interest share (less the few picks equal to the draw)
    assert picked.mean() == pytest.approx(0.5, abs=0.03)
    # Near the best of 20 unit-variance scores (E max = 1.87), the popular draw near 0.
    assert score(chosen, picked).mean() > 1.6
    assert abs(score(chosen, ~moved & ~explored).mean()) < 0.5


def test_interest_exposure_changes_only_the_items_and_keeps_the_rates() -> None:
    world = {**WORLD, "rows": 60_000, "seed": 2}
    popular = generate_log(**world, exposure=Exposure())
    interested = generate_log(**world, exposure=DEFAULT_EXPOSURE)
    for task in TASKS:
        assert interested[f"p_{task.name}"].mean() == pytest.approx(task.rate, rel=1e-3)
    kept = ["user_id", "ts", "hour", "page", "device", "user_age"]
    # (Sorted: the log's order breaks ties of time by the item.)
    interested, popular = interested.sort(kept), popular.sort(kept)
    assert interested.select(kept).equals(popular.select(kept))
    changed = (interested["item_id"] != popular["item_id"]).mean()
    assert 0.5 < changed < 0.7  # the interest and explore shares, less picks of the same item


def test_the_swing_is_stationary_and_persistent() -> None:
    users, days, swing = 20_000, 6, 0.7
    lat = np.zeros((users * days, LATENT_DIM))
    x = _swinging(lat, days, swing, np.random.default_rng(0)).reshape(users, days, LATENT_DIM)
    np.testing.assert_allclose(x.std(axis=(0, 2)), swing, rtol=0.02)  # every day alike
    lag1 = np.corrcoef(x[:, 2:].ravel(), x[:, 1:-1].ravel())[0, 1]
    assert lag1 == pytest.approx(SWING_MEMORY, abs=0.01)
    lag3 = np.corrcoef(x[:, 3:].ravel(), x[:, :-3].ravel())[0, 1]
    assert lag3 == pytest.approx(SWING_MEMORY**3, abs=0.02)


def test_static_truth_is_the_truth_without_drift_or_swing_and_below_it_with() -> None:
    flat = generate_log(**WORLD, seed=4, drift=0.0, swing=0.0, static_truth=True)
    for task in TASKS:
        assert flat[f"p_static_{task.name}"].equals(
            flat[f"p_{task.name}"].alias(f"p_static_{task.name}")
        )
    moving = generate_log(**{**WORLD, "rows": 60_000}, seed=4, static_truth=True)
    y = moving["click"].to_numpy()
    gap = _auc(y, moving["p_click"].to_numpy()) - _auc(y, moving["p_static_click"].to_numpy())
    assert gap > 0.02  # what knowing the day's interest is worth over a static embedding


@pytest.mark.parametrize(
    ("exposure", "message"),
    [
        ({"interest": 0.8, "explore": 0.3}, "at most 1"),
        ({"interest": -0.1}, "interest must be"),
        ({"candidates": 0}, "candidates must be"),
        ({"sharpness": float("inf")}, "sharpness must be"),
    ],
)
def test_bad_exposure(exposure: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Exposure(**exposure)


def test_cli_exposure_and_swing_defaults_match() -> None:
    params = inspect.signature(synth).parameters
    assert params["swing"].default == DEFAULT_SWING
    given = Exposure(
        *(params[k].default for k in ("interest", "explore", "candidates", "sharpness"))
    )
    assert given == DEFAULT_EXPOSURE
    for function in (generate, generate_log):
        signature = inspect.signature(function).parameters
        assert signature["exposure"].default == DEFAULT_EXPOSURE
        assert signature["swing"].default == DEFAULT_SWING


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--interest", "0.9", "--explore", "0.3"], "at most 1"),
        (["--swing", "-1"], "swing must be"),
        (["--drift", "-1"], "drift must be"),
    ],
)
def test_synth_refuses_a_bad_knob_in_one_line(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["synth", "--rows", "100", "--out", str(tmp_path / "log"), *flags])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("ranker: error: synth:") and message in error
    assert "Traceback" not in error and not (tmp_path / "log").exists()

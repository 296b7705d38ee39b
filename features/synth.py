"""Deterministic synthetic Kuaishou-like behaviour log.

Generative story
----------------
1. **Entities.** Users get fixed attributes (gender, age bucket, city tier, active degree,
   follow count, account age, main device). Authors have a home category and a quality;
   every item has exactly one author, a category (usually its author's), a duration and an
   upload age.
2. **Latents.** Every user and item has a ``k``-dim latent vector that is *partly* an embedding
   of observable attributes (user: age, gender, active degree; item: category, author) plus
   idiosyncratic noise. A ranker can therefore recover most of it from attribute features and
   the rest from id embeddings given a few dozen impressions per entity.
3. **Drifting interest.** A user's interest is not static: their latent follows a Gaussian
   random walk over the days, starting at the static latent of step 2 on the first day (see
   ``_drifting_latents``). Every bilinear score below uses the latent of the impression's day,
   so a user's recent positive items reveal their *current* interest, while a user-id
   embedding can only learn its average over the training days (and lags behind on later
   days). ``drift=0`` keeps the interest static.
4. **Impressions.** Users (by activity) and items (by popularity) are drawn from Zipf-like
   power laws; day and hour follow weekly / daily traffic cycles (evening peak); page and
   device are the impression context. A simulated retrieval stage (``Exposure``) may instead
   draw an impression's item from the user's *current* interest, as a feed does: a share
   ``interest`` of the impressions picks among ``candidates`` popularity-drawn items by a
   softmax of ``sharpness`` times the user's watch-interest score ``s_watch`` on that day, a
   share ``explore`` is a uniform draw from the catalogue, the rest stays by popularity.
   What a user clicked then reveals their current interest, not mostly the popular items
   (``Exposure()``, no mixing, is the log as it always was).
5. **Labels.** For task ``t`` in group ``g``::

       logit_t = bias_t + a_t * s_g(u, i) + b_t * s_t(u, i) + c_t * s_watch(u, i) + effects_t

   where ``s = u_d^T W v`` are bilinear scores of the user's latent ``u_d`` on the
   impression's day and the item's latent ``v``: ``s_g`` is shared inside a group (so tasks in a
   group correlate), ``c_t`` lets interaction tasks lean weakly on the watch signal, and
   ``s_t`` is task specific so even sparse tasks carry their own signal. ``effects_t`` covers
   item quality, user propensity, hour, page, device, duration, freshness, activity and
   follow count. ``bias_t`` is calibrated on the generated rows so that ``mean(p_t)`` equals
   the task's target rate, and ``label_t ~ Bernoulli(p_t)`` independently given ``p_t``; the
   stored ``p_t`` is thus the Bayes-optimal score and its AUC the best achievable one.

Everything is vectorised numpy driven by one ``np.random.default_rng(seed)`` (the interest
drift by a stream spawned from it, so ``drift`` changes nothing but the probabilities and
labels), and the same arguments always give the same frame (and the same Parquet files).
"""

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds


@dataclass(frozen=True)
class SynthTask:
    """A binary label of the synthetic log: its column name, task group and target rate."""

    name: str
    group: str
    rate: float


def _check_scale(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.integer | np.floating)
        or not (np.isfinite(value) and value >= 0)
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Exposure:
    """The retrieval stage that picks each impression's item (see the module docstring):
    ``interest`` and ``explore`` are shares of the impressions (their sum at most 1), the
    rest by popularity; ``candidates`` popularity-drawn items an interest retrieval picks
    among, by a softmax of ``sharpness`` x the user's watch-interest score (unit variance)."""

    interest: float = 0.0
    explore: float = 0.0
    candidates: int = 20
    sharpness: float = 2.0

    def __post_init__(self) -> None:
        for name in ("interest", "explore", "sharpness"):
            _check_scale(f"exposure {name}", getattr(self, name))
        _check_positive(**{"exposure candidates": self.candidates})
        if self.interest + self.explore > 1:
            raise ValueError(
                f"exposure shares interest + explore must be at most 1, got "
                f"{self.interest} + {self.explore}"
            )

    @property
    def mixing(self) -> bool:
        return self.interest > 0 or self.explore > 0


# The default log's retrieval stage: most impressions follow the user's interest, some
# explore, the rest by popularity.
DEFAULT_EXPOSURE = Exposure(interest=0.6, explore=0.05, candidates=20, sharpness=2.0)


TASKS: tuple[SynthTask, ...] = (
    SynthTask("click", "watch", 0.40),
    SynthTask("effective_view", "watch", 0.25),
    SynthTask("long_view", "watch", 0.12),
    SynthTask("like", "interaction", 0.03),
    SynthTask("comment", "interaction", 0.008),
    SynthTask("forward", "interaction", 0.005),
    SynthTask("follow", "interaction", 0.003),
    SynthTask("collect", "interaction", 0.01),
)

GROUPS: tuple[str, ...] = ("watch", "interaction")

GENDERS = ("M", "F", "U")
AGES = ("<18", "18-24", "25-30", "31-40", "41-50", "50+")
ACTIVE_DEGREES = ("high", "middle", "low", "new")
PAGES = ("featured", "follow", "nearby", "single")
DEVICES = ("android", "ios")
N_CATEGORIES = 40
LATENT_DIM = 8

_GENDER_P = (0.46, 0.44, 0.10)
_AGE_P = (0.08, 0.27, 0.24, 0.22, 0.12, 0.07)
_CITY_TIER_P = (0.10, 0.20, 0.25, 0.25, 0.20)
_ACTIVE_P = (0.20, 0.30, 0.35, 0.15)
# Heavy users see many more impressions than casual / new ones.
_ACTIVE_VOLUME = (4.0, 2.0, 0.8, 0.6)
# Base logit shift of the active degree; scaled per task by ``_COEF["activity"]``.
_ACTIVE_EFFECT = (0.30, 0.10, -0.20, -0.30)
_PAGE_P = (0.55, 0.12, 0.08, 0.25)
# iOS share falls from tier-1 to tier-5 cities.
_IOS_BY_TIER = (0.45, 0.35, 0.28, 0.20, 0.15)
# Relative traffic per hour of day: night trough around 4am, evening peak around 9pm.
_HOUR_TRAFFIC = (
    3.0, 2.0, 1.3, 0.9, 0.7, 0.8, 1.3, 2.2, 2.8, 3.0, 3.1, 3.4,
    4.2, 4.0, 3.4, 3.3, 3.5, 3.8, 4.3, 5.0, 5.6, 6.0, 5.6, 4.4,
)  # fmt: skip
_WEEKEND_BOOST = 1.15
_MISSING_DURATION_RATE = 0.02


# Logit coefficients, one column per task in TASKS order. Dense watch tasks get a moderate
# logit spread; sparse interaction tasks a strong task-specific term, so their
# true-probability AUC is somewhat higher (as in real logs).
# fmt: off
_COEF: dict[str, tuple[float, ...]] = {
    #               click  e_view l_view like   comment forward follow collect
    "group_w":     (0.75,  0.75,  0.75,  0.70,  0.65,  0.60,  0.60,  0.65),  # a_t: s_group
    "task_w":      (0.40,  0.45,  0.50,  0.60,  0.75,  0.80,  0.85,  0.75),  # b_t: s_task
    "watch_w":     (0.00,  0.00,  0.00,  0.30,  0.25,  0.25,  0.20,  0.25),  # c_t: s_watch
    "quality":     (0.35,  0.40,  0.45,  0.50,  0.40,  0.60,  0.50,  0.50),  # item quality
    "hour":        (0.15,  0.10,  0.15,  0.20,  0.30,  0.20,  0.10,  0.10),  # evening boost
    "page_follow": (0.30,  0.20,  0.20,  0.50,  0.60,  0.20, -1.50,  0.20),  # vs. featured
    "page_nearby": (-0.20, -0.10, -0.10, 0.10,  0.30,  0.20,  0.40,  0.00),
    "page_single": (0.30,  0.20,  0.30,  0.10,  0.00, -0.10,  0.00,  0.10),
    "ios":         (0.05,  0.05,  0.00,  0.15,  0.10,  0.20,  0.00,  0.15),
    "duration":    (0.10, -0.35, -0.60,  0.10,  0.20,  0.00,  0.00,  0.30),  # per std of log
    "freshness":   (-0.15, -0.15, -0.10, -0.30, -0.40, -0.50, -0.20, -0.20),  # per 30 days
    "activity":    (0.80,  0.80,  0.80,  1.00,  1.20,  0.80,  0.60,  0.80),  # x _ACTIVE_EFFECT
    "follows":     (0.05,  0.00,  0.00,  0.15,  0.10,  0.05,  0.20,  0.00),  # per std of log
}
# fmt: on

# Std of the per-user propensity for each group (learnable from the user id).
_PROPENSITY_STD = {"watch": 0.45, "interaction": 0.60}

# Daily std of the users' interest drift per latent coordinate (the static latent's is 1).
DEFAULT_DRIFT = 0.2
# Std of the day-to-day swing of the interest around its course (``_swinging``): with the
# default exposure, knowing the day's interest is worth about 0.03 mean AUC over the best a
# static user embedding can do (0.034 on the 1M-row default log; ``ranker synth`` prints it).
DEFAULT_SWING = 1.0


def _zipf_weights(n: int, alpha: float, shift: float, rng: np.random.Generator) -> np.ndarray:
    """Power-law weights over randomly permuted ranks, so popularity is not tied to the id."""
    ranks = rng.permutation(n).astype(np.float64) + shift
    return ranks**-alpha


def _sample(weights: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``size`` indices proportionally to ``weights`` (inverse-CDF, fully vectorised)."""
    cdf = np.cumsum(weights, dtype=np.float64)
    cdf /= cdf[-1]
    idx = np.searchsorted(cdf, rng.random(size), side="right")
    return np.minimum(idx, len(weights) - 1)


def _choice(p: tuple[float, ...], size: int, rng: np.random.Generator) -> np.ndarray:
    return _sample(np.asarray(p, dtype=np.float64), size, rng)


def _embedding(rows: int, var: float, rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0.0, np.sqrt(var), size=(rows, LATENT_DIM))


def _bilinear(rng: np.random.Generator) -> np.ndarray:
    """A random ``k x k`` interaction matrix with unit Frobenius norm.

    With (roughly) unit-variance, independent user and item latents, ``u^T W v`` then has
    unit variance, which keeps the task coefficients interpretable as logit scales.
    """
    w = rng.normal(size=(LATENT_DIM, LATENT_DIM))
    return w / np.linalg.norm(w)


def _drifting_latents(
    u_lat: np.ndarray, days: int, drift: float, rng: np.random.Generator
) -> np.ndarray:
    """Per-(user, day) latents: a Gaussian random walk per user, started at its static latent.

    Row ``user * days + day`` holds ``u_lat[user] + step[user, 1] + ... + step[user, day]``
    with independent ``step ~ N(0, drift**2 * I)``; day 0 is the static latent itself. The
    static latent has unit variance per coordinate, so ``drift`` is the daily step's std in
    units of the static latent's, and on day ``d`` the drifted part's variance is
    ``d * drift**2`` times the static part's. ``drift=0`` gives a constant latent.
    """
    users, k = u_lat.shape
    steps = rng.normal(0.0, drift, size=(users, days - 1, k))
    walk = np.cumsum(steps, axis=1)
    walk = np.concatenate([np.zeros((users, 1, k)), walk], axis=1)
    return (u_lat[:, None, :] + walk).reshape(users * days, k)


SWING_MEMORY = 0.8  # the share of a day's interest swing that persists to the next day


def _swinging(lat: np.ndarray, days: int, swing: float, rng: np.random.Generator) -> np.ndarray:
    """Per-(user, day) latents ``lat`` (row ``user * days + day``) plus a day-to-day swing of
    the interest around them: an AR(1) per user and coordinate, ``x_0 ~ N(0, swing^2)``,
    ``x_d = m x_(d-1) + sqrt(1 - m^2) e_d`` with ``e_d ~ N(0, swing^2)`` and ``m`` =
    ``SWING_MEMORY``: stationary (variance ``swing^2`` every day, unlike the walk's growth),
    averaging out over the days (what a static user embedding learns), persistent enough that
    the last days' behaviour reveals today's."""
    users = len(lat) // days
    shocks = rng.normal(0.0, swing, size=(users, days, LATENT_DIM))
    x = np.empty_like(shocks)
    x[:, 0] = shocks[:, 0]
    keep, fresh = SWING_MEMORY, np.sqrt(1.0 - SWING_MEMORY**2)
    for d in range(1, days):
        x[:, d] = keep * x[:, d - 1] + fresh * shocks[:, d]
    return lat + x.reshape(users * days, LATENT_DIM)


def _score(
    user_lat: np.ndarray, user: np.ndarray, item_rows: np.ndarray, w: np.ndarray
) -> np.ndarray:
    """Row-wise ``u^T W v``; row ``n`` takes user latent ``user_lat[user[n]]``.

    ``W`` is applied per user (small) before gathering per row: a (rows x k) @ (k x k) matmul
    is far slower than the gather.
    """
    return np.einsum("nk,nk->n", (user_lat @ w)[user], item_rows)


def _calibrate_bias(z: np.ndarray, rate: float, max_iter: int = 100) -> float:
    """Find ``b`` with ``mean(sigmoid(b + z)) == rate`` (safeguarded Newton on the log-mean).

    Working on ``log mean p`` makes rare tasks behave almost linearly in ``b``, so Newton
    converges in a handful of vectorised steps; bisection on the bracket catches overshoots.
    """
    lo, hi = -40.0 - float(z.max()), 40.0 - float(z.min())
    b = float(np.log(rate / (1.0 - rate)) - np.median(z))
    target = np.log(rate)
    for _ in range(max_iter):
        # Clipping keeps exp finite while bisecting from a wide bracket.
        p = 1.0 / (1.0 + np.exp(-np.clip(b + z, -50.0, 50.0)))
        mean_p = float(p.mean())
        err = np.log(mean_p) - target
        if abs(err) < 1e-10:
            break
        if err > 0:
            hi = b
        else:
            lo = b
        slope = float((p * (1.0 - p)).mean()) / mean_p
        step = b - err / slope if slope > 0 else np.nan
        b = step if lo < step < hi else 0.5 * (lo + hi)
    return b


def _calibrated(z: np.ndarray, rate: float) -> np.ndarray:
    """``sigmoid(b + z)`` as float32, with ``b`` such that its mean is ``rate``."""
    return (1.0 / (1.0 + np.exp(-(_calibrate_bias(z, rate) + z)))).astype(np.float32)


def _parse_start(start: str) -> datetime:
    try:
        return datetime.strptime(start, "%Y-%m-%d").replace(tzinfo=UTC)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"start must be a date string 'YYYY-MM-DD', got {start!r}") from exc


def _strings(labels: tuple[str, ...], codes: np.ndarray) -> pl.Series:
    """Map integer codes to a Utf8 column without materialising Python strings per row."""
    return pl.Series(labels, dtype=pl.Utf8).gather(codes)


FRESH_BOOST, FRESH_DAYS = 8.0, 1.0  # a new item's extra exposure, and how fast it fades


def _release_days(
    i_author: np.ndarray, authors: int, days: int, share: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Release day of each item (0: before the log) and its author, for a catalogue that grows:
    ``share`` of the items and of the authors are released on a uniform day 1 .. days - 1. An
    item whose author is released after it takes an author released in time instead."""
    items = len(i_author)
    a_release = np.where(rng.random(authors) < share, rng.integers(1, max(days, 2), authors), 0)
    i_release = np.where(rng.random(items) < share, rng.integers(1, max(days, 2), items), 0)
    a_release[0] = i_release[0] = 0  # the catalogue is never empty
    late = a_release[i_author] > i_release
    early = np.flatnonzero(a_release == 0)
    i_author = np.where(late, early[rng.integers(0, len(early), items)], i_author)
    return i_release, i_author


def _sample_by_day(
    popularity: np.ndarray,
    release: np.ndarray,
    day: np.ndarray,
    days: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Each impression's item among those released by its day: popularity times a freshness
    boost ``1 + FRESH_BOOST * exp(-age / FRESH_DAYS)`` for items released during the log (one
    draw per day, vectorised within it)."""
    item = np.empty(len(day), dtype=np.int64)
    for d in range(days):
        rows = np.flatnonzero(day == d)
        age = d - release
        fresh = np.where(release > 0, 1.0 + FRESH_BOOST * np.exp(-age / FRESH_DAYS), 1.0)
        item[rows] = _sample(np.where(age >= 0, popularity * fresh, 0.0), len(rows), rng)
    return item


RETRIEVAL_CHUNK = 65_536  # impressions the retrieval stage scores at once (bounds memory)


def _retrieve(
    exposure: Exposure,
    item: np.ndarray,
    day: np.ndarray,
    interest: tuple[np.ndarray, np.ndarray],
    i_lat: np.ndarray,
    draw: Callable[[bool, np.ndarray], np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """Each impression's item after the retrieval stage (``Exposure``): ``item`` (drawn by
    popularity) for the popularity share; ``draw(True, days)`` (uniform) for the explore
    share; for the interest share, the Gumbel-max pick (a softmax sample) of ``sharpness`` x
    score among ``candidates`` items from ``draw(False, days)`` (by popularity). An
    impression's score of an item: its row of ``interest = (u_d^T W_watch per user-day, the
    row of each impression)`` dotted with the item's latent."""
    user_w, lat_row = interest
    route = rng.random(len(item))
    explore = route < exposure.explore
    chosen = item.copy()
    rows = np.flatnonzero(explore)
    chosen[rows] = draw(True, day[rows])
    rows = np.flatnonzero(~explore & (route < exposure.explore + exposure.interest))
    k = exposure.candidates
    candidates = draw(False, np.repeat(day[rows], k)).reshape(len(rows), k)
    for start in range(0, len(rows), RETRIEVAL_CHUNK):
        r, c = rows[start : start + RETRIEVAL_CHUNK], candidates[start : start + RETRIEVAL_CHUNK]
        score = np.einsum("nk,nck->nc", user_w[lat_row[r]], i_lat[c])
        pick = np.argmax(exposure.sharpness * score + rng.gumbel(size=score.shape), axis=1)
        chosen[r] = c[np.arange(len(r)), pick]
    return chosen


def generate_log(
    rows: int = 1_000_000,
    days: int = 14,
    start: str = "2024-01-01",
    users: int = 20_000,
    items: int = 50_000,
    authors: int = 5_000,
    seed: int = 0,
    drift: float = DEFAULT_DRIFT,
    new_items: float = 0.0,
    exposure: Exposure = DEFAULT_EXPOSURE,
    swing: float = DEFAULT_SWING,
    static_truth: bool = False,
) -> pl.DataFrame:
    """Generate a synthetic impression log (one row per impression), sorted by ``ts``.

    See the module docstring for the generative model and ``TASKS`` for the labels. Columns:
    ids (``user_id``, ``item_id``, ``author_id``, ``ts``, ``date``), user / item / context
    features, one Int8 label per task and its true probability ``p_<task>`` (Float32).
    ``drift`` is the daily std of the users' interest drift per latent coordinate, relative to
    the static interest's (see ``_drifting_latents``); 0 keeps interests static.
    ``new_items`` is the share of items (and of authors) released during the log rather than
    before it (``_release_days``): each appears from its release day on, boosted while fresh
    (``_sample_by_day``); 0 keeps the catalogue fixed (and the log as it always was).
    ``swing``: the std of a day-to-day swing of the interest around its course
    (``_swinging``; 0: none). ``exposure``: the retrieval stage (``Exposure``; ``Exposure()``,
    no mixing: items by popularity). ``swing=0, exposure=Exposure()`` is the log as it was
    before both existed (2026-12-07). ``static_truth`` adds ``p_static_<task>``:
    each task's probability with the user's interest averaged over the log's days, the best a
    model that cannot see the current interest (a static user embedding) could do; the AUC it
    loses against ``p_<task>`` is the gap a history can close.
    """
    _check_positive(rows=rows, days=days, users=users, items=items, authors=authors)
    _check_scale("drift", drift)
    _check_scale("swing", swing)
    if not 0 <= new_items < 1:
        raise ValueError(f"new_items must be in [0, 1), got {new_items}")
    start_dt = _parse_start(start)
    rng = np.random.default_rng(seed)
    # Spawned (not drawn) from ``rng``: every other draw is the same whatever ``drift`` is.
    drift_rng, release_rng = rng.spawn(2) if new_items else (rng.spawn(1)[0], None)
    exposure_rng, swing_rng = rng.spawn(2)

    # --- users (fixed attributes) -------------------------------------------------------
    u_gender = _choice(_GENDER_P, users, rng)
    u_age = _choice(_AGE_P, users, rng)
    u_tier = _choice(_CITY_TIER_P, users, rng)
    u_active = _choice(_ACTIVE_P, users, rng)
    u_follows = np.floor(rng.lognormal(3.0, 1.5, users)).astype(np.int64)
    # New users registered within the last month; the others up to ~8 years ago.
    u_register = np.where(
        u_active == ACTIVE_DEGREES.index("new"),
        rng.integers(0, 31, users),
        np.minimum(31 + np.floor(rng.lognormal(6.0, 0.9, users)), 3000),
    ).astype(np.int64)
    u_ios = rng.random(users) < np.asarray(_IOS_BY_TIER)[u_tier]
    # Latent = attribute embeddings (60% of the variance) + idiosyncratic part (40%).
    u_lat = (
        _embedding(6, 0.2, rng)[u_age]
        + _embedding(3, 0.2, rng)[u_gender]
        + _embedding(4, 0.2, rng)[u_active]
        + _embedding(users, 0.4, rng)
    )
    u_prop = {g: rng.normal(0.0, _PROPENSITY_STD[g], users) for g in GROUPS}
    u_volume = _zipf_weights(users, 0.7, 50.0, rng) * np.asarray(_ACTIVE_VOLUME)[u_active]

    # --- authors and items (fixed attributes) -------------------------------------------
    a_category = rng.integers(0, N_CATEGORIES, authors)
    a_quality = rng.normal(0.0, 0.45, authors)
    i_author = _sample(_zipf_weights(authors, 0.8, 5.0, rng), items, rng)
    i_category = np.where(
        rng.random(items) < 0.75, a_category[i_author], rng.integers(0, N_CATEGORIES, items)
    ).astype(np.int64)
    # Categories differ in typical length (e.g. music clips vs. tutorials).
    cat_log_dur = rng.normal(np.log(25.0), 0.5, N_CATEGORIES)
    i_duration = np.clip(np.exp(cat_log_dur[i_category] + rng.normal(0.0, 0.7, items)), 5, 300)
    i_upload = rng.integers(0, 61, items)
    i_quality = a_quality[i_author] + rng.normal(0.0, 0.45, items)
    i_lat = (
        _embedding(N_CATEGORIES, 0.3, rng)[i_category]
        + _embedding(authors, 0.35, rng)[i_author]
        + _embedding(items, 0.35, rng)
    )
    # Better content gets more exposure, on top of the power-law popularity.
    i_popularity = _zipf_weights(items, 0.95, 10.0, rng) * np.exp(0.5 * i_quality)
    i_release = np.zeros(items, dtype=np.int64)
    if release_rng is not None:
        i_release, i_author = _release_days(i_author, authors, days, new_items, release_rng)
        i_upload = np.where(i_release > 0, -i_release, i_upload)  # uploaded after the start

    # --- interaction matrices --------------------------------------------------------------
    w_group = {g: _bilinear(rng) for g in GROUPS}
    w_task = {t.name: _bilinear(rng) for t in TASKS}

    # --- impressions ------------------------------------------------------------------------
    user = _sample(u_volume, rows, rng)
    item = _sample(i_popularity, rows, rng)
    weekday = np.array([(start_dt + timedelta(days=d)).weekday() for d in range(days)])
    day = _sample(np.where(weekday >= 5, _WEEKEND_BOOST, 1.0), rows, rng)
    if release_rng is not None:
        item = _sample_by_day(i_popularity, i_release, day, days, release_rng)
    hour = _sample(np.asarray(_HOUR_TRAFFIC), rows, rng)
    start_ts = int(start_dt.timestamp())
    ts = start_ts + day * 86_400 + hour * 3_600 + rng.integers(0, 3_600, rows)
    page = _choice(_PAGE_P, rows, rng)
    # Users mostly stick to their main device.
    ios = np.where(rng.random(rows) < 0.95, u_ios[user], ~u_ios[user])
    duration_missing = rng.random(rows) < _MISSING_DURATION_RATE

    # Scores use the user's latent on the impression's day (row ``user * days + day``).
    if drift > 0 or swing > 0:
        user_lat, lat_row = _drifting_latents(u_lat, days, drift, drift_rng), user * days + day
        if swing > 0:
            user_lat = _swinging(user_lat, days, swing, swing_rng)
    else:
        user_lat, lat_row = u_lat, user
    if exposure.mixing:

        def draw(uniform: bool, on_days: np.ndarray) -> np.ndarray:
            w = np.ones(items) if uniform else i_popularity
            if release_rng is None:
                return _sample(w, len(on_days), exposure_rng)
            return _sample_by_day(w, i_release, on_days, days, exposure_rng)

        interest = (user_lat @ w_group["watch"], lat_row)
        item = _retrieve(exposure, item, day, interest, i_lat, draw, exposure_rng)

    # --- logits ------------------------------------------------------------------------------
    ilat = i_lat[item]

    def interest_logits(lat: np.ndarray, row: np.ndarray) -> list[np.ndarray]:
        """Each task's logit terms read from the user's interest ``lat[row]``."""
        s_group = {g: _score(lat, row, ilat, w_group[g]) for g in GROUPS}
        return [
            _COEF["group_w"][j] * s_group[task.group]
            + _COEF["task_w"][j] * _score(lat, row, ilat, w_task[task.name])
            + _COEF["watch_w"][j] * s_group["watch"]
            for j, task in enumerate(TASKS)
        ]

    dur_z = (np.log(i_duration[item]) - np.log(25.0)) / 0.8
    age_months = (i_upload[item] + day) / 30.0
    follows_z = (np.log1p(u_follows[user]) - 3.0) / 1.5
    # Evening leisure time: +1 at 9pm, -1 at 9am.
    evening = np.cos(2.0 * np.pi * (hour - 21) / 24.0)
    active = u_active[user]
    quality = i_quality[item]

    probs: dict[str, np.ndarray] = {}
    page_effect = np.zeros((len(PAGES), len(TASKS)))
    page_effect[1:] = [_COEF["page_follow"], _COEF["page_nearby"], _COEF["page_single"]]
    current = interest_logits(user_lat, lat_row)
    static = None
    if static_truth:  # the interest averaged over the days: what a static embedding can know
        static_lat = user_lat.reshape(users, -1, LATENT_DIM).mean(1)  # [users, k]
        static = interest_logits(static_lat, user)
    for j, task in enumerate(TASKS):
        c = {name: values[j] for name, values in _COEF.items()}
        rest = (
            c["quality"] * quality
            + u_prop[task.group][user]
            + c["hour"] * evening
            + page_effect[page, j]
            + c["ios"] * ios
            + c["duration"] * dur_z
            + c["freshness"] * age_months
            + c["activity"] * np.asarray(_ACTIVE_EFFECT)[active]
            + c["follows"] * follows_z
        )
        probs[task.name] = _calibrated(current[j] + rest, task.rate)
        if static is not None:
            probs[f"static_{task.name}"] = _calibrated(static[j] + rest, task.rate)
    # Labels are drawn from the stored float32 probabilities, so p_t is exactly the truth.
    labels = {t.name: (rng.random(rows) < probs[t.name]).astype(np.int8) for t in TASKS}

    # --- assemble, sorted by time (ties broken by ids for a total, deterministic order) ---
    order = np.lexsort((item, user, ts))
    user, item, ts, day, hour, page, ios = (
        a[order] for a in (user, item, ts, day, hour, page, ios)
    )
    duration = np.where(duration_missing[order], np.nan, i_duration[item])
    dates = tuple((start_dt + timedelta(days=d)).strftime("%Y-%m-%d") for d in range(days))
    columns: dict[str, pl.Series] = {
        "user_id": pl.Series(user, dtype=pl.Int64),
        "item_id": pl.Series(item, dtype=pl.Int64),
        "author_id": pl.Series(i_author[item], dtype=pl.Int64),
        "ts": pl.Series(ts, dtype=pl.Int64),
        "date": _strings(dates, day),
        "user_gender": _strings(GENDERS, u_gender[user]),
        "user_age": _strings(AGES, u_age[user]),
        "user_city_tier": pl.Series(u_tier[user] + 1, dtype=pl.Int64),
        "user_active_degree": _strings(ACTIVE_DEGREES, u_active[user]),
        "user_follow_count": pl.Series(u_follows[user], dtype=pl.Int64),
        "user_register_days": pl.Series(u_register[user], dtype=pl.Int64),
        "item_category": pl.Series(i_category[item], dtype=pl.Int64),
        "item_duration_s": pl.Series(duration, dtype=pl.Float64, nan_to_null=True),
        "item_upload_days": pl.Series(i_upload[item], dtype=pl.Int64),
        "hour": pl.Series(hour, dtype=pl.Int64),
        "page": _strings(PAGES, page),
        "device": _strings(DEVICES, ios.astype(np.int64)),
    }
    for name, y in labels.items():
        columns[name] = pl.Series(y[order], dtype=pl.Int8)
    for name, p in probs.items():
        columns[f"p_{name}"] = pl.Series(p[order], dtype=pl.Float32)
    return pl.DataFrame({name: s.alias(name) for name, s in columns.items()})


def _clear_output_dir(out: Path) -> None:
    """Remove a previous log at ``out``, refusing if it holds anything but Parquet partitions.

    A stale run with other days would otherwise survive next to the new partitions; but
    ``out`` could also be a mistyped path to user data, so only delete what we could have
    written ourselves.
    """
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")
    foreign: list[Path] = []
    for entry in out.iterdir():
        if entry.is_symlink():
            foreign.append(entry)
        elif entry.is_dir() and entry.name.startswith("date="):
            foreign.extend(
                p
                for p in entry.rglob("*")
                if p.is_symlink() or not (p.is_dir() or p.suffix == ".parquet")
            )
        elif not (entry.is_file() and entry.suffix == ".parquet"):
            foreign.append(entry)
    if foreign:
        shown = ", ".join(str(p) for p in foreign[:5])
        raise ValueError(
            f"refusing to overwrite {out}: it contains files that are not Parquet log "
            f"partitions ({shown}{', ...' if len(foreign) > 5 else ''})"
        )
    shutil.rmtree(out)


def write_log(frame: pl.DataFrame, out_dir: str | Path, rows_per_group: int = 65_536) -> Path:
    """Write ``frame`` as hive-partitioned Parquet ``out_dir/date=YYYY-MM-DD/part-0.parquet``.

    Rows inside a day are sorted by ``ts``; ``date`` only lives in the directory name. An
    existing log at ``out_dir`` is replaced (see ``_clear_output_dir``). Returns ``out_dir``.
    """
    _check_positive(rows_per_group=rows_per_group)
    missing = {"date", "ts"} - set(frame.columns)
    if missing:
        raise ValueError(f"frame lacks required columns: {sorted(missing)}")
    out = Path(out_dir)
    _clear_output_dir(out)
    table = frame.sort(["date", "ts"], maintain_order=True).to_arrow()
    # Plain (not large / view) strings keep the files readable by every Parquet reader.
    table = table.cast(
        pa.schema(
            pa.field(f.name, pa.string())
            if pa.types.is_large_string(f.type) or pa.types.is_string_view(f.type)
            else f
            for f in table.schema
        )
    )
    ds.write_dataset(
        table,
        out,
        format="parquet",
        partitioning=ds.partitioning(pa.schema([("date", pa.string())]), flavor="hive"),
        basename_template="part-{i}.parquet",
        max_rows_per_group=rows_per_group,
        min_rows_per_group=rows_per_group,
        existing_data_behavior="delete_matching",
        preserve_order=True,
    )
    return out


def generate(
    out_dir: str | Path,
    rows: int = 1_000_000,
    days: int = 14,
    start: str = "2024-01-01",
    users: int = 20_000,
    items: int = 50_000,
    authors: int = 5_000,
    seed: int = 0,
    rows_per_group: int = 65_536,
    drift: float = DEFAULT_DRIFT,
    new_items: float = 0.0,
    exposure: Exposure = DEFAULT_EXPOSURE,
    swing: float = DEFAULT_SWING,
) -> Path:
    """Generate a synthetic log and write it to ``out_dir``; returns ``out_dir``."""
    frame = generate_log(
        rows=rows,
        days=days,
        start=start,
        users=users,
        items=items,
        authors=authors,
        seed=seed,
        drift=drift,
        new_items=new_items,
        exposure=exposure,
        swing=swing,
    )
    return write_log(frame, out_dir, rows_per_group=rows_per_group)

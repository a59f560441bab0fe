"""``pgrec train ranker``: LightGBM lambdarank on replayed (or served) lists, early stopping on a later window.

Label windows: with an end time ``until`` (default: the newest event), the windows are consecutive and end at
``until``: by default each holds the same share of the events (``window_share``), so a sparse stretch of the log
gets a longer window; with ``horizon_days`` each is that many days. The last ``valid_windows`` windows are used
for early stopping (validation, a later time than every training label); no label window overlaps another.
With ``refit`` (the default) the model is then trained again on every window, validation included, for the
number of rounds early stopping chose: the served model has seen the most recent behaviour, and the number of
rounds comes from several windows instead of one small one. The refit trains at least ``min_rounds`` (100):
on the small MovieLens replays (50-124 validation groups) early stopping stopped at 3-9 rounds by chance, and a
floor of 100 rounds was as good (ml-100k) or much better (ml-latest-small) on the test splits (docs/ranking.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import lightgbm as lgb
import numpy as np
import psycopg

from engine.errors import InvalidRequest
from engine.itemsim import EaseConfig
from engine.ranking import dataset, features, registry
from engine.ranking.dataset import Progress, TrainingSet
from engine.sql import query


@dataclass(frozen=True)
class RankerConfig:
    """How the ranker is trained. Every field has the default the CLI uses."""

    horizon_days: float | None = None   # label window after each cutoff (None: windows of window_share events)
    window_share: float = 0.025         # share of the events before `until` in each label window
    cutoffs: int = 19                   # cutoffs (plus one): the windows before the validation ones train (19:
                                        # with window_share 2.5%, the latest half of the events; 9 windows gave
                                        # MovieLens 200-350 training groups, too few: see docs/ranking.md)
    valid_windows: int = 3              # the latest windows validate early stopping (at most all but one)
    refit: bool = True                  # then train on every window for the early-stopped number of rounds
    # candidates per group; None: the serving count (config serving_candidates, 200), so that the source ranks and
    # fills the model learns from are those it is served (an evaluation sets its own n for both sides)
    n_candidates: int | None = None
    max_users_per_cutoff: int = 2000    # sampled (seeded) when more users are active after a cutoff
    surface: str = "default"
    num_leaves: int = 15
    learning_rate: float = 0.05
    num_boost_round: int = 400
    early_stopping_rounds: int = 40
    min_rounds: int = 100               # refit: at least this many rounds (early stopping on a few dozen
                                        # validation groups stops at 3-10 rounds by chance; see docs/ranking.md)
    min_data_in_leaf: int = 50
    feature_fraction: float = 0.8
    lambda_l2: float = 1.0
    lambdarank_truncation_level: int = 20
    eval_at: tuple[int, ...] = (10,)
    num_threads: int = 2
    seed: int = 42
    source: str = "replay"              # replay | impressions
    attribution_hours: float | None = None  # impressions: events without request_id count within this window
    #                                         (None: config report_attribution_hours, as the online report)
    recompute_features: bool = False   # impressions: recompute every list's features, not the rows it was ranked with


@dataclass
class TrainedRanker:
    booster: lgb.Booster
    names: list[str]
    params: dict[str, Any]
    metrics: dict[str, Any]
    data_window: dict[str, Any]
    importance: dict[str, float] = field(default_factory=dict)

    def save(self, conn: psycopg.Connection[Any], *, activate: bool = True) -> int:
        """Store in ``pgrec.models`` (kind 'ranker'); returns the version."""
        return registry.save(conn, kind=registry.RANKER, artifact=self.booster.model_to_string().encode("utf-8"),
                             params=self.params, features=self.names, metrics=self.metrics,
                             data_window=self.data_window, activate=activate)


def default_cutoffs(until: datetime, config: RankerConfig) -> list[datetime]:
    """Fixed ``horizon_days``: ``cutoffs`` training cutoffs then the validation cutoff, oldest first."""
    h = timedelta(days=config.horizon_days or 14.0)
    return [until - h * (k + 1) for k in range(config.cutoffs, -1, -1)]


Window = tuple[datetime, datetime]


def plan_windows(conn: psycopg.Connection[Any], until: datetime, config: RankerConfig,
                 cutoffs: Sequence[datetime] | None = None) -> list[Window]:
    """The (cutoff, label end) windows, oldest first; the last one validates.

    Given cutoffs: each window runs to the next cutoff (or ``horizon_days``, whichever is first), the last to
    ``until``. Otherwise ``cutoffs + 1`` windows end at ``until``: each ``horizon_days`` long, or by default
    each holding ``window_share`` of the events before ``until``."""
    if cutoffs:
        cuts = sorted(cutoffs)
    elif config.horizon_days is not None:
        cuts = default_cutoffs(until, config)
    else:
        if not 0 < config.window_share * (config.cutoffs + 1) < 1:
            raise InvalidRequest(f"window_share {config.window_share} x {config.cutoffs + 1} windows must be < 1")
        fractions = [1 - config.window_share * (k + 1) for k in range(config.cutoffs, -1, -1)]
        row = conn.execute(query("ranking.time_at_fractions"), {"fractions": fractions, "until": until}).fetchone()
        if row is None or row[0] is None:
            raise InvalidRequest(f"there are no events before {until.isoformat()} to train on")
        cuts = sorted(set(row[0]))
    h = timedelta(days=config.horizon_days) if config.horizon_days is not None else None
    ends = [*cuts[1:], until]
    windows = [(c, min(e, c + h) if h is not None else e) for c, e in zip(cuts, ends, strict=True)]
    late = [c for c, _ in windows if c >= until]
    if late:
        raise InvalidRequest(f"cutoff {late[0].isoformat()} is not before {until.isoformat()}")
    return windows


def _lgb_params(config: RankerConfig) -> dict[str, Any]:
    return {
        "objective": "lambdarank",
        "metric": "ndcg",
        "ndcg_eval_at": list(config.eval_at),
        "num_leaves": config.num_leaves,
        "learning_rate": config.learning_rate,
        "min_data_in_leaf": config.min_data_in_leaf,
        "feature_fraction": config.feature_fraction,
        "lambda_l2": config.lambda_l2,
        "lambdarank_truncation_level": config.lambdarank_truncation_level,
        "num_threads": config.num_threads,
        "seed": config.seed,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }


def _dataset(ts: TrainingSet, reference: lgb.Dataset | None = None) -> lgb.Dataset:
    ds = lgb.Dataset(ts.x, label=ts.y, group=ts.group, feature_name=ts.names, reference=reference,
                     free_raw_data=False)
    if ts.position is not None and reference is None:
        ds.set_position(ts.position - 1)  # position-bias correction (LightGBM >= 4.1); never a feature
    return ds


def fit(train: TrainingSet, valid: TrainingSet | None, config: RankerConfig,
        progress: Progress | None = None) -> tuple[lgb.Booster, dict[str, Any]]:
    """Train on ``train``; early stopping on ``valid`` when it has groups."""
    if not train.group:
        if config.source == "impressions":
            raise InvalidRequest("no training groups: no served list in the training part (the earliest four "
                                 "fifths of the lists) was followed by engagement with a shown item (more lists, an "
                                 "earlier --since or a longer --attribution-hours)")
        raise InvalidRequest("no training groups: no user had a relevant candidate in any label window "
                             "(more data, other cutoffs or a longer --horizon-days)")
    params = _lgb_params(config)
    dtrain = _dataset(train)
    valid_sets: list[lgb.Dataset] = []
    names: list[str] = []
    callbacks: list[Callable[..., Any]] = []
    evals: dict[str, Any] = {}
    if valid is not None and valid.group:
        valid_sets.append(_dataset(valid, reference=dtrain))
        names.append("valid")
        callbacks.append(lgb.early_stopping(config.early_stopping_rounds, first_metric_only=True, verbose=False))
        callbacks.append(lgb.record_evaluation(evals))
    if progress is not None:
        total = config.num_boost_round

        def _tick(env: lgb.callback.CallbackEnv) -> None:
            progress("boosting", env.iteration + 1, total)

        callbacks.append(_tick)
    booster = lgb.train(params, dtrain, num_boost_round=config.num_boost_round, valid_sets=valid_sets,
                        valid_names=names, callbacks=callbacks)
    metrics: dict[str, Any] = {"best_iteration": int(booster.best_iteration or booster.current_iteration())}
    if evals:
        for metric, values in evals["valid"].items():
            best = metrics["best_iteration"]
            metrics[f"valid_{metric}"] = float(values[best - 1]) if best else float(values[-1])
    return booster, metrics


def importance(booster: lgb.Booster) -> dict[str, float]:
    gain = booster.feature_importance(importance_type="gain")
    total = float(np.sum(gain)) or 1.0
    return {n: float(g) / total for n, g in sorted(zip(booster.feature_name(), gain, strict=True),
                                                   key=lambda p: -p[1])}


def refit(train: TrainingSet, valid: TrainingSet, rounds: int, config: RankerConfig) -> lgb.Booster:
    """Train on ``train`` and ``valid`` together for a fixed number of rounds (chosen by early stopping)."""
    both = train.extend(valid)
    return lgb.train(_lgb_params(config), _dataset(both), num_boost_round=max(1, rounds))


def build_sets(conn: psycopg.Connection[Any], config: RankerConfig, windows: Sequence[Window],
               progress: Progress | None = None,
               prepare: Callable[[datetime], None] | None = None) -> tuple[TrainingSet, TrainingSet]:
    """Replay at every window: the last ``valid_windows`` (at most all but one) validate, the earlier ones
    train (one window: no validation).

    ``prepare(cutoff)`` runs before each replay (an evaluation rebuilds the stage-1 models as of the cutoff
    there, so the candidate sources never saw the label window)."""
    n = with_serving_n(conn, config).n_candidates
    assert n is not None
    sets = []
    for c, end in windows:
        if prepare is not None:
            prepare(c)
        sets.append(dataset.replay(conn, c, end=end, n=n, surface=config.surface,
                                   max_users=config.max_users_per_cutoff, seed=config.seed, progress=progress))
    if len(sets) == 1:
        return sets[0], TrainingSet.empty(sets[0].names)
    v = min(max(1, config.valid_windows), len(sets) - 1)
    train = sets[0]
    for s in sets[1:-v]:
        train = train.extend(s)
    valid = sets[-v]
    for s in sets[len(sets) - v + 1:]:
        valid = valid.extend(s)
    return train, valid


def with_serving_n(conn: psycopg.Connection[Any], config: RankerConfig) -> RankerConfig:
    """The config with ``n_candidates`` set: the serving count (``pgrec.serving_candidates()``) when it is None."""
    if config.n_candidates is not None:
        return config
    return replace(config, n_candidates=features.serving_count(conn))


def train_ranker(conn: psycopg.Connection[Any], config: RankerConfig | None = None, *,
                 until: datetime | None = None, cutoffs: Sequence[datetime] | None = None,
                 since: datetime | None = None, progress: Progress | None = None,
                 prepare: Callable[[datetime], None] | None = None) -> TrainedRanker:
    """Build training data (replay at ``cutoffs`` or from impressions in ``[since, until)``) and fit.

    ``until``: no label may come from events at or after it (the split, in an evaluation); default the
    newest event. Impressions: the latest fifth of the served lists (by serving time) validates.
    """
    config = with_serving_n(conn, config or RankerConfig())
    t0 = time.perf_counter()
    row = conn.execute(query("ranking.event_range")).fetchone()
    if row is None or not row[2]:
        raise InvalidRequest("there are no events to train on")
    last: datetime = row[1]
    end: datetime = until or (last + timedelta(microseconds=1))
    if config.source == "replay":
        windows = plan_windows(conn, end, config, cutoffs)
        train, valid = build_sets(conn, config, windows, progress, prepare)
        v = min(max(1, config.valid_windows), len(windows) - 1)
        window = {"source": "replay", "cutoffs": [c.isoformat() for c, _ in windows],
                  "label_windows": [[c.isoformat(), e.isoformat()] for c, e in windows],
                  "horizon_days": config.horizon_days, "window_share": config.window_share,
                  "validation_cutoff": windows[-v][0].isoformat() if len(windows) > 1 else None,
                  "until": end.isoformat()}
    elif config.source == "impressions":
        # from the first served list (not the first event: the validation fifth must fall among the lists)
        found = conn.execute(query("ranking.impression_start"), {"since": since, "until": end}).fetchone()
        if found is None or found[0] is None:
            raise InvalidRequest("there are no served lists (impressions) to train on"
                                 + (f" from {since.isoformat()}" if since else "")
                                 + f" before {end.isoformat()}")
        start = found[0]
        hours = config.attribution_hours if config.attribution_hours is not None else float(found[2])
        # the latest fifth of the lists (by serving time) validates; with all lists at one time, none does
        split = found[1] if found[1] is not None and found[1] > start else end
        att = timedelta(hours=hours)
        # no training label from the validation period, none at all from at or after `until`
        n = config.n_candidates
        assert n is not None  # with_serving_n
        logged = not config.recompute_features
        train = dataset.from_impressions(conn, start, split, window=att, n=n, label_until=split,
                                         use_logged=logged, progress=progress)
        valid = dataset.from_impressions(conn, split, end, window=att, n=n, label_until=end,
                                         use_logged=logged, progress=progress)
        window = {"source": "impressions", "since": start.isoformat(), "validation_from": split.isoformat(),
                  "until": end.isoformat(), "attribution_hours": hours}
    else:
        raise InvalidRequest(f"source must be 'replay' or 'impressions', got {config.source!r}")
    booster, metrics = fit(train, valid, config, progress)
    if config.refit and valid.group:
        rounds = max(metrics["best_iteration"], min(config.min_rounds, config.num_boost_round))
        booster = refit(train, valid, rounds, config)
        metrics["refit_rounds"] = rounds
    metrics.update({"train_groups": len(train.group), "train_rows": train.rows,
                    "valid_groups": len(valid.group), "valid_rows": valid.rows,
                    "seconds": round(time.perf_counter() - t0, 2)})
    if config.source == "impressions":  # groups of the rows the lists were ranked with (the rest recomputed)
        metrics.update({"train_logged_groups": train.logged_groups, "valid_logged_groups": valid.logged_groups})
    params = {**_lgb_params(config), "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                 for k, v in asdict(config).items()},
              "trained_at": datetime.now(UTC).isoformat()}
    imp = importance(booster)
    metrics["importance"] = imp
    return TrainedRanker(booster, train.names, params, metrics, window, imp)


@dataclass
class TrainedAll:
    cooccurrence_build: int
    retrieval_version: int | None
    ranker: TrainedRanker


def train_all(conn: psycopg.Connection[Any], config: RankerConfig | None = None, *, retrieval: bool = True,
              retrieval_epochs: int = 30, progress: Progress | None = None,
              ease_config: EaseConfig | None = None) -> TrainedAll:
    """Co-occurrence, EASE neighbours, retrieval, ranker, in that order, without leaking a label window into the
    ranker's features: the ranker's replay sees co-occurrence and EASE rebuilt as of each cutoff and the
    retrieval model trained as of the first cutoff; then all are rebuilt from every event for serving. The
    ranker is not saved."""
    from engine import cooccurrence, itemsim

    config = with_serving_n(conn, config or RankerConfig())
    ease_config = ease_config or EaseConfig()
    row = conn.execute(query("ranking.event_range")).fetchone()
    if row is None or not row[2]:
        raise InvalidRequest("there are no events to train on")
    end: datetime = row[1] + timedelta(microseconds=1)
    cuts = [c for c, _ in plan_windows(conn, end, config)]

    def _retrieval(as_of: datetime | None) -> int | None:
        if not retrieval:
            return None
        from engine.retrieval.store import schema_dim, train_and_store
        from engine.retrieval.train import RetrievalConfig

        rcfg = RetrievalConfig(dim=schema_dim(conn), epochs=retrieval_epochs, seed=config.seed)
        on_epoch = (lambda s, _b: progress("retrieval epochs", s.epoch, retrieval_epochs)) if progress else None
        return train_and_store(conn, rcfg, as_of=as_of, on_epoch=on_epoch).version

    def prepare(c: datetime) -> None:
        cooccurrence.build(conn, as_of=c)
        itemsim.build_ease(conn, as_of=c, config=ease_config)
        if c == cuts[0]:
            _retrieval(c)

    ranker = train_ranker(conn, config, cutoffs=cuts, progress=progress, prepare=prepare)
    build = cooccurrence.build(conn, progress=(lambda d, t: progress("co-occurrence", d, t)) if progress else None)
    itemsim.build_ease(conn, config=ease_config, progress=progress)
    version = _retrieval(None)
    return TrainedAll(build.build_id, version, ranker)

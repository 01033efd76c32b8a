"""The sample history: realistic shape, deterministic, the same records by either route."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from zoneinfo import ZoneInfo

import numpy as np
from click.testing import CliRunner

from imt_ml import sample_data
from imt_ml.export_track_data import parse_assignment
from imt_ml.sample_data import (
    DIRTY_RATES,
    SEASONS,
    STATIONS,
    Drift,
    SampleHistory,
    World,
    season_of,
)
from imt_ml.utils import SAMPLE_TRUTH_FILE

from conftest import only_export_dir, read_export


def test_history_has_the_tracker_shape():
    still = Drift(home_move_share=0.0, zone_stations=())  # the shape, without the drift
    events = list(SampleHistory(seed=3, drift=still).generate(20_000))
    assert len(events) == 20_000
    clean = [json.loads(e.payload) for e in events if e.kind == "clean"]
    dirty = Counter(e.kind for e in events if e.kind != "clean")
    assert set(dirty) == set(DIRTY_RATES)
    assert 0.02 < sum(dirty.values()) / len(events) < 0.06

    for doc in clean:
        tracks = STATIONS[doc["station_id"]][0]
        assert doc["track_number"] in tracks
        assert doc["headsign"].endswith(" Ln")
        assert doc["trip_id"].rsplit("-", 1)[1].isdigit()
    assert {d["station_id"] for d in clean} == set(STATIONS)
    assert len({d["route_id"] for d in clean}) == 12
    assert {d["day_of_week"] for d in clean} == set(range(7))
    # South Station uses all thirteen platforms, North Station all ten.
    assert {d["track_number"] for d in clean if d["station_id"] == "place-sstat"} == {
        str(t) for t in range(1, 14)
    }

    # Trains keep a home track most of the time, less so in rush hours.
    by_train = Counter((d["station_id"], d["trip_id"].rsplit("-", 1)[1], d["track_number"])
                       for d in clean)  # fmt: skip
    totals = Counter((s, n) for s, n, _ in by_train.elements())
    top = Counter()
    for (s, n, _), count in by_train.items():
        top[s, n] = max(top[s, n], count)
    home_share = sum(top.values()) / sum(totals.values())
    assert 0.7 < home_share < 0.95


def test_trip_ids_change_with_the_season():
    events = [e for e in SampleHistory(seed=1).generate(60_000) if e.kind == "clean"]
    trips_of_train = {}
    for e in events:
        doc = json.loads(e.payload)
        trips_of_train.setdefault(doc["trip_id"].rsplit("-", 1)[1], set()).add(doc["trip_id"])
    assert max(len(t) for t in trips_of_train.values()) >= 2


def test_same_seed_same_history_other_seed_other_history():
    a = [e.payload for e in SampleHistory(seed=5).generate(2000)]
    b = [e.payload for e in SampleHistory(seed=5).generate(2000)]
    c = [e.payload for e in SampleHistory(seed=6).generate(2000)]
    assert a == b
    assert a != c


def test_direct_export_matches_the_redis_route(redis_client, redis_server, tmp_path):
    runner = CliRunner()
    result = runner.invoke(sample_data.cli, ["to-export", "-n", "2500", "--seed", "9",
                                             "-o", str(tmp_path / "direct")])  # fmt: skip
    assert result.exit_code == 0, result.output
    direct = only_export_dir(tmp_path / "direct")

    result = runner.invoke(sample_data.cli, ["to-redis", "-n", "2500", "--seed", "9",
                                             "--redis-host", "127.0.0.1",
                                             "--redis-port", str(redis_server.port),
                                             "--truth-file", str(tmp_path / "truth.npz")])  # fmt: skip
    assert result.exit_code == 0, result.output
    from imt_ml.export_track_data import cli as export_cli

    result = runner.invoke(export_cli, ["-o", str(tmp_path / "redis"), "--redis-host",
                                        "127.0.0.1", "--redis-port", str(redis_server.port)])  # fmt: skip
    assert result.exit_code == 0, result.output
    via_redis = only_export_dir(tmp_path / "redis")

    def rows(path):
        return sorted(tuple(sorted(r.items())) for r in read_export(path))

    assert rows(direct) == rows(via_redis)
    meta_direct = json.loads((direct / "metadata.json").read_text())
    meta_redis = json.loads((via_redis / "metadata.json").read_text())
    assert meta_direct["skipped"] == meta_redis["skipped"]
    assert meta_direct["tracks"] == meta_redis["tracks"]

    # The truth file covers every exported record, joined on identity.
    for truth_path in (direct / SAMPLE_TRUTH_FILE, tmp_path / "truth.npz"):
        truth = np.load(truth_path)
        assert len(truth["best_probability"]) == meta_direct["total_records"]
        assert np.all((truth["best_probability"] > 0.3) & (truth["best_probability"] <= 1))
        keys = set(zip(truth["station_id"], truth["trip_id"], truth["scheduled_timestamp"],
                       strict=True))  # fmt: skip
        exported = {(r["station_id"], r["trip_id"], np.float32(r["scheduled_timestamp"]))
                    for r in read_export(direct)}  # fmt: skip
        assert exported == keys


def test_generating_probabilities_are_consistent_with_the_draws():
    # Homes that never move, so the final home is every record's home.
    history = SampleHistory(seed=11, drift=Drift(home_move_share=0.0, zone_stations=()))
    events = [e for e in history.generate(30_000) if e.kind == "clean"]
    best = np.array([e.best_probability for e in events])
    # Most tracks drawn are the home track, at about the rate the generator says.
    hits = 0
    for e in events:
        doc = json.loads(e.payload)
        number = int(doc["trip_id"].rsplit("-", 1)[1])
        hits += history.homes[doc["station_id"], number] == doc["track_number"]
    assert abs(hits / len(events) - best.mean()) < 0.02
    assert all(isinstance(parse_assignment(e.payload), tuple) for e in events[:500])


def modal_tracks_by_season(drift: Drift, n: int = 70_000, seed: int = 2) -> dict:
    """(station, train number, season) -> most used track, over clean records."""
    counts: dict[tuple, Counter] = {}
    for event in SampleHistory(seed=seed, drift=drift).generate(n):
        if event.kind != "clean":
            continue
        doc = json.loads(event.payload)
        day = __import__("datetime").date.fromisoformat(doc["scheduled_time"][:10])
        key = (doc["station_id"], doc["trip_id"].rsplit("-", 1)[1], season_of(day))
        counts.setdefault(key, Counter())[doc["track_number"]] += 1
    return {k: c.most_common(1)[0][0] for k, c in counts.items() if sum(c.values()) >= 20}


def share_of_moved_homes(drift: Drift) -> float:
    modes = modal_tracks_by_season(drift)
    seasons = sorted({k[2] for k in modes}, key=lambda s: (s[1], SEASONS.index(s[0])))
    first, second = seasons[0], seasons[1]
    pairs = [(modes[s, n, first], modes[s, n, second]) for s, n, season in modes
             if season == first and (s, n, second) in modes and s == "place-sstat"]  # fmt: skip
    return sum(a != b for a, b in pairs) / len(pairs)


def test_home_move_share_is_the_share_of_trains_that_move_at_a_season_change():
    assert share_of_moved_homes(Drift(home_move_share=0.0)) < 0.05
    assert 0.35 < share_of_moved_homes(Drift(home_move_share=0.5)) < 0.65
    assert Drift().home_move_share == 0.25  # realistic by default


def test_a_zone_station_spreads_each_train_over_its_zone():
    def north(drift: Drift) -> tuple[float, set[float]]:
        best, tops, totals = set(), Counter(), Counter()
        for event in SampleHistory(seed=4, drift=drift).generate(15_000):
            if event.kind == "clean" and event.truth_key[0] == "place-north":
                doc = json.loads(event.payload)
                best.add(round(event.best_probability, 6))
                tops[doc["trip_id"], doc["track_number"]] += 1
                totals[doc["trip_id"]] += 1
        top = Counter()
        for (trip, _), count in tops.items():
            top[trip] = max(top[trip], count)
        return sum(top.values()) / sum(totals.values()), best

    zone_share, zone_best = north(Drift(zone_stations=("place-north",)))
    home_share, home_best = north(Drift(zone_stations=()))
    weights = SampleHistory(seed=4).world.zone_weights
    assert zone_best == {round(weights[0] / sum(weights), 6)}
    assert 0.3 < zone_share < 0.55 and home_share > 0.7
    assert min(home_best) >= 0.55


def test_drift_options_reach_the_export(tmp_path):
    result = CliRunner().invoke(sample_data.cli, [
        "to-export", "--records", "500", "--output", str(tmp_path), "--home-move-share", "0.1",
        "--zone-stations", "place-north,place-rugg", "--weekly-moves", "0.02",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = json.loads((only_export_dir(tmp_path) / "metadata.json").read_text())
    assert meta["drift"] == {"home_move_share": 0.1, "zone_stations": ["place-north", "place-rugg"],
                             "closures": [], "weekly_moves": 0.02}  # fmt: skip
    bad = CliRunner().invoke(sample_data.cli, ["to-export", "--records", "10", "--output",
                                               str(tmp_path), "--zone-stations", "place-nowhere"])  # fmt: skip
    assert bad.exit_code == 1 and "unknown zone station" in bad.output


def test_records_are_in_the_trackers_real_format_by_default():
    """UTC times with a Z, UTC clock fields, the scheduled time again as actual_time, and
    the UTC date in the key; --local-times gives the local-offset form of other writers."""
    import datetime as dt

    real = [e for e in SampleHistory(seed=9).generate(3000) if e.kind == "clean"]
    for event in real[:500]:
        doc = json.loads(event.payload)
        when = dt.datetime.fromisoformat(doc["scheduled_time"])
        assert doc["scheduled_time"].endswith("Z") and doc["actual_time"] == doc["scheduled_time"]
        assert (doc["day_of_week"], doc["hour"], doc["minute"]) == (
            when.weekday(),
            when.hour,
            when.minute,
        )
        assert event.member_key.endswith(f":{when.date().isoformat()}")
        assert when.timestamp() == event.score
    # Evening departures in Boston fall on the next UTC day, as the tracker stored them.
    evening = [json.loads(e.payload) for e in real if json.loads(e.payload)["hour"] < 4]
    assert evening

    local = [e for e in SampleHistory(seed=9, local_times=True).generate(3000)
             if e.kind == "clean"]  # fmt: skip
    assert [e.score for e in local] == [e.score for e in real]  # the same departures
    doc = json.loads(local[0].payload)
    assert doc["scheduled_time"][-6:] in ("-05:00", "-04:00")


def test_each_seed_draws_a_world_of_its_own():
    worlds = {SampleHistory(seed=s).world for s in range(5)}
    assert len(worlds) == 5
    for world in worlds:
        assert 0.6 < world.rush_home_share < world.home_share < 1
        assert abs(sum(world.zone_weights) - 1) < 0.01
        assert list(world.zone_weights) == sorted(world.zone_weights, reverse=True)
    assert World.draw(3) == SampleHistory(seed=3).world


def test_single_trains_move_mid_season_and_the_knowable_ceiling_lags_the_move():
    """`weekly_moves` moves one train's home at a time without changing anything else
    drawn; with weekly origins set, a record's knowable probability is that of the track
    likeliest the day before its origin: below the best right after its train moved,
    equal to it where nothing changed since the origin."""
    still = list(SampleHistory(seed=4).generate(30_000))
    history = SampleHistory(seed=4, drift=Drift(weekly_moves=0.05))
    first = sample_data.START_DATE + dt.timedelta(days=10)
    history.origins = (first, 7)
    events = list(history.generate(30_000))
    # The same departures under the same keys, some on other tracks.
    assert [(e.kind, e.member_key, e.score) for e in events] == [
        (e.kind, e.member_key, e.score) for e in still
    ]
    assert [e.payload for e in events] != [e.payload for e in still]
    clean = [e for e in events if e.kind == "clean"]
    assert history.moved_on and any(e.moved_on for e in clean)

    boston = ZoneInfo("America/New_York")
    lagging, settled = [], []
    for e in clean:
        day = dt.datetime.fromtimestamp(e.score, boston).date()
        if day < first:
            assert e.knowable_probability is None
            continue
        origin = first + dt.timedelta(days=7 * ((day - first).days // 7))
        if e.moved_on and e.moved_on >= origin:
            lagging.append(e.knowable_probability < e.best_probability)
        elif e.moved_on is None and season_of(day) == season_of(origin - dt.timedelta(days=1)):
            settled.append(abs(e.knowable_probability - e.best_probability) < 1e-12)
    # Lagging unless that weekday the train uses its second home, which did not move.
    assert len(lagging) > 100 and sum(lagging) > 0.8 * len(lagging)
    assert settled and all(settled)

"""The sample history: realistic shape, deterministic, the same records by either route."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
from click.testing import CliRunner

from imt_ml import sample_data
from imt_ml.export_track_data import parse_assignment
from imt_ml.sample_data import DIRTY_RATES, STATIONS, SampleHistory
from imt_ml.utils import SAMPLE_TRUTH_FILE

from conftest import only_export_dir, read_export


def test_history_has_the_tracker_shape():
    events = list(SampleHistory(seed=3).generate(20_000))
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
    history = SampleHistory(seed=11)
    events = [e for e in history.generate(30_000) if e.kind == "clean"]
    best = np.array([e.best_probability for e in events])
    # Most tracks drawn are the home track, at about the rate the generator says.
    hits = 0
    for e in events:
        doc = json.loads(e.payload)
        number = int(doc["trip_id"].rsplit("-", 1)[1])
        hits += history.homes[doc["station_id"], number] == doc["track_number"]
    # Homes move a little between seasons, so compare loosely.
    assert abs(hits / len(events) - best.mean()) < 0.03
    assert all(isinstance(parse_assignment(e.payload), tuple) for e in events[:500])

"""Synthetic track history in the tracker's exact format, for demos, tests and benchmarks.

Boston's commuter-rail stations, platforms and twelve routes; weekday and weekend timetables
whose trip ids change with the schedule season; trains that mostly keep a "home" track (less
so in rush hours); a few percent of dirty records. Each clean record's generating distribution
is known, so `sample_truth.npz` holds the probability of its most likely track (the ceiling).
Commands (to-redis, to-export, demo): docs/recording-and-export.md#sample-data.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import random
import sys
from collections import ChainMap, Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import click

if __package__ in (None, ""):  # run by path: `uv run src/imt_ml/sample_data.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imt_ml import utils
from imt_ml.utils import SAMPLE_TRUTH_FILE, RedisTarget, UserError, environment_epilog, log

SOUTH_ROUTES = ("CR-Worcester", "CR-Providence", "CR-Franklin", "CR-Fairmount", "CR-Needham",
                "CR-Kingston", "CR-Greenbush", "CR-NewBedford")  # fmt: skip
NORTH_ROUTES = ("CR-Fitchburg", "CR-Lowell", "CR-Haverhill", "CR-Newburyport")

#: station -> (its tracks, the routes that stop there)
STATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "place-sstat": (tuple(str(t) for t in range(1, 14)), SOUTH_ROUTES),
    "place-bbsta": (("1", "2", "3", "5", "7"),
                    ("CR-Worcester", "CR-Providence", "CR-Franklin", "CR-Needham")),
    "place-rugg": (("1", "2", "3"), ("CR-Providence", "CR-Franklin", "CR-Needham")),
    "place-north": (tuple(str(t) for t in range(1, 11)), NORTH_ROUTES),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Route:
    line: str  # as in headsigns: "{destination} - {line} Ln"
    destinations: tuple[str, ...]  # outbound destinations
    number_base: int  # train numbers start here
    trains_per_direction: int  # weekday; weekends run about half


ROUTES: dict[str, Route] = {
    "CR-Worcester": Route("Worcester", ("Worcester", "Framingham"), 500, 10),
    "CR-Providence": Route("Providence", ("Providence", "Wickford Junction", "Stoughton"), 800, 10),
    "CR-Franklin": Route("Franklin", ("Forge Park/495", "Foxboro"), 700, 8),
    "CR-Fairmount": Route("Fairmount", ("Readville",), 1900, 6),
    "CR-Needham": Route("Needham", ("Needham Heights",), 600, 6),
    "CR-Kingston": Route("Kingston", ("Kingston",), 1000, 6),
    "CR-Greenbush": Route("Greenbush", ("Greenbush",), 1100, 6),
    "CR-NewBedford": Route("Fall River/New Bedford", ("New Bedford", "Fall River"), 2000, 6),
    "CR-Fitchburg": Route("Fitchburg", ("Wachusett", "Littleton/Route 495"), 400, 8),
    "CR-Lowell": Route("Lowell", ("Lowell",), 300, 10),
    "CR-Haverhill": Route("Haverhill", ("Haverhill",), 200, 8),
    "CR-Newburyport": Route("Newburyport/Rockport", ("Newburyport", "Rockport"), 100, 8),
}

SEASONS = ("Winter", "Spring", "Summer", "Fall")  # Dec-Feb, Mar-May, Jun-Aug, Sep-Nov

#: Share of all generated assignments that are dirty, by the exporter's skip reason.
DIRTY_RATES = {
    "null_track": 0.015,
    "empty_track": 0.003,
    "non_numeric_track": 0.005,
    "invalid_json": 0.002,
    "missing_field": 0.002,
    "wrong_type": 0.002,
    "expired_key": 0.003,
    "duplicate": 0.003,
}
#: The track number a dirty record of these kinds holds.
BAD_TRACKS = {"null_track": None, "empty_track": "", "non_numeric_track": "Commuter Rail"}

#: How each train shares its trips over its zone at a zone-only station.
ZONE_WEIGHTS = (0.4, 0.3, 0.2, 0.1)
START_DATE = dt.date(2024, 3, 1)
ONE_YEAR_S = 365 * 24 * 3600


def season_of(day: dt.date) -> tuple[str, int]:
    """(season name, year the season started in) for a service date."""
    index = (day.month % 12) // 3  # Dec, Jan, Feb -> 0
    year = day.year - 1 if day.month in (1, 2) else day.year
    return SEASONS[index], year


@dataclasses.dataclass
class Train:
    route_id: str
    number: int
    direction_id: int
    headsign: str
    minutes: int  # scheduled minutes after midnight at the terminal
    weekday: bool
    reliability: float  # how strongly this train keeps its home track


@dataclasses.dataclass
class Assignment:
    """One generated event: what the tracker would have written for one departure."""

    series_key: str
    member_key: str
    score: float
    payload: str | None  # JSON, or None for a sorted-set member whose key expired
    kind: str  # "clean" or a DIRTY_RATES reason
    truth_key: tuple[str, str, float] | None = None  # (station, trip, scheduled ts)
    best_probability: float = 0.0
    #: The probability of last season's likeliest track (what knowing only last season can expect).
    last_season_probability: float = 0.0
    #: The probability of the track that was likeliest the day before this record's origin
    #: (set when `SampleHistory.origins` is): what could be known when its model was trained.
    knowable_probability: float | None = None
    #: The day its train's home at this station last moved mid-season (`Drift.weekly_moves`).
    moved_on: dt.date | None = None


@dataclasses.dataclass(frozen=True)
class Closure:
    """Platforms out of service for a while (track works): their trains use others."""

    station: str
    tracks: tuple[str, ...]
    start: dt.date
    end: dt.date  # the first day the platforms are open again

    def active(self, station: str, day: dt.date) -> bool:
        return station == self.station and self.start <= day < self.end


@dataclasses.dataclass(frozen=True)
class Drift:
    """How much the world changes: what makes real history hard to predict."""

    home_move_share: float = 0.25  # share of trains whose home moves at each season change
    #: Stations whose trains keep to a zone of tracks (their route's window), not a home.
    zone_stations: tuple[str, ...] = ("place-north",)
    #: A departure that would use a closed platform uses the nearest open one (so does the truth).
    closures: tuple[Closure, ...] = ()
    #: Chance a week that a train's home track at a station moves mid-season, one train at a
    #: time (drawn from a generator of its own, so a world without moves stays the same).
    weekly_moves: float = 0.0


@dataclasses.dataclass(frozen=True)
class World:
    """One world's character, drawn from the seed: no model can fit one fixed generator."""

    home_share: float = 0.9  # chance of the home track off-peak, before the train's reliability
    rush_home_share: float = 0.74  # the same in weekday rush hours
    reliability_low: float = 0.85  # each train's reliability is drawn from [this, 1]
    zone_weights: tuple[float, ...] = ZONE_WEIGHTS  # a zone train's shares, most used first
    cancel_rate: float = 0.0  # share of departures cancelled (never recorded)
    weekday_share: float = 0.0  # share of weekday trains with a second home on some weekdays

    @classmethod
    def draw(cls, seed: int) -> World:
        rng = random.Random(f"world-{seed}")
        zone = sorted((rng.uniform(0.05, 1.0) for _ in ZONE_WEIGHTS), reverse=True)
        return cls(
            home_share=round(rng.uniform(0.82, 0.95), 3),
            rush_home_share=round(rng.uniform(0.62, 0.8), 3),
            reliability_low=round(rng.uniform(0.78, 0.92), 3),
            zone_weights=tuple(round(w / sum(zone), 3) for w in zone),
            cancel_rate=round(rng.uniform(0.0, 0.04), 3),
            weekday_share=round(rng.uniform(0.0, 0.2), 3),
        )


class SampleHistory:
    """Deterministic generator of tracker assignments (see the module docstring)."""

    def __init__(
        self, seed: int = 42, drift: Drift | None = None, local_times: bool = False
    ) -> None:
        self.drift = drift or Drift()
        self.world = World.draw(seed)
        #: False: the tracker's real format (UTC times and clock fields, the UTC date in
        #: the key); True: Boston local times with their offset, as other writers wrote.
        self.local_times = local_times
        if unknown := set(self.drift.zone_stations) - set(STATIONS):
            raise UserError(f"unknown zone station(s): {', '.join(sorted(unknown))}")
        if not 0 <= self.drift.home_move_share <= 1:
            raise UserError("the home move share must be between 0 and 1")
        self.rng = random.Random(seed)
        self.tz = ZoneInfo(utils.TRACKER_TIMEZONE)
        self.trains = self._timetable()
        self.route_of = {t.number: t.route_id for t in self.trains}
        #: Train number -> the weekdays (0 = Monday) on which it uses its second home.
        self.second_home_days: dict[int, frozenset[int]] = {
            t.number: frozenset(self.rng.sample(range(5), self.rng.randint(1, 2)))
            for t in self.trains if t.weekday and self.rng.random() < self.world.weekday_share
        }  # fmt: skip
        self.second_homes: dict[tuple[str, int], str] = {}
        # Each route favours a window of neighbouring platforms at each station; the windows
        # overlap and together cover every platform.
        self.windows: dict[tuple[str, str], list[str]] = {}
        for station, (tracks, routes) in STATIONS.items():
            for i, route_id in enumerate(routes):
                start = round(i * len(tracks) / len(routes))
                self.windows[station, route_id] = [*tracks[start:], *tracks[:start]][:4]
        self.homes: dict[tuple[str, int], str] = {}
        self.zones: dict[tuple[str, int], list[str]] = {}  # the zone, most used first
        self._season: tuple[str, int] | None = None
        #: (homes, zones) as they were before the latest change of season.
        self._last_season: tuple[dict, dict] | None = None
        self.skip_counts: Counter[str] = Counter()
        self.move_rng = random.Random(f"moves-{seed}")
        self.moved_on: dict[tuple[str, int], dt.date] = {}
        #: (first origin, days between origins): when set, each clean record gets its
        #: `knowable_probability`, from the world as it was the day before its origin.
        self.origins: tuple[dt.date, int] | None = None
        self._at_origin: tuple[dict, dict, dt.date] | None = None

    def _timetable(self) -> list[Train]:
        trains = []
        span = (23 * 60 + 30) - (5 * 60 + 30)
        for route_id, route in ROUTES.items():
            inbound = "North Station" if route_id in NORTH_ROUTES else "South Station"
            for weekday in (True, False):
                count = route.trains_per_direction if weekday else route.trains_per_direction // 2
                for direction_id in (0, 1):
                    for k in range(count):
                        # Outbound trains carry even numbers, inbound odd ones.
                        number = route.number_base + (0 if weekday else 50) + 2 * k + direction_id
                        minutes = 5 * 60 + 30 + int(span * (k + self.rng.random()) / count)
                        dest = inbound if direction_id else self.rng.choice(route.destinations)
                        headsign = f"{dest} - {route.line} Ln"
                        reliability = self.rng.uniform(self.world.reliability_low, 1.0)
                        trains.append(Train(route_id, number, direction_id, headsign, minutes,
                                            weekday, reliability))  # fmt: skip
        return trains

    def _home(self, station: str, train: Train, weekday: int | None = None) -> str:
        key = (station, train.number)
        if key not in self.homes:
            self.homes[key] = self.rng.choice(self.windows[station, train.route_id])
        if weekday in self.second_home_days.get(train.number, ()):
            if key not in self.second_homes:
                self.second_homes[key] = self._other_track(key, self.rng)
            return self.second_homes[key]
        return self.homes[key]

    def _other_track(self, key: tuple[str, int], rng: random.Random) -> str:
        """A random track of the window other than the home (the home if it is alone)."""
        window = self.windows[key[0], self.route_of[key[1]]]
        return rng.choice([t for t in window if t != self.homes[key]] or window)

    def _zone(self, station: str, train: Train) -> list[str]:
        key = (station, train.number)
        if key not in self.zones:
            window = self.windows[station, train.route_id]
            self.zones[key] = self.rng.sample(window, len(window))
        return self.zones[key]

    def _new_season(self, season: tuple[str, int]) -> None:
        """A new schedule: a share of the trains move home (or reorder their zone)."""
        if self._season is not None:
            self._last_season = self._state()
            for key in sorted(self.homes):
                if self.rng.random() < self.drift.home_move_share:
                    self.homes[key] = self._other_track(key, self.rng)
            for key in sorted(self.zones):
                if self.rng.random() < self.drift.home_move_share:
                    self.zones[key] = self.rng.sample(self.zones[key], len(self.zones[key]))
        self._season = season

    def _state(self) -> tuple[dict, dict]:
        return dict(self.homes), {k: list(v) for k, v in self.zones.items()}

    def _move_single_trains(self, day: dt.date) -> None:
        """Mid-season, now and then one train's home at one station moves (`weekly_moves`)."""
        for key in sorted(self.homes):
            if self.move_rng.random() < self.drift.weekly_moves / 7:
                self.homes[key] = self._other_track(key, self.move_rng)
                self.moved_on[key] = day

    def _at_day_start(self, day: dt.date) -> None:
        """Snapshot the world at an origin (the day before's), then a season's or a train's move."""
        if self.origins and day >= self.origins[0]:
            if (day - self.origins[0]).days % self.origins[1] == 0:
                self._at_origin = (*self._state(), day - dt.timedelta(days=1))
        if (season := season_of(day)) != self._season:
            self._new_season(season)
        if self.drift.weekly_moves:
            self._move_single_trains(day)

    def track_distribution(
        self, station: str, train: Train, hour: int, weekday: int | None = None
    ) -> dict[str, float]:
        """The generating distribution over tracks for one departure (Boston hour, weekday)."""
        if station in self.drift.zone_stations:
            zone = self._zone(station, train)
            shares = self.world.zone_weights[: len(zone)]
            return {track: w / sum(shares) for track, w in zip(zone, shares, strict=True)}
        home = self._home(station, train, weekday)
        others = [t for t in self.windows[station, train.route_id] if t != home]
        rush = train.weekday and (7 <= hour < 10 or 16 <= hour < 19)
        p_home = self.world.rush_home_share if rush else self.world.home_share
        p_home = max(p_home * train.reliability, 0.55)
        if not others:
            return {home: 1.0}
        # The first neighbour takes most of the exceptions.
        n = len(others) - 1
        weights = [0.6] + [0.4 / n] * n if n else [1.0]
        return {home: p_home} | {t: (1 - p_home) * w for t, w in zip(others, weights, strict=True)}

    def with_closures(self, dist: dict[str, float], station: str, day: dt.date) -> dict[str, float]:
        """`dist`, closed platforms' probability moved to the nearest open one (lower on a tie)."""
        closed = {t for c in self.drift.closures if c.active(station, day) for t in c.tracks}
        if not closed:
            return dist
        tracks = STATIONS[station][0]
        open_tracks = [t for t in tracks if t not in closed]
        moved: dict[str, float] = {}
        for track, p in dist.items():
            if track in closed and open_tracks:
                i = tracks.index(track)
                track = min(open_tracks, key=lambda t: (abs(tracks.index(t) - i), tracks.index(t)))
            moved[track] = moved.get(track, 0.0) + p
        return moved

    def _likeliest_under(self, state: tuple[dict, dict], station: str, train: Train,
                         local: dt.datetime, day: dt.date) -> str:  # fmt: skip
        """The likeliest track under earlier homes and zones (a train unknown then: today's)
        and `day`'s closures. Call after `track_distribution`, so no random number is drawn."""
        homes, zones = self.homes, self.zones
        self.homes, self.zones = ChainMap(state[0], homes), ChainMap(state[1], zones)  # type: ignore[assignment]
        try:
            dist = self.track_distribution(station, train, local.hour, local.weekday())
        finally:
            self.homes, self.zones = homes, zones
        dist = self.with_closures(dist, station, day)
        return max(dist, key=lambda t: dist[t])

    def _trip_id(self, train: Train, day: dt.date) -> str:
        season, year = season_of(day)
        daytype = "Weekday" if train.weekday else ("Saturday" if day.weekday() == 5 else "Sunday")
        if (year + SEASONS.index(season)) % 2:
            return f"CR-{daytype}-{season}-{year % 100}-{train.number}"
        season_id = 700000 + (year % 100) * 1000 + SEASONS.index(season) * 100
        return f"CR-{season_id + (0 if train.weekday else 50)}-{train.number}"

    def _departures(self, day: dt.date) -> Iterator[tuple[str, Train, dt.datetime]]:
        weekday = day.weekday() < 5
        season_shift = SEASONS.index(season_of(day)[0]) * 3 - 4  # minutes
        for train in self.trains:
            if train.weekday != weekday:
                continue
            for station, (_, routes) in STATIONS.items():
                if train.route_id not in routes:
                    continue
                # Back Bay and Ruggles are a few minutes from South Station.
                travel = {"place-bbsta": 5, "place-rugg": 8}.get(station, 0)
                travel = travel if train.direction_id == 0 else -travel
                minutes = max(0, min(train.minutes + season_shift + travel, 24 * 60 - 1))
                local = dt.datetime.combine(day, dt.time(minutes // 60, minutes % 60), self.tz)
                yield station, train, local

    def generate(self, n_records: int) -> Iterator[Assignment]:
        """`n_records` assignments (clean and dirty), day by day from START_DATE."""
        dirty_total = sum(DIRTY_RATES.values())
        reasons, reason_weights = list(DIRTY_RATES), list(DIRTY_RATES.values())
        last_clean: Assignment | None = None
        emitted, day = 0, START_DATE
        while emitted < n_records:
            self._at_day_start(day)
            for station, train, local in self._departures(day):
                if emitted >= n_records:
                    return
                if self.rng.random() < self.world.cancel_rate:
                    continue  # cancelled: the tracker never sees a track
                kind = "clean"
                if self.rng.random() < dirty_total:
                    kind = self.rng.choices(reasons, reason_weights)[0]
                    if kind == "duplicate" and last_clean is None:
                        kind = "clean"
                if kind == "duplicate" and last_clean is not None:
                    # Never duplicate the same record twice.
                    event, last_clean = self._duplicate_of(last_clean), None
                else:
                    event = self._assignment(station, train, local, kind)
                    if kind == "clean":
                        last_clean = event
                if kind != "clean":
                    self.skip_counts[kind] += 1
                emitted += 1
                yield event
            day += dt.timedelta(days=1)

    def _assignment(self, station: str, train: Train, local: dt.datetime, kind: str) -> Assignment:
        rng, day = self.rng, local.date()
        trip_id = self._trip_id(train, day)
        dist = self.track_distribution(station, train, local.hour, local.weekday())
        dist = self.with_closures(dist, station, day)
        track = rng.choices(list(dist), list(dist.values()))[0]
        recorded = local - dt.timedelta(seconds=rng.randint(300, 1800))
        # Other writers knew an actual time, sometimes (drawn either way, so both formats
        # describe the same departures and tracks).
        actual = local + dt.timedelta(seconds=rng.randint(-30, 600))
        actual_time = actual.isoformat() if rng.random() > 0.1 else None
        extra = {"actual_time": actual_time} if self.local_times else {}
        doc = assignment_doc(
            station, train.route_id, trip_id, train.headsign, train.direction_id, local, track,
            assignment_type="historical" if rng.random() > 0.02 else "predicted",
            recorded=recorded, utc=not self.local_times, **extra,
        )  # fmt: skip
        if kind in BAD_TRACKS:
            doc["track_number"] = BAD_TRACKS[kind]
        elif kind == "missing_field":
            del doc[rng.choice(["headsign", "hour", "scheduled_time", "direction_id"])]
        elif kind == "wrong_type":
            field = rng.choice(["direction_id", "hour"])
            doc[field] = str(doc[field])
        payload = json.dumps(doc, separators=(",", ":"))
        if kind == "invalid_json":
            payload = payload[: len(payload) // 2]  # a torn write
        series = f"track_timeseries:{station}:{train.route_id}"
        # The key holds the scheduled date as the writer saw it: UTC for the tracker.
        keyed = local if self.local_times else local.astimezone(dt.UTC)
        member = f"track_history:{station}:{train.route_id}:{trip_id}:{keyed.date().isoformat()}"
        score = local.timestamp()
        event = Assignment(series, member, score, None if kind == "expired_key" else payload, kind)
        if kind == "clean":
            event.truth_key = (station, trip_id, score)
            event.best_probability = event.last_season_probability = max(dist.values())
            if self._last_season is not None:
                last = self._likeliest_under(self._last_season, station, train, local, day)
                event.last_season_probability = dist.get(last, 0.0)
            if self._at_origin is not None:
                known = self._likeliest_under(self._at_origin[:2], station, train, local,
                                              self._at_origin[2])  # fmt: skip
                event.knowable_probability = dist.get(known, 0.0)
            event.moved_on = self.moved_on.get((station, train.number))
        return event

    def _duplicate_of(self, first: Assignment) -> Assignment:
        """A second copy of a clean record, in one of two ways seen in real data."""
        station = first.series_key.split(":")[1]
        if self.rng.random() < 0.5:
            # The same history key indexed by another route's series at the station.
            routes = [r for r in STATIONS[station][1] if r not in first.series_key]
            series = f"track_timeseries:{station}:{self.rng.choice(routes)}"
            return Assignment(series, first.member_key, first.score, None, "duplicate")
        # The same assignment again under a key whose date is written differently.
        prefix, day = first.member_key.rsplit(":", 1)
        member = f"{prefix}:{day.replace('-', '')}"
        return Assignment(first.series_key, member, first.score, first.payload, "duplicate")


def assignment_doc(station: str, route_id: str, trip_id: str, headsign: str, direction_id: int,
                   scheduled: dt.datetime, track: str | None, recorded: dt.datetime | None = None,
                   utc: bool = True, **fields: Any) -> dict[str, Any]:  # fmt: skip
    """One track assignment as the tracker stores it (docs/tracker-layout.md). `utc` (its real
    format): times in UTC with a `Z`, actual_time = scheduled_time (the tracker never knew it),
    clock fields of the UTC time; else other writers' local-offset form with its own clock
    fields and no actual time. `fields` override any field (actual_time, ...)."""
    recorded = recorded or scheduled - dt.timedelta(minutes=15)
    written = scheduled.astimezone(dt.UTC) if utc else scheduled
    text = written.isoformat().replace("+00:00", "Z") if utc else scheduled.isoformat()
    return {
        "station_id": station, "route_id": route_id, "trip_id": trip_id, "headsign": headsign,
        "direction_id": direction_id, "assignment_type": "historical", "track_number": track,
        "scheduled_time": text, "actual_time": text if utc else None,
        "recorded_time": recorded.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "day_of_week": written.weekday(), "hour": written.hour, "minute": written.minute,
        **fields,
    }  # fmt: skip


def save_truth(path: Path, keys: list[tuple[str, str, float]], best: list[float],
               last_season: list[float] | None = None) -> None:  # fmt: skip
    """Write `sample_truth.npz`: record identity -> best achievable probability (and what an
    answer knowing only last season can expect)."""
    import numpy as np

    extra = {} if last_season is None else {
        "last_season_probability": np.array(last_season, dtype=np.float32)}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez_compressed(
            fh,
            station_id=np.array([k[0] for k in keys]),
            trip_id=np.array([k[1] for k in keys]),
            # float32, exactly as the TFRecord stores scheduled_timestamp.
            scheduled_timestamp=np.array([k[2] for k in keys], dtype=np.float32),
            best_probability=np.array(best, dtype=np.float32),
            **extra,  # type: ignore[arg-type]
        )


def seed_redis(client: Any, n_records: int, seed: int, truth_file: Path | None = None,
               drift: Drift | None = None, local_times: bool = False) -> Counter:  # fmt: skip
    """Write `n_records` assignments in the tracker's layout; returns dirty counts."""
    history = SampleHistory(seed, drift, local_times=local_times)
    truth_keys: list[tuple[str, str, float]] = []
    truth_best: list[float] = []
    events = utils.progress(
        history.generate(n_records), total=n_records, desc="Seeding Redis", unit=" rec"
    )
    for batch in utils.chunked(events, 2000):
        pipe = client.pipeline(transaction=False)
        for event in batch:
            if event.payload is not None:
                # The tracker never overwrites an existing history key.
                pipe.set(event.member_key, event.payload, ex=ONE_YEAR_S, nx=True)
            pipe.zadd(event.series_key, {event.member_key: event.score})
            if event.truth_key:
                truth_keys.append(event.truth_key)
                truth_best.append(event.best_probability)
        pipe.execute()
    for key in {f"track_timeseries:{s}:{r}" for s, (_, rs) in STATIONS.items() for r in rs}:
        client.expire(key, ONE_YEAR_S)
    if truth_file:
        save_truth(truth_file, truth_keys, truth_best)
    return history.skip_counts


def write_export(
    output: Path,
    n_records: int,
    seed: int,
    records_per_file: int,
    drift: Drift | None = None,
    local_times: bool = False,
) -> Path:
    """Write an export directory directly (the same files the exporter makes)."""
    from imt_ml import export_track_data as etd

    history = SampleHistory(seed, drift, local_times=local_times)
    stats = etd.ExportStats()
    truth_keys: list[tuple[str, str, float]] = []
    truth_best: list[float] = []
    with etd.TFRecordShardWriter(output, records_per_file) as writer:
        events = utils.progress(
            history.generate(n_records), total=n_records, desc="Writing export", unit=" rec"
        )
        for event in events:
            duplicate = event.kind == "duplicate"
            parsed = "duplicate" if duplicate else etd.parse_assignment(event.payload)
            if isinstance(parsed, str):
                stats.skip(parsed)
                continue
            writer.write(etd.encode_example(parsed))
            stats.add(parsed)
            if event.truth_key:
                truth_keys.append(event.truth_key)
                truth_best.append(event.best_probability)
        save_truth(writer.partial_dir / SAMPLE_TRUTH_FILE, truth_keys, truth_best)
        return writer.commit(stats.metadata(
            source="sample_data", seed=seed, records_per_file=records_per_file,
            drift=dataclasses.asdict(history.drift), world=dataclasses.asdict(history.world),
            local_times=local_times))  # fmt: skip


records_option = functools.partial(
    click.option, "--records", "-n", type=click.IntRange(min=1), show_default=True
)
seed_option = click.option("--seed", type=int, default=42, show_default=True, help="Random seed.")
local_times_option = click.option(
    "--local-times", is_flag=True,
    help="Write Boston local times with their offset (as older writers did) instead of the "
    "tracker's real format (UTC times, UTC clock fields, the UTC date in the key).",
)  # fmt: skip
output_option = click.option(
    "--output", "-o", type=click.Path(file_okay=False, path_type=Path),
    default=Path("track_data_export"), show_default=True, help="Export root.",
)  # fmt: skip


def drift_options(func: Any) -> Any:
    """--home-move-share, --zone-stations and --weekly-moves, gathered into a Drift."""
    d = Drift()

    @click.option("--home-move-share", type=click.FloatRange(0, 1), default=d.home_move_share,
                  show_default=True,
                  help="Share of trains whose home track moves at each schedule season.")  # fmt: skip
    @click.option("--zone-stations", default=",".join(d.zone_stations), show_default=True,
                  help="Comma-separated stations whose trains keep only to a zone of tracks "
                  "(\"\" for none).")  # fmt: skip
    @click.option("--weekly-moves", type=click.FloatRange(0, 1), default=d.weekly_moves,
                  show_default=True,
                  help="Chance a week that a train's home track moves mid-season.")  # fmt: skip
    @functools.wraps(func)
    def to_drift(home_move_share: float, zone_stations: str, weekly_moves: float,
                 **kwargs: Any) -> Any:  # fmt: skip
        stations = tuple(s.strip() for s in zone_stations.split(",") if s.strip())
        return func(drift=Drift(home_move_share, stations, weekly_moves=weekly_moves), **kwargs)

    return to_drift


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """Generate realistic synthetic track history."""


@cli.command("to-redis", epilog=environment_epilog(utils.ENV_REDIS, utils.ENV_PROGRESS))
@records_option(default=50_000, help="Assignments to generate, dirty ones included.")
@seed_option
@drift_options
@local_times_option
@utils.redis_options
@click.option("--truth-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Also write the generating probabilities here (name it {SAMPLE_TRUTH_FILE} "
                   "inside the export root and training reports find it).")  # fmt: skip
def to_redis(records: int, seed: int, redis: RedisTarget, truth_file: Path | None, drift: Drift,
             local_times: bool) -> None:  # fmt: skip
    """Write sample history into Redis in the tracker's key layout."""
    dirty = seed_redis(redis.connect(), records, seed, truth_file, drift, local_times)
    log(f"Wrote {records:,} assignments to Redis at {redis.label} ({sum(dirty.values()):,} dirty)")


@cli.command("to-export", epilog=environment_epilog(utils.ENV_PROGRESS))
@records_option(default=50_000, help="Assignments to generate, dirty ones included.")
@seed_option
@output_option
@click.option("--records-per-file", type=click.IntRange(min=1), default=10_000, show_default=True)
@drift_options
@local_times_option
def to_export(
    records: int, seed: int, output: Path, records_per_file: int, drift: Drift, local_times: bool
) -> None:
    """Write sample history straight to an export directory (no Redis needed)."""
    path = write_export(output, records, seed, records_per_file, drift, local_times)
    log(f"Wrote sample export to {path}")
    click.echo(str(path))


@cli.command(epilog=environment_epilog(utils.ENV_OUTPUT, utils.ENV_PROGRESS))
@records_option(default=20_000, help="Assignments to generate.")
@seed_option
@output_option
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@drift_options
def demo(records: int, seed: int, output: Path, epochs: int, drift: Drift) -> None:
    """Sample history -> Redis (when a server can be started) -> export -> train -> report."""
    from imt_ml.tfrecord_reader import TrainOptions, run_train

    path = run_demo_export(records, seed, output, drift)
    log(f"Demo export ready: {path}")
    result = run_train(path, TrainOptions(epochs=epochs, seed=seed))
    ev = result.evaluation
    top1, top3 = ev.metrics["top1_accuracy"], ev.metrics["top3_accuracy"]
    log(f"\nDemo finished in {result.run_dir}")
    log("  on the held-out test window (the newest 7 days, which no training choice saw):")
    log(f"  top-1 accuracy                 {100 * top1:6.2f}%  (top-3 {100 * top3:.2f}%)")
    for name, accuracy in ev.baselines.items():
        log(f"  lookup table: {name:<22} {100 * accuracy:6.2f}%")
    if ev.best_possible:
        log(f"  best possible (sample data)    {100 * ev.best_possible['accuracy']:6.2f}%")
    log(f"  report: {result.run_dir / 'training_report.md'}")


def run_demo_export(records: int, seed: int, output: Path, drift: Drift | None = None) -> Path:
    """The demo's data half: through a throwaway Redis when possible, else directly."""
    from imt_ml.export_track_data import run_export

    if utils.find_redis_server_binary() is None:
        log("No redis-server available: writing the sample export directly")
        return write_export(output, records, seed, 10_000, drift)
    with utils.LocalRedisServer() as server:
        log(f"Started a throwaway redis-server on 127.0.0.1:{server.port}")
        target = RedisTarget("127.0.0.1", server.port)
        seed_redis(target.connect(), records, seed, output / SAMPLE_TRUTH_FILE, drift)
        path, stats, seconds = run_export(target, output, 10_000)
    log(f"Exported {stats.written:,} records in {seconds:.1f} s; {stats.summary()}")
    return path


def main() -> None:
    try:
        cli()
    except UserError as exc:  # raised outside click's own handling
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()

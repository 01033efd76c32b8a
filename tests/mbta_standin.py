"""A stand-in for the MBTA V3 API on 127.0.0.1, built from docs/mbta-v3.md: JSON:API documents, `x-api-key`, rate-limit headers and 429,
`include=`, and the predictions stream as Server-Sent Events (`reset`, `add`,
`update`, `remove`, `:` keep-alive lines).

Tests change its world (`set_prediction`, `remove_prediction`, `add_trip`) and each
change is also sent to every open stream, the way the real API does; `fail_next`
makes the next requests fail with a status; `drop_streams` cuts every stream.

    with StandInMbta(api_key="k") as api:
        api.set_prediction(api.prediction("CR-Weekday-520", "NEC-2287-05", "CR-Worcester", when))
        ... run the recorder with --api-url api.url --api-key k ...
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

#: parent -> (name, generic child stop or None, [(track stop id, platform code)])
STATIONS: dict[str, tuple[str, str | None, list[tuple[str, str]]]] = {
    "place-sstat": ("South Station", "NEC-2287",
                    [(f"NEC-2287-{n:02d}", str(n)) for n in range(1, 14)]),
    "place-north": ("North Station", "BNT-0000",
                    [(f"BNT-0000-{n:02d}", str(n)) for n in range(1, 11)]),
    "place-bbsta": ("Back Bay", None,
                    [("NEC-2276-01", "1"), ("NEC-2276-02", "2"), ("NEC-2276-03", "3"),
                     ("WML-0012-05", "5"), ("WML-0012-07", "7")]),
    "place-rugg": ("Ruggles", None, [(f"NEC-2265-{n:02d}", str(n)) for n in range(1, 4)]),
}  # fmt: skip

_DROP = object()


def local_time(moment: dt.datetime) -> str:
    """An instant as the API writes it: Boston local time with its offset."""
    from zoneinfo import ZoneInfo

    return moment.astimezone(ZoneInfo("America/New_York")).isoformat()


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class StandInMbta:
    """The stand-in server (a thread of the test process)."""

    def __init__(self, api_key: str | None = None, keepalive: float = 0.5) -> None:
        self.api_key = api_key
        self.keepalive = keepalive
        self.lock = threading.Lock()
        self.stops: dict[str, dict[str, Any]] = {}
        self.trips: dict[str, dict[str, Any]] = {}
        self.predictions: dict[str, dict[str, Any]] = {}
        self.schedules: list[dict[str, Any]] = []
        self.fail_next: list[int] = []  # statuses for the next requests (429 gets a reset)
        self.rate_limit_wait = 1.0  # seconds until the window resets after a 429
        self.requests: list[tuple[str, str, bool]] = []  # (path, query, a stream?)
        self.stream_connections = 0
        self._streams: list[queue.Queue[Any]] = []
        for parent, (name, generic, tracks) in STATIONS.items():
            self.stops[parent] = self._stop(parent, name, None, None)
            if generic:
                self.stops[generic] = self._stop(generic, name, None, parent)
            for stop_id, code in tracks:
                self.stops[stop_id] = self._stop(stop_id, name, code, parent)
        handler = type("Handler", (_Handler,), {"api": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- lifecycle --------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> StandInMbta:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.drop_streams()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> StandInMbta:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- resources ----------------------------------------------------------------

    @staticmethod
    def _stop(stop_id: str, name: str, code: str | None, parent: str | None) -> dict[str, Any]:
        platform = f"Commuter Rail - Track {code}" if code else "Commuter Rail"
        return {"type": "stop", "id": stop_id,
                "attributes": {"name": name, "platform_code": code, "platform_name": platform,
                               "description": f"{name} - {platform}",
                               "location_type": 1 if parent is None else 0, "vehicle_type": 2,
                               "wheelchair_boarding": 1},
                "relationships": {"parent_station": {"data": {"type": "stop", "id": parent}
                                                     if parent else None},
                                  "zone": {"data": {"type": "zone", "id": "CR-zone-1A"}}}}  # fmt: skip

    @staticmethod
    def trip(trip_id: str, headsign: str, direction_id: int = 0) -> dict[str, Any]:
        return {"type": "trip", "id": trip_id,
                "attributes": {"headsign": headsign, "name": trip_id.rsplit("-", 1)[-1],
                               "direction_id": direction_id, "bikes_allowed": 1},
                "relationships": {}}  # fmt: skip

    @staticmethod
    def prediction(trip_id: str, stop_id: str, route_id: str, when: dt.datetime | None,
                   direction_id: int = 0, arrival: dt.datetime | None = None,
                   schedule_relationship: str | None = None,
                   status: str | None = None) -> dict[str, Any]:  # fmt: skip
        """A prediction; its id stays the same when its stop changes (as the API's do)."""
        return {"type": "prediction",
                "id": f"prediction-{trip_id}-{stop_id[:8]}-0-{route_id}",
                "attributes": {"arrival_time": local_time(arrival) if arrival else None,
                               "departure_time": local_time(when) if when else None,
                               "direction_id": direction_id, "status": status,
                               "stop_sequence": 0, "schedule_relationship": schedule_relationship,
                               "revenue": "REVENUE", "update_type": None},
                "relationships": {"route": {"data": {"type": "route", "id": route_id}},
                                  "stop": {"data": {"type": "stop", "id": stop_id}},
                                  "trip": {"data": {"type": "trip", "id": trip_id}},
                                  "schedule": {"data": None},
                                  "vehicle": {"data": None}}}  # fmt: skip

    def add_trip(self, trip: dict[str, Any], publish: bool = True) -> None:
        with self.lock:
            event = "update" if trip["id"] in self.trips else "add"
            self.trips[trip["id"]] = trip
        if publish:
            self.publish(sse(event, trip))

    def set_prediction(self, prediction: dict[str, Any], headsign: str | None = None,
                       publish: bool = True) -> None:  # fmt: skip
        """Add or update a prediction; its trip is added first when `headsign` is given."""
        trip_id = prediction["relationships"]["trip"]["data"]["id"]
        if headsign is not None:
            self.add_trip(self.trip(trip_id, headsign, prediction["attributes"]["direction_id"]),
                          publish)  # fmt: skip
        with self.lock:
            event = "update" if prediction["id"] in self.predictions else "add"
            self.predictions[prediction["id"]] = prediction
        if publish:
            self.publish(sse(event, prediction))

    def add_schedule(self, trip_id: str, stop_id: str, route_id: str, departure: dt.datetime | None,
                     headsign: str, direction_id: int = 0,
                     arrival: dt.datetime | None = None) -> dict[str, Any]:  # fmt: skip
        """A scheduled stop (its trip added too); `/schedules?filter[date]=` lists it."""
        self.add_trip(self.trip(trip_id, headsign, direction_id), publish=False)
        schedule = {"type": "schedule", "id": f"schedule-{trip_id}-{stop_id}-{len(self.schedules)}",
                    "attributes": {"arrival_time": local_time(arrival) if arrival else None,
                                   "departure_time": local_time(departure) if departure else None,
                                   "direction_id": direction_id, "drop_off_type": 0,
                                   "pickup_type": 0, "stop_sequence": 1, "timepoint": True},
                    "relationships": {"route": {"data": {"type": "route", "id": route_id}},
                                      "stop": {"data": {"type": "stop", "id": stop_id}},
                                      "trip": {"data": {"type": "trip", "id": trip_id}}}}  # fmt: skip
        with self.lock:
            self.schedules.append(schedule)
        return schedule

    def remove_prediction(self, prediction_id: str) -> None:
        with self.lock:
            self.predictions.pop(prediction_id, None)
        self.publish(sse("remove", {"type": "prediction", "id": prediction_id}))

    # -- streams ------------------------------------------------------------------

    def publish(self, payload: bytes) -> None:
        """Send raw bytes (events, or anything malformed a test wants) to every stream."""
        with self.lock:
            streams = list(self._streams)
        for stream in streams:
            stream.put(payload)

    def drop_streams(self) -> None:
        with self.lock:
            streams, self._streams = self._streams, []
        for stream in streams:
            stream.put(_DROP)

    def wait_for_streams(self, n: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self._streams) >= n:
                    return
            time.sleep(0.02)
        raise TimeoutError(f"no {n} open streams within {timeout} s")

    # -- documents ------------------------------------------------------------------

    def predictions_document(self, query: dict[str, list[str]],
                             schedules: bool = False) -> dict[str, Any]:  # fmt: skip
        """/predictions (or /schedules) filtered by stop (parents include their children)
        and, for schedules, by the Boston service date."""
        wanted = set(",".join(query.get("filter[stop]", [])).split(",")) - {""}
        includes = set(",".join(query.get("include", [])).split(","))
        day = (query.get("filter[date]") or [None])[0]
        with self.lock:
            data = []
            resources = self.schedules if schedules else self.predictions.values()
            for prediction in resources:
                attributes = prediction["attributes"]
                when = attributes["departure_time"] or attributes["arrival_time"]
                if day and when and when[:10] != day:
                    continue
                stop = self.stops.get(prediction["relationships"]["stop"]["data"]["id"])
                parent = stop and (stop["relationships"]["parent_station"]["data"] or {}).get("id")
                if not wanted or (stop and (stop["id"] in wanted or parent in wanted)):
                    data.append(prediction)
            included: dict[tuple[str, str], dict[str, Any]] = {}
            for prediction in data:
                for name, table in (("stop", self.stops), ("trip", self.trips)):
                    ref = prediction["relationships"][name]["data"]
                    if name in includes and ref and ref["id"] in table:
                        included[(name, ref["id"])] = table[ref["id"]]
        return {"data": data, "included": list(included.values()), "jsonapi": {"version": "1.0"}}


class _Handler(BaseHTTPRequestHandler):
    api: StandInMbta
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: Any, extra: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/vnd.api+json")
        self.send_header("content-length", str(len(payload)))
        self._rate_headers(extra)
        self.end_headers()
        self.wfile.write(payload)

    def _rate_headers(self, extra: dict[str, str] | None = None) -> None:
        headers = {"x-ratelimit-limit": "1000", "x-ratelimit-remaining": "999",
                   "x-ratelimit-reset": str(int(time.time()) + 60), **(extra or {})}  # fmt: skip
        for name, value in headers.items():
            self.send_header(name, value)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        api = self.api
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        accept = self.headers.get("accept") or ""
        api.requests.append((parts.path, parts.query, "text/event-stream" in accept))
        if api.api_key is not None:
            key = self.headers.get("x-api-key") or (query.get("api_key") or [None])[0]
            if key != api.api_key:
                self._send(403, {"errors": [{"status": "403", "code": "forbidden"}]})
                return
        if api.fail_next:
            status = api.fail_next.pop(0)
            reset = time.time() + api.rate_limit_wait
            self._send(status, {"errors": [{"status": str(status)}]},
                       {"x-ratelimit-remaining": "0", "x-ratelimit-reset": f"{reset:.0f}"}
                       if status == 429 else None)  # fmt: skip
            return
        if parts.path == "/predictions":
            if "text/event-stream" in (self.headers.get("accept") or ""):
                self._stream(query)
            else:
                self._send(200, api.predictions_document(query))
        elif parts.path.startswith("/stops/"):
            stop = api.stops.get(parts.path.removeprefix("/stops/"))
            if stop is None:
                self._send(404, {"errors": [{"status": "404", "code": "not_found"}]})
                return
            children = [s for s in api.stops.values()
                        if (s["relationships"]["parent_station"]["data"] or {}).get("id") == stop["id"]]  # fmt: skip
            included = children if "child_stops" in ",".join(query.get("include", [])) else []
            self._send(200, {"data": stop, "included": included, "jsonapi": {"version": "1.0"}})
        elif parts.path == "/schedules":
            self._send(200, api.predictions_document(query, schedules=True))
        else:
            self._send(404, {"errors": [{"status": "404", "code": "not_found"}]})

    def _stream(self, query: dict[str, list[str]]) -> None:
        api = self.api
        stream: queue.Queue[Any] = queue.Queue()
        document = api.predictions_document(query)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self._rate_headers()
        self.end_headers()
        try:
            self.wfile.write(sse("reset", document["included"] + document["data"]))
            self.wfile.flush()
            with api.lock:
                api._streams.append(stream)
                api.stream_connections += 1
            while True:
                try:
                    item = stream.get(timeout=api.keepalive)
                except queue.Empty:
                    item = b": keep-alive\n"
                if item is _DROP:
                    return
                self.wfile.write(item)
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            with api.lock:
                if stream in api._streams:
                    api._streams.remove(stream)

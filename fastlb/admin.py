"""The admin endpoint: stats page, /stats.json, Prometheus /metrics and /healthz.

It runs in its own threads (``http.server``) and reads the balancer only
through ``Balancer.stats()``, one consistent snapshot taken under the pool's
lock; it never touches the relay path.  The Prometheus text format is written
here by hand rather than through ``prometheus-client``: the figures already
live in the backend table, so a scrape only formats a snapshot, the relay path
pays nothing, and fastlb keeps no runtime dependency.
"""

from __future__ import annotations

import errno
import hmac
import html
import json
import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional
from urllib.parse import unquote

from fastlb.failsafe import INTERNAL_ERRORS, InternalErrors
from fastlb.api import ApiError
from fastlb.pool import DURATION_BUCKETS

if TYPE_CHECKING:
    from fastlb.api import Runtime

log = logging.getLogger("fastlb")

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")

# An admin connection that sends nothing for this long is closed: each one
# holds a thread and a descriptor.
ADMIN_TIMEOUT = 10.0
# Admin connections served at once; more are closed at once.  Scrapers and a
# few browsers need a handful; an exposed endpoint must not be a thread bomb.
ADMIN_MAX_CONNECTIONS = 32
# Out of descriptors, accept() fails while a client waits in the backlog and
# the listener stays readable: pause this long (the accept loop's pause) rather
# than trying again at once.
ACCEPT_PAUSE = 0.1
# The largest API request body: a backend's settings are a few hundred bytes.
API_MAX_BODY = 65536


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return ("%d %s" % (count, unit)) if unit == "B" else ("%.1f %s" % (count, unit))
        count /= 1024
    return str(count)


def render_page(stats: dict[str, Any]) -> str:
    """The HTML stats page: one row per backend and a totals row; it refreshes itself."""
    esc = html.escape
    rows = []
    for b in stats["backends"]:
        latency = "-" if b["probe_latency"] is None else "%.1f ms" % (b["probe_latency"] * 1000)
        since = time.strftime("%H:%M:%S", time.localtime(b["last_change"]))
        state = b["state"] + (" (removed)" if b["removed"] else "") + (" (backup)" if b["backup"] else "")
        if b["admin_state"] != "ready":
            state += " (%s)" % b["admin_state"]
        rows.append(
            "<tr class='%s'><td class='name'>%s</td><td class='state'>%s</td><td>%s</td>"
            "<td class='reason'>%s</td><td class='check'>%s</td><td>%s</td><td>%d</td><td>%d</td>"
            "<td>%d</td><td>%d</td><td>%d</td><td>%s</td><td>%s</td>%s</tr>"
            % (esc(b["state"]), esc(b["backend"]), esc(state), since, esc(b["reason"]),
               esc(b["check"]), latency, b["weight"], b["entries"], b["errors"], b["routed"],
               b["active"],
               human_bytes(b["bytes_up"]), human_bytes(b["bytes_down"]),
               "".join("<td>%d</td>" % b["responses"][c] for c in STATUS_CLASSES))
        )
    t = stats["totals"]
    rows.append(
        "<tr class='totals'><td>total</td><td>%d/%d up</td><td></td><td></td><td></td><td></td><td></td>"
        "<td></td><td></td><td>%d</td><td>%d</td><td>%s</td><td>%s</td>%s</tr>"
        % (t["up"], len(stats["backends"]), t["routed"], t["active"], human_bytes(t["bytes_up"]),
           human_bytes(t["bytes_down"]),
           "".join("<td>%d</td>" % t["responses"][c] for c in STATUS_CLASSES))
    )
    return PAGE % {
        "title": "fastlb on %s" % esc(stats["listen"]),
        "summary": esc(
            "fastlb %s (%s bridge), %s, up %ds, balance %s; %d connections accepted, %d in flight "
            "(at most %d%s), %d queued; %d answered 500 (no backend), %d answered 503 (queue full)%s"
            % (stats["version"], stats["bridge"], stats["state"], stats["uptime"], stats["balance"],
               stats["accepted"], stats["inflight"], stats["max_connections"],
               ": at capacity, new clients wait" if stats["at_capacity"] else "",
               stats["queue_length"], stats["no_backend"], stats["queue_full"],
               "; %d closed for a missing or bad PROXY header" % stats["bad_proxy_header"]
               if stats["accept_proxy"] else "")
        ),
        "classes": "".join("<th>%s</th>" % c for c in STATUS_CLASSES),
        "rows": "\n".join(rows),
    }


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="2">
<title>%(title)s</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
p { margin: 0 0 1em; color: #555; }
table { border-collapse: collapse; }
th, td { padding: .3em .6em; border: 1px solid #ccc; text-align: right; white-space: nowrap; }
th { background: #eee; }
td.name, td.reason, td.state, td.check { text-align: left; }
tr.up td.state { background: #c8f0c8; }
tr.down td.state { background: #f6c4c4; }
tr.unknown td.state { background: #eee; }
tr.totals { font-weight: bold; background: #f7f7f7; }
</style></head>
<body>
<h1>%(title)s</h1>
<p id="summary">%(summary)s</p>
<table id="backends">
<thead><tr><th rowspan="2">backend</th><th rowspan="2">state</th><th rowspan="2">since</th>
<th rowspan="2">last change</th><th rowspan="2">check</th><th rowspan="2">probe</th><th rowspan="2">weight</th>
<th colspan="2">reported</th><th colspan="2">connections</th><th colspan="2">bytes</th>
<th colspan="6">responses</th></tr>
<tr><th>entries</th><th>errors</th><th>routed</th><th>active</th><th>in</th><th>out</th>%(classes)s</tr>
</thead>
<tbody>
%(rows)s
</tbody></table>
<p>Refreshes every 2 s. Also: <a href="stats.json">stats.json</a>, <a href="metrics">metrics</a>,
<a href="healthz">healthz</a>.</p>
</body></html>
"""


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(stats: dict[str, Any]) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    out: list[str] = []

    def family(name: str, kind: str, help_text: str,
               samples: Iterable[tuple[tuple[tuple[str, Any], ...], Any]]) -> None:
        out.append("# HELP %s %s" % (name, help_text))
        out.append("# TYPE %s %s" % (name, kind))
        for labels, value in samples:
            label_text = ",".join('%s="%s"' % (k, _label(str(v))) for k, v in labels)
            out.append("%s%s %s" % (name, "{%s}" % label_text if label_text else "", _number(value)))

    backends = stats["backends"]
    family("fastlb_info", "gauge", "Version and active bridge.",
           [((("version", stats["version"]), ("bridge", stats["bridge"])), 1)])
    family("fastlb_accepting", "gauge", "1 while fastlb accepts traffic, 0 while it drains.",
           [((), 1 if stats["state"] == "running" else 0)])
    family("fastlb_accepted_connections_total", "counter", "Client connections accepted.",
           [((), stats["accepted"])])
    family("fastlb_no_backend_total", "counter", "Connections answered 500 because no backend was usable.",
           [((), stats["no_backend"])])
    family("fastlb_queue_full_total", "counter", "Connections answered 503 because the queue was full.",
           [((), stats["queue_full"])])
    family("fastlb_internal_errors_total", "counter",
           "Unexpected exceptions caught in fastlb's own threads (each logged, at most every 10 s).",
           [((), stats["internal_errors"])])
    family("fastlb_access_log_dropped_total", "counter",
           "Access-log lines dropped because the writer fell behind.", [((), stats["access_log_dropped"])])
    family("fastlb_access_log_errors_total", "counter",
           "Access-log writes and reopens that failed (a full disk, say).",
           [((), stats["access_log_errors"])])
    family("fastlb_bad_proxy_header_total", "counter",
           "Client connections closed for a missing or bad PROXY protocol header (--accept-proxy).",
           [((), stats["bad_proxy_header"])])
    family("fastlb_inflight_connections", "gauge", "Accepted connections not yet closed.",
           [((), stats["inflight"])])
    family("fastlb_max_connections", "gauge", "Client connections fastlb holds at most (--max-connections).",
           [((), stats["max_connections"])])
    family("fastlb_at_capacity", "gauge",
           "1 while --max-connections are open and new clients wait in the listen backlog.",
           [((), 1 if stats["at_capacity"] else 0)])
    family("fastlb_splice_pipes", "gauge", "Splice pipes open now (two descriptors each).",
           [((), stats["pipes"])])
    family("fastlb_max_splice_pipes", "gauge",
           "Splice pipes fastlb opens at most; beyond them bulk bytes are copied.",
           [((), stats["max_pipes"])])
    family("fastlb_queued_connections", "gauge", "Connections waiting for a worker.",
           [((), stats["queue_length"])])

    def per_backend(name: str, kind: str, help_text: str,
                    key: Callable[[dict[str, Any]], Any]) -> None:
        family(name, kind, help_text, [((("backend", b["backend"]),), key(b)) for b in backends])

    per_backend("fastlb_backend_up", "gauge", "1 when the backend is up, else 0.",
                lambda b: 1 if b["state"] == "up" else 0)
    per_backend("fastlb_backend_weight", "gauge", "Configured weight.", lambda b: b["weight"])
    family("fastlb_backend_admin_state", "gauge",
           "1 for the backend's administrative state (ready, drain or maint; set at run time).",
           [((("backend", b["backend"]), ("state", b["admin_state"])), 1) for b in backends])
    family("fastlb_backend_check_info", "gauge",
           "Always 1; how the backend is probed (check) and whether it is a backup.",
           [((("backend", b["backend"]), ("check", b["check"]),
              ("backup", "true" if b["backup"] else "false")), 1) for b in backends])
    per_backend("fastlb_backend_entries", "gauge",
                "Entries as reported by the last probe plus connections routed since.",
                lambda b: b["entries"])
    per_backend("fastlb_backend_errors", "gauge", "Errors as reported by the last probe.",
                lambda b: b["errors"])
    per_backend("fastlb_backend_probe_latency_seconds", "gauge", "Duration of the last probe.",
                lambda b: b["probe_latency"] if b["probe_latency"] is not None else float("nan"))
    per_backend("fastlb_backend_connections_total", "counter", "Connections routed to the backend.",
                lambda b: b["routed"])
    per_backend("fastlb_backend_active_connections", "gauge", "Relays in progress.",
                lambda b: b["active"])
    per_backend("fastlb_backend_failures_total", "counter",
                "Failed connects and server timeouts.", lambda b: b["failures"])
    per_backend("fastlb_backend_replays_total", "counter",
                "Connections the backend closed or reset before any answer, replayed on another.",
                lambda b: b["replays"])
    family("fastlb_backend_bytes_total", "counter", "Bytes relayed, by direction.",
           [((("backend", b["backend"]), ("direction", d)), b["bytes_" + d])
            for b in backends for d in ("up", "down")])
    family("fastlb_backend_responses_total", "counter",
           "Connections by status class of their first response.",
           [((("backend", b["backend"]), ("class", c)), b["responses"][c])
            for b in backends for c in STATUS_CLASSES])
    out.append("# HELP fastlb_backend_connection_duration_seconds Duration of relayed connections.")
    out.append("# TYPE fastlb_backend_connection_duration_seconds histogram")
    for b in backends:
        label = 'backend="%s"' % _label(b["backend"])
        cumulative = 0
        for bound, count in zip(DURATION_BUCKETS + (float("inf"),), b["durations"]):
            cumulative += count
            out.append('fastlb_backend_connection_duration_seconds_bucket{%s,le="%s"} %d'
                       % (label, "+Inf" if bound == float("inf") else repr(bound), cumulative))
        out.append("fastlb_backend_connection_duration_seconds_sum{%s} %s" % (label, _number(b["duration_sum"])))
        out.append("fastlb_backend_connection_duration_seconds_count{%s} %d" % (label, cumulative))
    return "\n".join(out) + "\n"


def _number(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "NaN"
        return repr(value)
    return str(value)


class AdminServer:
    """Serves the admin endpoint from ``stats()`` in background threads."""

    def __init__(self, address: str, stats: Callable[[], dict[str, Any]],
                 timeout: float = ADMIN_TIMEOUT,
                 max_connections: int = ADMIN_MAX_CONNECTIONS, errors: Optional[InternalErrors] = None,
                 api: Optional["Runtime"] = None, token: bytes = b""):
        host, _, port = address.rpartition(":")
        self.stats = stats
        self.refused = 0              # connections closed at once: max_connections were open
        self.errors = errors or INTERNAL_ERRORS
        # The run-time API (fastlb.api), served under /api/ only with a token.
        self.api = api if token else None
        self.token = token
        slots = threading.BoundedSemaphore(max_connections)
        admin = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "fastlb-admin"
            protocol_version = "HTTP/1.1"

            # Per-request logs stay off, as for the relay.
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.do_GET(head=True)

            def do_POST(self) -> None:
                self._api("POST")

            def do_DELETE(self) -> None:
                self._api("DELETE")

            def _api(self, method: str) -> None:
                status, body = admin.handle_api(method, self.path, self.headers, self.rfile)
                data = (json.dumps(body, indent=1) + "\n").encode()
                self.send_response(status)
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Bearer realm="fastlb"')
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self, head: bool = False) -> None:
                path = self.path.split("?", 1)[0]
                if path.startswith("/api/"):
                    self._api("GET")
                    return
                stats = admin.stats()
                status = 200
                if path in ("/", "/index.html"):
                    body, kind = render_page(stats), "text/html; charset=utf-8"
                elif path == "/stats.json":
                    body, kind = json.dumps(stats, indent=1), "application/json"
                elif path == "/metrics":
                    body, kind = render_metrics(stats), "text/plain; version=0.0.4; charset=utf-8"
                elif path == "/healthz":
                    status = 200 if stats["state"] == "running" else 503
                    body, kind = stats["state"] + "\n", "text/plain; charset=utf-8"
                else:
                    status, body, kind = 404, "not found\n", "text/plain; charset=utf-8"
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if not head:
                    self.wfile.write(data)

        # StreamRequestHandler applies it to every read and write of the connection.
        Handler.timeout = timeout

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def get_request(self) -> Any:
                try:
                    return super().get_request()
                except OSError as exc:
                    # http.server drops the error and polls again; the client
                    # still waiting keeps the listener readable.
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        time.sleep(ACCEPT_PAUSE)
                    raise

            def process_request(self, request: Any, client_address: Any) -> None:
                if not slots.acquire(blocking=False):
                    admin.refused += 1
                    self.shutdown_request(request)
                    return
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    slots.release()
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client that vanished mid-answer is not an error of ours.
                exc = sys.exc_info()[1]
                if exc is not None and not isinstance(exc, (ConnectionError, socket.timeout)):
                    admin.errors.record("the admin endpoint", exc)

        self.httpd = Server((host, int(port)), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fastlb-admin",
                                       daemon=True)

    def handle_api(self, method: str, target: str, headers: Any, body: Any) -> tuple[int, Any]:
        """One API request: ``(status, JSON-able answer)``; see fastlb.api for what each does."""
        if self.api is None:
            return 404, {"error": "the admin API is off (--admin-token-file)"}
        offered = headers.get("Authorization", "")
        if not (offered.startswith("Bearer ")
                and hmac.compare_digest(offered[len("Bearer "):].strip().encode(), self.token)):
            return 401, {"error": "a valid bearer token is required"}
        parts = [unquote(part) for part in target.split("?", 1)[0].split("/")[2:]]
        try:
            payload = self._payload(headers, body) if method == "POST" else None
            if parts == ["backends"] and method == "GET":
                return 200, self.api.backends()
            if parts == ["backends"] and method == "POST":
                return 201, self.api.add(payload)
            if len(parts) == 2 and parts[0] == "backends" and method == "DELETE":
                self.api.remove(parts[1])
                return 202, {"removed": parts[1], "draining": True}
            if len(parts) == 3 and parts[0] == "backends" and method == "POST":
                field = parts[2]
                if field in ("state", "weight") and isinstance(payload, dict) and field in payload:
                    change = self.api.set_state if field == "state" else self.api.set_weight
                    return 200, change(parts[1], payload[field])
                return 400, {"error": "expected a JSON object with a %r" % field}
        except ApiError as exc:
            return exc.status, {"error": str(exc)}
        return 404, {"error": "no such API: %s %s" % (method, target)}

    @staticmethod
    def _payload(headers: Any, body: Any) -> Any:
        try:
            length = int(headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "a Content-Length is required") from None
        if not 0 <= length <= API_MAX_BODY:
            raise ApiError(413, "the body is limited to %d bytes" % API_MAX_BODY)
        try:
            return json.loads(body.read(length) or b"null")
        except ValueError as exc:
            raise ApiError(400, "not JSON: %s" % exc) from None

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

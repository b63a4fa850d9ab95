"""The backend table: state, load figures and counters of every backend, behind one lock.

Who touches it: the accept loop counts connections (``count_accept``), workers
choose backends and report how relays ended (``choose``, ``mark_down``,
``release``), and the health checker applies probe results (``begin_probe``,
``apply_probe``).  All state lives in ``BackendPool`` and is guarded by its one
lock ``_lock``; methods whose name starts with ``_locked`` must be called with
it held.  No method does I/O, so the lock is never held across the network.

Selection itself is ``fastlb.policies``: plain functions over this table's data,
called with the lock held.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from fastlb.policies import Policy
from fastlb.settings import Address

log = logging.getLogger("fastlb")

UNKNOWN, UP, DOWN = "unknown", "up", "down"
# Administrative states, set at run time (fastlb.api): ready takes traffic;
# drain takes no new connections but is still probed; maint is neither
# routed to nor probed (HAProxy's "drain" and "maint").
READY, DRAIN, MAINT = "ready", "drain", "maint"
ADMIN_STATES = (READY, DRAIN, MAINT)

# A probe's outcome: (errors, entries) from a load check, () from any other
# healthy check, None when the backend failed it.
ProbeResult = Optional[tuple[int, ...]]
# A probe round's entry in the table: [rounds asked when it began, applied?].
RoundEntry = list[Any]

# Upper bounds (seconds) of the connection-duration histogram buckets.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0)


class Backend:
    """One backend server and everything fastlb knows about it."""

    __slots__ = (
        "address", "index", "state", "reason", "errors", "entries", "probing",
        "probe_started_routed", "routed", "active", "bytes_up", "bytes_down",
        "responses", "failures", "last_change", "probe_latency", "good_probes",
        "bad_probes", "removed", "durations", "duration_sum", "rr_current", "replays",
        "admin_state", "closed",
    )

    def __init__(self, address: Address, index: int):
        self.address = address
        self.index = index            # command-line order, the last tie-breaker
        self.state = UNKNOWN          # not routable until a probe answers
        self.reason = "not probed yet"
        if address.check.kind == "none":
            self.state, self.reason = UP, "no health check"
        self.errors = 0               # as reported by the last probe
        self.entries = 0              # reported, plus connections routed since that probe began
        self.probing = False
        self.probe_started_routed = 0
        self.routed = 0               # connections routed here, ever
        self.active = 0               # relays in progress
        self.bytes_up = 0
        self.bytes_down = 0
        self.responses = {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0, "other": 0}
        self.failures = 0             # connects that failed and server timeouts
        self.last_change = time.time()
        self.probe_latency: Optional[float] = None
        self.good_probes = 0          # consecutive healthy probes (for --rise)
        self.bad_probes = 0           # consecutive failed probes (for --fall)
        self.removed = False          # dropped by a reload: no new traffic, relays drain
        self.admin_state = READY      # set at run time (admin API): ready, drain or maint
        self.closed = False           # no new connections: removed, drained or in maintenance
        self.durations = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.rr_current = 0           # smooth weighted round robin's running weight
        self.replays = 0              # connections it closed unanswered, replayed elsewhere

    @property
    def name(self) -> str:
        return self.address.name

    @property
    def weight(self) -> int:
        return self.address.weight

    @property
    def backup(self) -> bool:
        return self.address.backup

    @property
    def reports_load(self) -> bool:
        """Does the backend's health answer carry its load (``--check load``)?"""
        return self.address.check.kind == "load"

    def load(self) -> tuple[float, int, int]:
        """The selection key: entries per unit of weight, then errors, then command-line order."""
        return (self.entries / self.address.weight, self.errors, self.index)

    def __repr__(self) -> str:
        return "<Backend %s %s entries=%d errors=%d>" % (self.name, self.state, self.entries, self.errors)


def choose_backend(backends: Iterable[Backend], exclude: Sequence[Backend] = ()) -> Optional[Backend]:
    """SPEC §3's rule, the ``least-loaded`` policy: fewest entries per unit of weight, then errors, then order."""
    best: Optional[Backend] = _LEAST_LOADED(backends, exclude)
    return best


_LEAST_LOADED = Policy("least-loaded").choose


def status_class(status: int) -> str:
    return "%dxx" % (status // 100) if 100 <= status < 600 else "other"


class BackendPool:
    """The shared backend table and request counter (see the module comment)."""

    def __init__(self, addresses: Sequence[Address], requests_per_round: int, rise: int = 1,
                 fall: int = 1, balance: str = "least-loaded"):
        self._lock = threading.Lock()
        self.backends = [Backend(address, i) for i, address in enumerate(addresses)]
        self.policy = Policy(balance)
        self._requests_per_round = requests_per_round
        # Count-triggered rounds refresh reported load: none without a load backend.
        self._counting = any(b.reports_load for b in self.backends)
        self.rise, self.fall = rise, fall
        self._accepted_since_round = 0
        self.accepted = 0
        self.no_backend = 0           # connections answered with the 500
        self.queue_full = 0           # connections answered with the 503
        self.bad_proxy_header = 0     # --accept-proxy clients closed for a missing or bad header
        # A connection accepted after a count-triggered round was asked for is
        # routed once the first round begun after that trigger is applied (see
        # ``round_applied``).  Rounds still to be applied are kept as
        # [rounds asked when it began, applied?], oldest first; every trigger
        # up to ``_rounds_applied`` has had its round applied.
        self._rounds_asked = 0
        self._rounds: list[RoundEntry] = []
        self._rounds_applied = 0
        self.round_listeners: list[Callable[[], None]] = []   # called after each round is applied
        self._closed_triggers: set[int] = set()   # rounds whose triggering connection closed

    # -- accept loop -------------------------------------------------------

    def count_accept(self) -> tuple[bool, int]:
        """Count one accepted connection: (is it the R-th since the last round?, its ticket).

        The ticket is the number of count-triggered rounds asked for before
        this connection; it is routed once that round has been applied
        (``round_applied``), so a probe triggered by one request has finished
        before the next is routed (SPEC §2).
        """
        with self._lock:
            self.accepted += 1
            ticket = self._rounds_asked
            if not self._counting:
                return False, ticket
            self._accepted_since_round += 1
            if self._accepted_since_round >= self._requests_per_round:
                self._accepted_since_round = 0
                self._rounds_asked += 1
                return True, ticket
            return False, ticket

    # -- workers -------------------------------------------------------------

    def trigger_closed(self, round_number: int) -> None:
        """The connection that asked for round ``round_number`` has closed."""
        with self._lock:
            self._closed_triggers.add(round_number)
            if len(self._closed_triggers) > 4096:
                self._closed_triggers = {r for r in self._closed_triggers if r > self._rounds_applied}

    def round_applied(self, ticket: int) -> bool:
        """May a connection holding ``ticket`` be routed now?  (Never blocks.)

        Yes once the first round begun after trigger ``ticket`` has been
        applied.  Yes also while the connection that triggered it is still
        open: then this one runs alongside it and cannot be the same client's
        next request, which is what the wait is for (SPEC §2); so concurrent
        traffic never waits for probes.
        """
        with self._lock:
            if ticket <= self._rounds_applied or ticket not in self._closed_triggers:
                return True
            for round_asked, applied in self._rounds:
                if round_asked >= ticket:
                    return bool(applied)
            return False

    def choose(self, exclude: Sequence[Backend] = (), client: Optional[str] = None) -> Optional[Backend]:
        """Choose a backend for a new connection and count it there; None if none is usable.

        ``client`` is the client's address, for the ``source`` policy.
        """
        with self._lock:
            backend: Optional[Backend] = self.policy.choose(self.backends, exclude, client)
            if backend is None:
                self.no_backend += 1
                return None
            backend.entries += 1
            backend.routed += 1
            backend.active += 1
            return backend

    def connect_failed(self, backend: Backend, reason: str) -> None:
        """A connection chosen by ``choose`` never reached the backend: undo it and mark it down."""
        with self._lock:
            backend.active -= 1
            backend.routed -= 1
            # A probe may have replaced the estimate since this connection was counted.
            backend.entries = max(0, backend.entries - 1)
            backend.failures += 1
            backend.good_probes = 0
            self._locked_set_state(backend, DOWN, reason)
            self._locked_forget_if_drained(backend)

    def replayed(self, backend: Backend) -> None:
        """A connection chosen by ``choose`` was closed by the backend before any answer and goes elsewhere.

        Released and counted, with no verdict: a dead backend refuses the
        next connect and is marked down then.
        """
        with self._lock:
            backend.active -= 1
            backend.entries = max(0, backend.entries - 1)
            backend.replays += 1
            self._locked_forget_if_drained(backend)

    def mark_down(self, backend: Backend, reason: str) -> None:
        with self._lock:
            backend.failures += 1
            backend.good_probes = 0
            self._locked_set_state(backend, DOWN, reason)

    def release(self, backend: Backend, bytes_up: int, bytes_down: int, status: int,
                duration: float = 0.0, timed_out: bool = False) -> None:
        """Record a finished relay; ``timed_out``: the backend never answered (counted, no state change)."""
        bucket = bisect.bisect_left(DURATION_BUCKETS, duration)
        with self._lock:
            backend.active -= 1
            if timed_out:
                backend.failures += 1
            backend.bytes_up += bytes_up
            backend.bytes_down += bytes_down
            if bytes_down:
                backend.responses[status_class(status)] += 1
            backend.durations[bucket] += 1
            backend.duration_sum += duration
            self._locked_forget_if_drained(backend)

    def _locked_forget_if_drained(self, backend: Backend) -> None:
        """A backend removed by a reload leaves the table with its last connection."""
        if backend.removed and backend.active == 0 and backend in self.backends:
            # A new list, not an in-place removal: other threads may be iterating.
            self.backends = [b for b in self.backends if b is not backend]
            log.info("backend %s removed after draining its relays", backend.name)

    def count_queue_full(self) -> None:
        with self._lock:
            self.queue_full += 1

    def count_bad_proxy_header(self) -> None:
        with self._lock:
            self.bad_proxy_header += 1

    # -- health checker ------------------------------------------------------

    def begin_round(self) -> RoundEntry:
        """Record the start of a probe round; hand the result to ``finish_round``."""
        with self._lock:
            entry = [self._rounds_asked, False]
            # A round begun with no trigger since the previous one is nobody's first.
            if not self._rounds or self._rounds[-1][0] < entry[0]:
                self._rounds.append(entry)
            return entry

    def finish_round(self, entry: RoundEntry) -> None:
        """Every probe claimed by the round ``entry`` (from ``begin_round``) has been applied."""
        with self._lock:
            entry[1] = True
            while self._rounds and self._rounds[0][1]:
                self._rounds_applied = self._rounds.pop(0)[0]
        # Outside the lock: listeners (the engines) only wake their loops.
        for listener in self.round_listeners:
            listener()

    def begin_probe(self, backend: Backend) -> bool:
        """Claim ``backend`` for a probe; False if its previous probe is still running."""
        with self._lock:
            if backend.probing:
                return False
            backend.probing = True
            backend.probe_started_routed = backend.routed
            return True

    def end_probe(self, backend: Backend) -> None:
        """The probe claimed by ``begin_probe`` could not run (a local failure): no verdict."""
        with self._lock:
            backend.probing = False

    def apply_probe(self, backend: Backend, result: ProbeResult, reason: str,
                    latency: Optional[float]) -> None:
        """Apply one probe's outcome: ``(errors, entries)`` or ``()`` when healthy, else None and a reason."""
        with self._lock:
            self._locked_apply_probe(backend, result, reason, latency)

    def _locked_apply_probe(self, backend: Backend, result: ProbeResult, reason: str,
                            latency: Optional[float]) -> None:
        backend.probing = False
        backend.probe_latency = latency
        if result is None:
            backend.good_probes = 0
            backend.bad_probes += 1
            # An unprobed backend goes down on its first failure: it was never usable.
            if backend.bad_probes >= self.fall or backend.state == UNKNOWN:
                self._locked_set_state(backend, DOWN, reason)
            return
        if result:
            errors, entries = result
            # Connections routed after the probe began may not be in the
            # backend's own count yet; keep them in the estimate.
            backend.errors = errors
            backend.entries = entries + max(0, backend.routed - backend.probe_started_routed)
            reason = "healthy (errors=%d entries=%d)" % (errors, entries)
        else:
            # A backend that reports no load: its entries are what fastlb
            # itself has open there.
            backend.entries = backend.active
        backend.bad_probes = 0
        backend.good_probes += 1
        # At start-up (state unknown) one good probe is enough, as in HAProxy.
        if backend.good_probes >= self.rise or backend.state == UNKNOWN:
            self._locked_set_state(backend, UP, reason)

    def set_admin_state(self, name: str, state: str) -> Backend:
        """Set a backend's administrative state (ready, drain or maint); KeyError if there is none."""
        with self._lock:
            backend = self._locked_find(name)
            previous, backend.admin_state = backend.admin_state, state
            backend.closed = backend.removed or state != READY
            if previous == MAINT and state != MAINT:
                # Not probed while in maintenance: what it was is stale.
                backend.state, backend.reason = UNKNOWN, "out of maintenance, not probed yet"
                backend.last_change = time.time()
            return backend

    def reset_admin_states(self) -> None:
        """A reload ends every run-time change: all backends ready again."""
        with self._lock:
            for backend in self.backends:
                if backend.admin_state != READY:
                    if backend.admin_state == MAINT:
                        backend.state, backend.reason = UNKNOWN, "out of maintenance, not probed yet"
                    backend.admin_state = READY
                    backend.closed = backend.removed

    def find(self, name: str) -> Backend:
        with self._lock:
            return self._locked_find(name)

    def _locked_find(self, name: str) -> Backend:
        for backend in self.backends:
            if backend.name == name and not backend.removed:
                return backend
        raise KeyError(name)

    def retry_unchecked(self, interval: float) -> None:
        """Backends without health checks come back up ``interval`` after a failure took them down."""
        now = time.time()
        with self._lock:
            for backend in self.backends:
                if (backend.address.check.kind == "none" and backend.state == DOWN
                        and now - backend.last_change >= interval):
                    self._locked_set_state(backend, UP, "no health check: trying it again after %gs"
                                           % interval)

    def update(self, addresses: Sequence[Address], requests_per_round: int, rise: int,
               fall: int,
               first_probes: Optional[dict[str, tuple[ProbeResult, str, Optional[float]]]] = None,
               balance: Optional[str] = None) -> list[Backend]:
        """Replace the backend list after a reload; return the backends that are new.

        Backends that stay (same name, counted by occurrence for duplicates) keep
        their state and counters.  New ones take the outcome of the probe made
        before the swap (``first_probes``: name -> (result, reason, latency)), so
        they get traffic only when healthy and the swap never leaves a moment
        with nothing routable.  Removed ones take no new traffic and leave the
        table once their relays have finished.
        """
        with self._lock:
            self._requests_per_round = requests_per_round
            self.rise, self.fall = rise, fall
            if balance is not None and balance != self.policy.name:
                self.policy = Policy(balance)
            current: dict[tuple[str, int], Backend] = {}
            seen: dict[str, int] = {}
            for backend in self.backends:
                if not backend.removed:
                    n = seen[backend.name] = seen.get(backend.name, 0) + 1
                    current[(backend.name, n)] = backend
            kept: list[Backend] = []
            added: list[Backend] = []
            seen = {}
            for address in addresses:
                n = seen[address.name] = seen.get(address.name, 0) + 1
                staying = current.pop((address.name, n), None)
                if staying is None:
                    backend = Backend(address, 0)
                    added.append(backend)
                else:
                    backend = staying
                    backend.address = address  # the weight may have changed
                kept.append(backend)
            for backend in current.values():
                backend.removed = backend.closed = True
                log.info("backend %s removed; %d relay(s) draining", backend.name,
                         backend.active)
            draining = [b for b in current.values() if b.active]
            for i, backend in enumerate(kept):
                backend.index = i
            for i, backend in enumerate(draining):
                backend.index = len(kept) + i
            self.backends = kept + draining
            self._counting = any(b.reports_load for b in kept)
            for backend in added:
                log.info("backend %s added", backend.name)
                if first_probes and backend.name in first_probes:
                    self._locked_apply_probe(backend, *first_probes[backend.name])
            return added

    def _locked_set_state(self, backend: Backend, state: str, reason: str) -> None:
        if backend.state == state:
            if state == DOWN:
                backend.reason = reason
            return
        previous, backend.state, backend.reason = backend.state, state, reason
        backend.last_change = time.time()
        if state == UP:
            log.info("backend %s is up (was %s): %s", backend.name, previous, reason)
        else:
            log.warning("backend %s is down (was %s): %s", backend.name, previous, reason)

    # -- observers -------------------------------------------------------------

    def any_up(self) -> bool:
        """Is some backend routable now?"""
        with self._lock:
            return any(b.state == UP and not b.closed for b in self.backends)

    def snapshot(self) -> list[dict[str, Any]]:
        """A consistent copy of the table, for display."""
        with self._lock:
            return [
                {
                    "backend": b.name, "state": b.state, "reason": b.reason,
                    "errors": b.errors, "entries": b.entries, "routed": b.routed,
                    "active": b.active, "bytes_up": b.bytes_up, "bytes_down": b.bytes_down,
                    "responses": dict(b.responses), "failures": b.failures, "replays": b.replays,
                    "last_change": b.last_change, "probe_latency": b.probe_latency,
                    "weight": b.address.weight, "removed": b.removed, "backup": b.backup,
                    "admin_state": b.admin_state,
                    "check": b.address.check.kind,
                    "durations": list(b.durations), "duration_sum": b.duration_sum,
                }
                for b in self.backends
            ]

"""Health checks: probe rounds run by one health-check thread, every probe in parallel.

Who runs where: the health-check thread (``HealthChecker.run``) owns a selector
and every probe socket.  It starts a round at start-up, whenever the accept
loop calls ``trigger`` (the R-th accepted connection) and every ``interval``
seconds.  The count-triggered rounds exist to refresh the load that backends
report, so they probe only ``--check load`` backends; timed rounds probe every
backend but those with ``--check none``, which instead come back up one
``interval`` after a failed connect took them down.  A round starts one
non-blocking ``fastlb.checks.Probe`` per backend; all of them
progress together in the thread's event loop, each result is applied to the
pool the moment it is complete, and each probe is cut at its own deadline, so
one hung backend delays nobody.  A backend whose previous probe is still
running is skipped (``BackendPool.begin_probe``).  No lock is held while
probing: the pool's lock is taken only to apply results.

A round is over once its probes are applied; the connections parked for it
(SPEC §2) are then routed.  A probe holds its round for at most
``round_wait`` (the engines' ``ROUTE_WAIT``, after which they route a parked
connection anyway): a probe that hangs until ``--probe-timeout`` would
otherwise hold every round begun meanwhile, and each of them would park the
next connections for ``ROUTE_WAIT`` in turn, so one hung backend cut
throughput 25-fold.  Past the wait the probe goes on and its verdict is applied
when it comes; rounds begun meanwhile do not wait for it.

One thread and no thread per probe: under load the SPEC's count-triggered
rounds come every few milliseconds, and creating threads for them cost more
than the probes themselves.
"""

from __future__ import annotations

import logging
import selectors
import threading
import time
from typing import Any, Optional

from fastlb import bridge
from fastlb.checks import Probe, probe, probe_many
from fastlb.failsafe import INTERNAL_ERRORS, InternalErrors
from fastlb.pool import MAINT, Backend, BackendPool
from fastlb.waker import Waker

__all__ = ["HealthChecker", "probe", "probe_many"]

log = logging.getLogger("fastlb")

# How long the start-up round still waits for the other backends once one is up.
STARTUP_GRACE = 0.5
# After an unexpected error, the health thread pauses this long before going on.
ERROR_PAUSE = 0.1


class HealthChecker:
    """Runs probe rounds over a pool (see the module comment)."""

    def __init__(self, pool: BackendPool, probe_timeout: float, interval: float,
                 errors: Optional[InternalErrors] = None, round_wait: float = bridge.ROUTE_WAIT):
        self.pool = pool
        self.errors = errors or INTERNAL_ERRORS
        self.probe_timeout = probe_timeout
        self.interval = interval
        self.round_wait = round_wait
        self._selector = selectors.DefaultSelector()
        # Under load the accept loop triggers a round every few connections:
        # the waker writes one byte per wait, not one per trigger.
        self._waker = Waker()
        self._selector.register(self._waker, selectors.EVENT_READ, None)
        self._probes: dict[Backend, Probe] = {}   # backend -> its running Probe
        # Running probes past round_wait: they hold no round any longer.
        self._overdue: set[Probe] = set()
        # Rounds that found a backend being probed: they wait for a probe
        # started once the running one ends (``_probe``).
        self._queued: dict[Backend, list[list[Any]]] = {}
        self._triggered = False
        self._stopped = False
        self._thread: Optional[threading.Thread] = None

    # -- any thread ------------------------------------------------------------------

    def trigger(self) -> None:
        """Ask for a round now (called by the accept loop on the R-th connection)."""
        self._triggered = True
        self._waker.wake()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="fastlb-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End ``run``, which then closes the checker; one that never started is closed here."""
        self._stopped = True
        if self._thread is None:
            self.close()
        else:
            self._waker.wake()   # after close(), a no-op

    def close(self) -> None:
        """Close the probes still running, the selector and the waker (``run`` does as it ends).

        Only from the thread that owns the selector: the health thread, or the
        caller of ``first_round`` when no thread was started.
        """
        for one in list(self._probes.values()):
            self._selector.unregister(one.sock)
            one.close()
        self._probes.clear()
        self._selector.close()
        self._waker.close()

    # -- the health-check thread (or the caller of first_round, before it starts) -----

    def start_round(self, load_only: bool = False) -> None:
        """Probe every backend (with ``load_only``, those that report load) in one new round.

        Once every probe of the round is applied the pool is told, so the
        connections waiting for fresh figures are routed (``BackendPool.round_applied``).
        """
        # [pool's round entry, probes still to be applied].  The start itself
        # counts as one until every probe has started: a probe that ends
        # inside its constructor (a refused connect) must not finish the round
        # while others are still to start.
        entry: list[Any] = [self.pool.begin_round(), 1]
        for backend in self.pool.backends:
            kind = backend.address.check.kind
            if kind == "none" or load_only and kind != "load" or backend.admin_state == MAINT:
                continue
            entry[1] += 1
            self._probe(backend, [entry])
        self._probe_ended(entry)

    def _probe(self, backend: Backend, rounds: list[list[Any]]) -> None:
        """Start a probe of ``backend`` for ``rounds`` (each already counts it), or queue them behind its running one.

        SPEC §2: a round triggered by a connection is over, with probes
        started after the trigger, before the next client is routed; and a
        backend is never probed twice at once.  So a round that finds the
        backend still being probed waits for that probe and then for one
        more, started when it ends (one follow-up serves every round queued),
        unless the running probe is past ``round_wait`` (module comment).
        """
        if not self.pool.begin_probe(backend):
            running = self._probes.get(backend)
            if running in self._overdue:
                # It has run longer than traffic waits for a round: these do not wait for it.
                for entry in rounds:
                    self._probe_ended(entry)
                return
            self._queued.setdefault(backend, []).extend(rounds)
            return
        try:
            one = Probe(backend.address, self.probe_timeout, backend, rounds)
            if not one.done:
                try:
                    self._selector.register(one.sock, one.events, one)
                except BaseException:
                    one.close()
                    raise
        except Exception as exc:
            # A local failure (out of descriptors): not the backend's fault,
            # so no verdict; it is probed again next round.
            self.pool.end_probe(backend)
            self.errors.record("starting a probe of %s" % backend.name, exc)
            for entry in rounds:
                self._probe_ended(entry)
            return
        if one.done:
            self._apply(one)
        else:
            self._probes[backend] = one

    def first_round(self) -> int:
        """Probe every backend; return once all have answered, or ``STARTUP_GRACE`` after one is up.

        So a hung backend delays the first traffic by the grace rather than by
        the probe timeout (SPEC §2: a hung backend never blocks traffic), while
        healthy backends that answer within the grace all take part in the
        first choices.  Probes still running go on in the health thread
        (``run``).  Returns how many are still running.
        """
        self.start_round()
        grace_end = float("inf")
        while self._probes and time.monotonic() < grace_end:
            self._step(grace_end)
            if grace_end == float("inf") and self.pool.any_up():
                grace_end = time.monotonic() + STARTUP_GRACE
        return len(self._probes)

    def run(self) -> None:
        next_timed = time.monotonic() + self.interval
        while not self._stopped:
            try:
                self._step(next_timed)
                if self._stopped:
                    break
                if self._triggered:
                    self._triggered = False
                    self.start_round(load_only=True)
                if time.monotonic() >= next_timed:
                    next_timed = time.monotonic() + self.interval
                    self.start_round()
                    self.pool.retry_unchecked(self.interval)
            except Exception as exc:
                self.errors.record("the health checker", exc)
                # Whatever failed may fail again at once: not a busy loop.
                time.sleep(ERROR_PAUSE)
        self.close()

    def _step(self, until: float = float("inf")) -> None:
        """Wait for socket events or the next deadline, and advance the probes."""
        deadline = min([until] + [one.deadline for one in self._probes.values()]
                       + [one.started + self.round_wait for one in self._probes.values()
                          if one not in self._overdue])
        timeout = max(0.0, deadline - time.monotonic())
        for key, _ in self._selector.select(None if timeout == float("inf") else timeout):
            one = key.data
            if one is None:
                # run() reads the flags once this step returns.
                self._waker.drain()
                continue
            one.advance()
            if one.done:
                self._apply(one)
            else:
                self._selector.modify(one.sock, one.events, one)
        now = time.monotonic()
        for one in [p for p in self._probes.values() if p.deadline <= now]:
            one.expire()
            self._apply(one)
        for one in [p for p in self._probes.values()
                    if p.started + self.round_wait <= now and p not in self._overdue]:
            self._release(one)

    def _release(self, one: Probe) -> None:
        """``one`` has run past ``round_wait``: end the rounds waiting for it, or queued behind it."""
        self._overdue.add(one)
        rounds, one.rounds = one.rounds, []
        for entry in rounds + self._queued.pop(one.backend, []):
            self._probe_ended(entry)

    def _apply(self, one: Probe) -> None:
        if self._probes.get(one.backend) is one:
            del self._probes[one.backend]
            self._overdue.discard(one)
            self._selector.unregister(one.sock)
        one.close()
        self.pool.apply_probe(one.backend, one.result, one.reason, one.latency)
        queued = self._queued.pop(one.backend, None)
        if queued:
            self._probe(one.backend, queued)
        for entry in one.rounds:
            self._probe_ended(entry)

    def _probe_ended(self, entry: list[Any]) -> None:
        entry[1] -= 1
        if entry[1] == 0:
            self.pool.finish_round(entry[0])

"""Changes at run time: add, remove, drain and weigh backends without a reload.

One mechanism for both ways in: the admin endpoint's HTTP API (``/api/...``,
on when ``--admin-token-file`` names a secret; ``fastlb.admin`` routes to
``Runtime``) and the embeddable Python API (``fastlb.serve``).  Every change is
logged.  Changes last until the next reload (SIGHUP), which goes back to the
configuration; a DNS refresh keeps them.

The backend list a balancer serves is always ``desired()``: the configured
backends plus the ones added here, expanded through DNS, less the ones removed
here, with the weights set here.  A change recomputes it and applies it as a
reload does (new backends probed first, vanished ones drained).  States (drain,
maint, ready) are set on the backend objects themselves.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING, Any, Optional

from fastlb.configfile import backend_table
from fastlb.pool import ADMIN_STATES
from fastlb.settings import Address, SettingError, literal

if TYPE_CHECKING:
    from fastlb.balancer import Balancer

log = logging.getLogger("fastlb")


class ApiError(Exception):
    """A request the API refuses: ``status`` is the HTTP status, the message says why in one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Runtime:
    """The run-time changes to one balancer's backends (see the module comment)."""

    def __init__(self, balancer: "Balancer"):
        self.balancer = balancer
        self.lock = threading.Lock()          # one change at a time, and never beside a reload
        self.added: list[Address] = []
        self.removed: set[str] = set()
        self.weights: dict[str, int] = {}

    def reset(self) -> None:
        """A reload: back to the configuration."""
        self.added, self.removed, self.weights = [], set(), {}

    def desired(self, specs: list[Address]) -> list[Address]:
        """The backends to serve: configured and added specs, expanded, less removed, reweighed."""
        found = self.balancer.discovery.expand(list(specs) + self.added)
        return [dataclasses.replace(a, weight=self.weights[a.name]) if a.name in self.weights else a
                for a in found if a.name not in self.removed and a.origin not in self.removed]

    # -- the changes ------------------------------------------------------------------

    def backends(self) -> list[dict[str, Any]]:
        return self.balancer.pool.snapshot()

    def add(self, settings: Any) -> list[dict[str, Any]]:
        """Add a backend from ``{"address": "HOST:PORT", "weight": N, "backup": bool, "check": ..., ...}``."""
        if not isinstance(settings, dict):
            raise ApiError(400, "expected a JSON object with an 'address'")
        try:
            spec = literal(backend_table(settings).with_settings(vars(self.balancer.config)))
        except SettingError as exc:
            raise ApiError(400, str(exc)) from None
        with self.lock:
            current = {b["backend"] for b in self.backends() if not b["removed"]}
            if spec.name in current or any(a.name == spec.name for a in self.added):
                raise ApiError(409, "backend %s exists already" % spec.name)
            self.removed.discard(spec.name)
            self.added.append(spec)
            self.balancer.apply_runtime()
        log.info("api: backend %s added", spec.name)
        return [b for b in self.backends() if b["backend"] == spec.name
                or b["backend"].startswith(spec.name + "@")]

    def remove(self, name: str) -> None:
        """Drain then remove: no new connections, gone once its relays are done."""
        with self.lock:
            self._known(name)
            self.added = [a for a in self.added if a.name != name]
            self.removed.add(name)
            self.balancer.apply_runtime()
        log.info("api: backend %s removed; its relays drain", name)

    def set_state(self, name: str, state: Any) -> Optional[dict[str, Any]]:
        if state not in ADMIN_STATES:
            raise ApiError(400, "state must be one of %s (got %r)" % (", ".join(ADMIN_STATES), state))
        with self.lock:
            try:
                backend = self.balancer.pool.set_admin_state(name, state)
            except KeyError:
                raise ApiError(404, "no backend %s" % name) from None
        log.info("api: backend %s set to %s", name, state)
        if state != "maint" and backend.state == "unknown":
            # Out of maintenance: probed now rather than at the next round.
            self.balancer.probe_now([backend])
        return self._row(name)

    def set_weight(self, name: str, weight: Any) -> Optional[dict[str, Any]]:
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 1000:
            raise ApiError(400, "weight must be a whole number from 1 to 1000 (got %r)" % (weight,))
        with self.lock:
            self._known(name)
            self.weights[name] = weight
            self.balancer.apply_runtime()
        log.info("api: backend %s weight set to %d", name, weight)
        return self._row(name)

    def _known(self, name: str) -> None:
        """A backend of that name, or one found from a name or srv: of that name, exists."""
        for backend in self.balancer.pool.backends:
            if not backend.removed and name in (backend.name, backend.address.origin):
                return
        raise ApiError(404, "no backend %s" % name)

    def _row(self, name: str) -> Optional[dict[str, Any]]:
        return next((b for b in self.backends() if b["backend"] == name and not b["removed"]), None)

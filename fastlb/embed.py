"""The embeddable Python API: a balancer inside a Python program or a pytest fixture.

    import fastlb

    with fastlb.serve(["127.0.0.1:8001", "127.0.0.1:8002"], check="http",
                      check_path="/health") as lb:
        requests.get("http://127.0.0.1:%d/" % lb.port)
        lb.add("127.0.0.1:8003", weight=2)
        lb.drain("127.0.0.1:8001")
        print(lb.stats()["backends"])

The balancer runs in background threads of this process (the accept loop
included: nothing here touches signals), with the hot path of ``fastlb.bridge``;
leaving the ``with`` block (or ``close()``) stops accepting, lets the
connections in flight finish (up to ``drain_timeout``) and joins the threads.
Every setting of the command line is a keyword (``threads=2``,
``probe_timeout=1.0``, ``accept_proxy=True`` ...), validated as the command line
validates it; run-time changes go through the same ``fastlb.api.Runtime`` as
the admin API.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Optional, Union

from fastlb.api import Runtime
from fastlb.balancer import Balancer
from fastlb.configfile import backend_table, complete
from fastlb.settings import SETTINGS, Address, SettingError, backend

__all__ = ["serve", "Served"]

# How long ``Served.close`` waits for the threads beyond the drain.
JOIN_MARGIN = 10.0


def _setting_values(settings: dict[str, Any]) -> dict[str, Any]:
    by_name = {setting.name: setting for setting in SETTINGS}
    values = {setting.name: setting.default for setting in SETTINGS}
    for name, value in settings.items():
        setting = by_name.get(name)
        if setting is None:
            raise TypeError("serve() got an unknown setting %r" % name)
        if setting.flag:
            if not isinstance(value, bool):
                raise SettingError("%s: expected True or False (got %r)" % (name, value))
            values[name] = value
        else:
            values[name] = setting.parse(str(value))
    return values


def _backend(item: Union[str, int, dict[str, Any]]) -> Address:
    return backend_table(dict(item)) if isinstance(item, dict) else backend(str(item))


class Served:
    """A running balancer: its ``port``, run-time changes, ``stats()``, ``close()``."""

    def __init__(self, balancer: Balancer):
        self.balancer = balancer
        self.api: Runtime = balancer.runtime
        try:
            balancer.bind()
        except BaseException:
            balancer.close()
            raise
        self.port: int = balancer.port
        self._thread = threading.Thread(target=balancer.run, name="fastlb-serve", daemon=True)
        self._thread.start()
        self._ready()

    def _ready(self) -> None:
        # Accepting once the first probe round is over (Balancer.run's order).
        self.balancer.health_ready.wait()

    # -- run-time changes (fastlb.api) ----------------------------------------------

    def add(self, address: Union[str, int], **settings: Any) -> list[dict[str, Any]]:
        """Add a backend (``"HOST:PORT"``, with ``weight``, ``backup``, ``check`` ... as in the config file)."""
        return self.api.add(dict(settings, address=str(address)))

    def remove(self, name: str) -> None:
        """Drain then remove a backend: no new connections, gone once its relays are done."""
        self.api.remove(name)

    def drain(self, name: str) -> Optional[dict[str, Any]]:
        """No new connections for this backend (still probed); ``ready`` undoes it."""
        return self.api.set_state(name, "drain")

    def ready(self, name: str) -> Optional[dict[str, Any]]:
        return self.api.set_state(name, "ready")

    def maint(self, name: str) -> Optional[dict[str, Any]]:
        """Neither routed to nor probed, until ``ready``."""
        return self.api.set_state(name, "maint")

    def set_weight(self, name: str, weight: int) -> Optional[dict[str, Any]]:
        return self.api.set_weight(name, weight)

    def stats(self) -> dict[str, Any]:
        """What the admin endpoint's /stats.json shows."""
        return self.balancer.stats()

    # -- life --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting, let the connections in flight finish, join the threads, close."""
        self.balancer.stop()
        self._thread.join(self.balancer.config.drain_timeout + JOIN_MARGIN)
        # Only once run() has returned: its accept loop still polls the waker.
        if not self._thread.is_alive():
            self.balancer.close()

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def serve(backends: Iterable[Union[str, int, dict[str, Any]]], port: int = 0, bind: str = "127.0.0.1",
          **settings: Any) -> Served:
    """Start a balancer in this process on ``bind``:``port`` (0: a free port, see ``.port``).

    ``backends`` are what the command line takes (``"HOST:PORT"``, a port,
    ``"srv:NAME"``) or config-file tables (``{"address": ..., "weight": 2}``).
    Raises SettingError for a bad setting and ListenError when the port is taken.
    """
    values = _setting_values(dict(settings, bind=bind))
    values["port"] = port
    values["backends"] = [_backend(item) for item in backends]
    return Served(Balancer(complete(values)))

"""The configuration file (TOML): the listen address, the backends and every setting.

Keys are the long option names without their dashes (``server-timeout``;
``server_timeout`` works too), plus ``listen`` (``PORT`` or ``ADDR:PORT``) and
``backends`` (a list of ``"HOST:PORT"`` strings or ``{address = "HOST:PORT",
weight = N}`` tables).  Values go through the same validators as the command
line; every error names the file, the line and the key.
"""

from __future__ import annotations

import re
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on old Pythons
    import tomli as tomllib

from fastlb.settings import SETTINGS, Address, SettingError, backend, port


def _line_of(text: str, key: str) -> int:
    """The line where ``key`` is assigned, for error messages (0 when not found)."""
    match = re.search(r"^[ \t]*[\"']?%s[\"']?[ \t]*=" % re.escape(key), text, re.M)
    return text.count("\n", 0, match.start()) + 1 if match else 0


def load(path: str) -> dict[str, Any]:
    """Read a config file into ``{setting name: value}``, plus ``port``, ``bind``, ``backends``."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise SettingError("cannot read config file %s: %s" % (path, exc.strerror)) from None
    text = raw.decode("utf-8", "replace")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingError("%s: %s" % (path, exc)) from None

    by_key = {}
    for setting in SETTINGS:
        long_flag = setting.flags[-1].lstrip("-")
        by_key[long_flag] = by_key[long_flag.replace("-", "_")] = setting

    values: dict[str, Any] = {}
    for key, value in document.items():
        where = "%s:%d: key %r" % (path, _line_of(text, key), key)
        try:
            if key == "listen":
                values.update(_listen(value))
            elif key == "backends":
                values["backends"] = _backends(value)
            elif key in by_key:
                if isinstance(value, (dict, list, bool)):
                    raise SettingError("expected a number or a string")
                setting = by_key[key]
                values[setting.name] = setting.parse(str(value))
            else:
                raise SettingError("unknown key (known: listen, backends, %s)"
                                   % ", ".join(s.flags[-1].lstrip("-") for s in SETTINGS))
        except SettingError as exc:
            raise SettingError("%s: %s" % (where, exc)) from None
    return values


def _listen(value: Any) -> dict[str, Any]:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SettingError("expected PORT or \"ADDR:PORT\"")
    host, sep, port_text = str(value).rpartition(":")
    result: dict[str, Any] = {"port": port(port_text)}
    if sep:
        result["bind"] = host.strip("[]") or "0.0.0.0"
    return result


def _backends(value: Any) -> list[Address]:
    if not isinstance(value, list) or not value:
        raise SettingError("expected a non-empty list of \"HOST:PORT\" or {address, weight}")
    addresses = []
    for item in value:
        if isinstance(item, (str, int)) and not isinstance(item, bool):
            addresses.append(backend(str(item)))
        elif isinstance(item, dict):
            unknown = set(item) - {"address", "weight"}
            if unknown or "address" not in item:
                raise SettingError("a backend table takes 'address' and an optional 'weight'")
            weight = item.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 1000:
                raise SettingError("weight must be a whole number from 1 to 1000 (got %r)" % (weight,))
            address = backend(str(item["address"]))
            addresses.append(Address(address.host, address.port, weight=weight))
        else:
            raise SettingError("a backend is \"HOST:PORT\" or {address = \"HOST:PORT\", weight = N}")
    return addresses

"""The configuration file (TOML): the listen address, the backends and every setting.

Keys are the long option names without their dashes (``server-timeout``;
``server_timeout`` works too), plus ``listen`` (``PORT`` or ``ADDR:PORT``) and
``backends`` (a list of ``"HOST:PORT"`` strings or ``{address = "HOST:PORT",
weight = N, backup = true, check = "http", ...}`` tables, which may set every
per-backend setting: the check options and ``send-proxy``).  Values go through the same validators as the command
line; every error names the file, the line and the key.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on old Pythons
    import tomli as tomllib

from fastlb.discovery import Discovery
from fastlb.settings import (SETTINGS, Address, Config, Setting, SettingError, backend, default_balance,
                             literal, make_check, parse_resolvers, port)


def _line_of(text: str, key: str) -> int:
    """The line where ``key`` is assigned, for error messages (0 when not found)."""
    match = re.search(r"^[ \t]*[\"']?%s[\"']?[ \t]*=" % re.escape(key), text, re.M)
    return text.count("\n", 0, match.start()) + 1 if match else 0


def location(path: str, key: str) -> str:
    """Where ``key`` is set in the config file ``path``, as errors name it: ``path:LINE: key 'KEY'``."""
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    return _where(path, text, key)


def _where(path: str, text: str, key: str) -> str:
    return "%s:%d: key %r" % (path, _line_of(text, key), key)


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
        where = _where(path, text, key)
        try:
            if key == "listen":
                values.update(_listen(value))
            elif key == "backends":
                values["backends"] = _backends(value)
            elif key in by_key:
                setting = by_key[key]
                values[setting.name] = _setting_value(setting, value)
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


def _setting_value(setting: Setting, value: Any) -> Any:
    """A TOML value through the setting's validator: on/off switches take true or false."""
    if setting.flag:
        if not isinstance(value, bool):
            raise SettingError("expected true or false")
        return value
    if isinstance(value, (dict, list, bool)):
        raise SettingError("expected a number or a string")
    return setting.parse(str(value))


# What a backend table may set besides its address: the per-backend settings,
# by their long option name (dashes or underscores).
_BACKEND_KEYS = {}
for _setting in SETTINGS:
    if _setting.per_backend:
        _long = _setting.flags[-1].lstrip("-")
        _BACKEND_KEYS[_long] = _BACKEND_KEYS[_long.replace("-", "_")] = _setting


def _backends(value: Any) -> list[Address]:
    if not isinstance(value, list) or not value:
        raise SettingError("expected a non-empty list of \"HOST:PORT\" or {address = ..., ...}")
    addresses = []
    for item in value:
        if isinstance(item, (str, int)) and not isinstance(item, bool):
            addresses.append(backend(str(item)))
        elif isinstance(item, dict):
            addresses.append(backend_table(item))
        else:
            raise SettingError("a backend is \"HOST:PORT\" or {address = \"HOST:PORT\", weight = N, ...}")
    return addresses


def backend_table(item: dict[str, Any]) -> Address:
    """A backend from a table (config file, admin API): address, weight, backup and per-backend settings."""
    if "address" not in item:
        raise SettingError("a backend table needs an 'address'")
    address = backend(str(item["address"]))
    where = "backend %s: " % address.name
    weight = item.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 1000:
        raise SettingError("weight must be a whole number from 1 to 1000 (got %r)" % (weight,))
    backup = item.get("backup", False)
    if not isinstance(backup, bool):
        raise SettingError("backup must be true or false (got %r)" % (backup,))
    overrides = []
    for key, value in item.items():
        if key in ("address", "weight", "backup"):
            continue
        setting = _BACKEND_KEYS.get(key)
        if setting is None:
            raise SettingError(where + "unknown key %r (a backend table takes address, weight, backup, %s)"
                               % (key, ", ".join(sorted(k for k in _BACKEND_KEYS if "-" not in k))))
        try:
            overrides.append((setting.name, _setting_value(setting, value)))
        except SettingError as exc:
            raise SettingError(where + "%s: %s" % (key, exc)) from None
    return dataclasses.replace(address, weight=weight, backup=backup, overrides=tuple(overrides))


def complete(values: dict[str, Any], where: str = "") -> Config:
    """A Config from every setting's value, the port and the backends; SettingError when they do not fit.

    What the command line, the config file and ``fastlb.serve`` share once
    each setting was validated on its own: the default policy, the check
    settings against each other, each backend's own settings merged with the
    global ones (``where`` names the file's line for their errors), and with
    ``--resolve-interval 0`` names that must resolve now.
    """
    values = dict(values)
    if not values["balance"]:
        values["balance"] = default_balance(values["check"])
    if values["admin_token_file"] and not values["admin"]:
        raise SettingError("--admin-token-file needs --admin (the API is served there)")
    make_check(values)   # the global check settings alone, so their errors name no backend
    backends = []
    for address in values["backends"]:
        try:
            backends.append(literal(address.with_settings(values)))
        except SettingError as exc:
            raise SettingError("%sbackend %s: %s" % (where + ": " if where else "", address.name,
                                                     exc)) from None
    if not values["resolve_interval"]:
        # Resolved once, at start-up: a name that does not resolve is an error, as in HAProxy.
        Discovery(parse_resolvers(values["resolvers"])).check(backends)
    values["backends"] = backends
    return Config(**values)

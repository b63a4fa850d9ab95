"""The balancing policies: which backend takes a new connection (SPEC §3 and §7).

Plain code over backend data, no I/O and no locking: ``pool.py`` calls
``Policy.choose`` with its lock held, and a policy may read and write the
backends' figures (``rr_current``) and its own memory (the leastconn cursor,
the random generator) only because of that lock.

A backend is anything with the attributes ``name``, ``index``, ``state``,
``closed``, ``weight``, ``backup``, ``entries``, ``errors``, ``active``,
``reports_load`` and ``rr_current``; ``fastlb.pool.Backend`` is the real one.
This module does not import ``pool`` (the arrows point down: pool -> policies).
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from typing import Any, Container, Iterable, Optional, Protocol

__all__ = ["POLICIES", "Policy", "candidates"]

POLICIES = ("least-loaded", "leastconn", "roundrobin", "source", "p2c")

UP = "up"   # the routable state, spelled as in pool.py

_MASK64 = (1 << 64) - 1


def candidates(backends: Iterable[Any], exclude: Container[Any] = ()) -> list[Any]:
    """The backends that may take a new connection, in table order.

    Those up, not closed to new connections (removed by a reload, drained or
    in maintenance), not in ``exclude`` and not backup; when there is none,
    the backup ones that are up, not closed and not excluded.
    """
    primary: list[Any] = []
    backups: list[Any] = []
    for backend in backends:
        if backend.state != UP or backend.closed or backend in exclude:
            continue
        (backups if backend.backup else primary).append(backend)
    return primary or backups


# -- least-loaded (the default with --check load) --------------------------------

def _least_loaded(backends: Iterable[Any], exclude: Container[Any] = (),
                  client: Optional[str] = None) -> Any:
    """Fewest entries per unit of weight, then fewest errors, then smallest index.

    The same rule, with the same float division, as ``Backend.load()`` in pool.py.
    It runs for every client connection in the default mode, so it is one pass
    with no list and no tuple per backend: a load is worked out only once a
    rival turns up, and the best backup is tracked alongside, used only when
    no other backend qualified.
    """
    best = best_backup = None
    best_load: Optional[float] = None
    backup_key: Optional[tuple[float, int, int]] = None   # set with best_backup
    for backend in backends:
        if backend.state != UP or backend.closed or backend in exclude:
            continue
        if backend.backup:
            if best is None:
                key = (backend.entries / backend.weight, backend.errors, backend.index)
                if backup_key is None or key < backup_key:
                    best_backup, backup_key = backend, key
            continue
        if best is None:
            best = backend
            continue
        if best_load is None:
            best_load = best.entries / best.weight
        load = backend.entries / backend.weight
        if load < best_load or (load == best_load and (
                backend.errors, backend.index) < (best.errors, best.index)):
            best, best_load = backend, load
    return best if best is not None else best_backup


# -- roundrobin ------------------------------------------------------------------

def _roundrobin(backends: Iterable[Any], exclude: Container[Any] = (),
                client: Optional[str] = None) -> Any:
    """nginx's smooth weighted round robin over the candidates.

    Every candidate's ``rr_current`` grows by its weight, the largest takes the
    connection and gives back the candidates' total weight.  Over one cycle of
    total-weight picks each backend is chosen weight times, interleaved rather
    than in bursts (5,1,1 gives a a b a c a a).  Only candidates take part, so
    a backend that is down does not pile up credit while it is away.
    """
    pool = candidates(backends, exclude)
    if not pool:
        return None
    best: Any = None
    total = 0
    for backend in pool:
        weight = backend.weight
        total += weight
        current = backend.rr_current = backend.rr_current + weight
        # Strictly greater, and candidates are scanned in table order: ties go to the smallest index.
        if best is None or current > best.rr_current or (
                current == best.rr_current and backend.index < best.index):
            best = backend
    best.rr_current -= total
    return best


# -- source (rendezvous hashing) -------------------------------------------------

# Different personalisations keep a client text and a backend name that happen
# to be equal from hashing alike.
_CLIENT_PERSON = b"fastlb-client"
_BACKEND_PERSON = b"fastlb-backend"


def _hash64(text: str, person: bytes) -> int:
    # blake2b, not hash(): the choice must survive a restart and agree across
    # processes, whatever PYTHONHASHSEED is.
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, person=person)
    return int.from_bytes(digest.digest(), "little")


@functools.lru_cache(maxsize=4096)
def _backend_hash(name: str) -> int:
    return _hash64(name, _BACKEND_PERSON)


def _splitmix64(x: int) -> int:
    """The splitmix64 finalizer: every input bit flips about half the output bits."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _source(backends: Iterable[Any], exclude: Container[Any] = (),
            client: Optional[str] = None) -> Any:
    """Weighted rendezvous (highest random weight) hashing of the client's address.

    Each candidate scores ``-weight / ln(u)``, ``u`` in (0, 1) drawn from a hash
    of (client, backend name); the highest score wins.  A client's score for a
    backend never depends on the other backends, so while the candidates stay
    the same a client stays put, and when one leaves only its own clients move
    (to their second choice) and they come back when it returns.  ``-ln(u)/w``
    is exponential with rate ``w``, so a backend wins with probability weight /
    total weight.
    """
    pool = candidates(backends, exclude)
    if len(pool) <= 1:
        return pool[0] if pool else None
    client_hash = _hash64(client or "", _CLIENT_PERSON)
    best = None
    best_score = 0.0
    for backend in pool:
        mixed = _splitmix64(client_hash ^ _backend_hash(backend.name))
        # The top 53 bits, centred in their step: a float strictly inside (0, 1), so ln(u) < 0.
        u = ((mixed >> 11) + 0.5) * (1.0 / (1 << 53))
        score = -backend.weight / math.log(u)
        if best is None or score > best_score or (score == best_score and backend.index < best.index):
            best, best_score = backend, score
    return best


# -- the policy object -----------------------------------------------------------

class Chooser(Protocol):
    """The signature of ``Policy.choose``."""

    def __call__(self, backends: Iterable[Any], exclude: Container[Any] = (),
                 client: Optional[str] = None) -> Any: ...


class Policy:
    """One pool's balancing policy and the memory it keeps between choices.

    ``choose(backends, exclude=(), client=None)`` returns the backend for a new
    connection, or None when no candidate exists (see ``candidates``); it is
    called with the pool's lock held and does no I/O and no locking.
    ``client`` is the client's IP address as text, used by ``source``.

    Built once per pool and rebuilt when a reload changes the policy.
    """

    # Bound once in __init__ to the policy's own function, so a call costs no
    # dispatch: least-loaded runs for every connection in the default mode.
    choose: Chooser

    def __init__(self, name: str, rng: Optional[random.Random] = None):
        choosers: dict[str, Chooser] = {
            "least-loaded": _least_loaded,
            "leastconn": self._leastconn,
            "roundrobin": _roundrobin,
            "source": _source,
            "p2c": self._p2c,
        }
        if name not in choosers:
            raise ValueError("unknown balancing policy %r (expected one of: %s)"
                             % (name, ", ".join(POLICIES)))
        self.name = name
        self.rng = rng if rng is not None else random.Random()
        self._last_index = -1     # leastconn: the index it chose last
        self.choose = choosers[name]

    def __repr__(self) -> str:
        return "<Policy %s>" % self.name

    def _leastconn(self, backends: Iterable[Any], exclude: Container[Any] = (),
                    client: Optional[str] = None) -> Any:
        """Fewest relays open per unit of weight; the equally loaded take turns.

        Among ties the first whose index comes after the one this policy chose
        last wins, wrapping around (as HAProxy and nginx do), so sequential
        clients, each gone before the next arrives, still spread over all
        backends in index order instead of all landing on the first.
        """
        last = self._last_index
        best = None
        for backend in candidates(backends, exclude):
            if best is None:
                best = backend
                continue
            # Cross-multiplied: exact, where active / weight in floats might tie wrongly.
            mine, theirs = backend.active * best.weight, best.active * backend.weight
            if mine < theirs:
                best = backend
            elif mine == theirs:
                # Turn order: indexes after the last chosen first (False < True), then ascending.
                if (backend.index <= last, backend.index) < (best.index <= last, best.index):
                    best = backend
        if best is not None:
            self._last_index = best.index
        return best

    def _p2c(self, backends: Iterable[Any], exclude: Container[Any] = (),
              client: Optional[str] = None) -> Any:
        """Power of two choices (Envoy's least_request): the less loaded of two random candidates.

        Load is entries per unit of weight, then errors, when both report it
        (``--check load``); otherwise relays open per unit of weight.  Two
        random picks spread the choices of balancers that see the same stale
        figures, while never picking the most loaded; with few backends that
        helps little (measured in docs/deploy.md: with three, leastconn did
        better for two instances).
        """
        pool = candidates(backends, exclude)
        n = len(pool)
        if n <= 1:
            return pool[0] if pool else None
        # Two distinct candidates, uniformly.
        i = self.rng.randrange(n)
        j = self.rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = pool[i], pool[j]
        if a.index > b.index:
            a, b = b, a           # ties go to the smaller index
        if a.reports_load and b.reports_load:
            if (b.entries / b.weight, b.errors) < (a.entries / a.weight, a.errors):
                return b
            return a
        if b.active * a.weight < a.active * b.weight:
            return b
        return a

"""Lazy plugin registry for the ``mooncake.transports`` and ``mooncake.metadata`` groups.

Entry points are read on first use, not at ``import mooncake``; each is kept as a dotted string
and imported only when asked for.  A plugin that fails to import, or whose ``probe()`` says it
cannot run here, is listed as unavailable with its reason instead of crashing anything.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

from mooncake.errors import ConfigError, TransportUnavailable

__all__ = [
    "PluginInfo",
    "get_transport",
    "transport_names",
    "transport_status",
    "transport_classes",
    "register_transport",
    "unregister_transport",
    "get_metadata",
    "metadata_names",
    "register_metadata",
]

TRANSPORT_GROUP = "mooncake.transports"
METADATA_GROUP = "mooncake.metadata"


@dataclass(frozen=True)
class PluginInfo:
    """One row of ``mooncake transports``."""

    name: str
    target: str
    distribution: str
    available: bool
    reason: str
    #: what the transport says about how it was built and what it found (its optional
    #: ``describe()`` classmethod), shown whether or not it is available
    detail: str = ""


class _Group:
    def __init__(self, group: str, what: str) -> None:
        self.group = group
        self.what = what
        self._lock = threading.Lock()
        self._specs: dict[str, tuple[Any, str]] = {}  # name -> (class or dotted str, distribution)
        self._loaded: dict[str, type | BaseException] = {}
        self._scanned = False
        self.view = MappingProxyType(self._specs)

    def _scan(self) -> None:
        if self._scanned:
            return
        with self._lock:
            if self._scanned:
                return
            for ep in entry_points(group=self.group):
                dist = ep.dist.name if ep.dist is not None else "?"
                self._specs.setdefault(ep.name, (ep.value, dist))  # first seen wins
            self._scanned = True

    def names(self) -> list[str]:
        self._scan()
        return sorted(self._specs)

    def register(self, name: str, target: Any, clobber: bool = False,
                 distribution: str = "<runtime>") -> None:
        self._scan()
        with self._lock:
            if name in self._specs and not clobber:
                raise ValueError(f"{self.what} {name!r} is already registered "
                                 f"(from {self._specs[name][1]}); pass clobber=True to replace it")
            self._specs[name] = (target, distribution)
            self._loaded.pop(name, None)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._specs.pop(name, None)
            self._loaded.pop(name, None)

    def load(self, name: str) -> type | BaseException:
        """The plugin class, or the exception that stopped it from loading."""
        self._scan()
        if name in self._loaded:
            return self._loaded[name]
        spec = self._specs.get(name)
        if spec is None:
            return KeyError(name)
        target = spec[0]
        try:
            cls = _import(target) if isinstance(target, str) else target
        except Exception as e:  # any import failure makes the plugin unavailable, not fatal
            cls = e
        self._loaded[name] = cls
        return cls

    def distribution(self, name: str) -> str:
        self._scan()
        return self._specs[name][1] if name in self._specs else "?"

    def target(self, name: str) -> str:
        t = self._specs.get(name, ("?", ""))[0]
        return t if isinstance(t, str) else f"{t.__module__}:{t.__qualname__}"


def _import(dotted: str) -> type:
    mod, _, attr = dotted.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


_transports = _Group(TRANSPORT_GROUP, "transport")
_metadata = _Group(METADATA_GROUP, "metadata plugin")


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, TransportUnavailable) else str(exc)


def transport_names() -> list[str]:
    """Every transport name known (installed entry points plus runtime registrations)."""
    return _transports.names()


def _probe(name: str) -> tuple[type | None, str]:
    cls = _transports.load(name)
    if isinstance(cls, KeyError):
        return None, f"no transport named {name!r} (known: {', '.join(transport_names())})"
    if isinstance(cls, BaseException):
        return None, _reason(cls)
    try:
        why = cls.probe()
    except Exception as e:
        why = f"probe failed: {_reason(e)}"
    return (None, why) if why else (cls, "")


def get_transport(name: str) -> type:
    """The transport class registered as ``name``; ``TransportUnavailable`` when it cannot run."""
    cls, why = _probe(name)
    if cls is None:
        raise TransportUnavailable(f"transport {name!r} is unavailable: {why}")
    return cls


def transport_status() -> list[PluginInfo]:
    """Name, distribution, availability and reason of every known transport."""
    rows = []
    for name in transport_names():
        cls, why = _probe(name)
        rows.append(PluginInfo(name, _transports.target(name), _transports.distribution(name),
                               cls is not None, why, _detail(name)))
    return rows


def _detail(name: str) -> str:
    cls = _transports.load(name)
    describe = getattr(cls, "describe", None) if isinstance(cls, type) else None
    if describe is None:
        return ""
    try:
        return str(describe())
    except Exception as e:
        return f"describe failed: {_reason(e)}"


def transport_classes() -> dict[str, type]:
    """Every transport class that imports, by name, whether or not it can run here: what the
    configuration table gathers options from."""
    out = {}
    for name in transport_names():
        cls = _transports.load(name)
        if isinstance(cls, type):
            out[name] = cls
    return out


def register_transport(name: str, target: Any, clobber: bool = False) -> None:
    """Register a transport class (or ``"module:Class"`` string) at runtime."""
    _transports.register(name, target, clobber)


def unregister_transport(name: str) -> None:
    _transports.unregister(name)


def metadata_names() -> list[str]:
    return _metadata.names()


def get_metadata(name: str) -> type:
    """The metadata-store class registered as ``name``; ``ConfigError`` when unknown/broken."""
    cls = _metadata.load(name)
    if isinstance(cls, KeyError):
        known = ", ".join(metadata_names())
        raise ConfigError(f"no metadata plugin named {name!r} (known: {known})")
    if isinstance(cls, BaseException):
        raise ConfigError(f"metadata plugin {name!r} is unavailable: {_reason(cls)}") from cls
    return cls


def register_metadata(name: str, target: Any, clobber: bool = False) -> None:
    """Register a metadata-store class (or ``"module:Class"`` string) at runtime."""
    _metadata.register(name, target, clobber)


transports = _transports.view
metadata = _metadata.view

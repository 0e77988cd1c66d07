"""Configuration: the effective value of every knob in the table :func:`all_options` gathers
(the framework's rows of :mod:`mooncake.options` plus each transport's ``options``).

Precedence, lowest first: the row's default < TENT JSON (``MC_TENT_CONF``: a file path, or
inline JSON starting with ``{``; keys are ``/``-separated paths, nested objects or flat) <
``MC_*`` environment (primary name first, then aliases) < explicit arguments.

Parsing is strict where Mooncake is lax:

* booleans are ``0/1/true/false/yes/no/on/off`` (any case); mere presence enables nothing;
* sizes are bytes; ``K``/``M``/``G``/``T`` suffixes are binary (``2MB`` = ``2M`` = 2097152);
* an empty environment value counts as unset;
* a bad value raises :class:`~mooncake.errors.ConfigError` naming the variable, the value and
  what is allowed; Mooncake would keep the default and log a warning.

Warnings (a likely typo of a known ``MC_*`` name, an unknown TENT key, a deprecated alias,
cross-field advice, a clamp to a device limit) are issued as :class:`ConfigWarning`, logged on
``mooncake.config`` and kept in :attr:`Config.notes`.  Setting an option the table declares
``no_effect`` or ``pending`` warns once per process with :class:`InertOptionWarning` (also
logged) and is listed in :attr:`Config.inert`.  Loading never touches ``os.environ``.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import shlex
import stat
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from fractions import Fraction
from typing import Any

from mooncake.errors import ConfigError
from mooncake.options import CORE_OPTIONS, KNOWN_UNUSED, LOG_ROOTS, METRIC_LOGGER, Option

__all__ = ["Option", "all_options", "Config", "ConfigWarning", "InertOptionWarning",
           "load_config", "show", "allowed", "parse_env_block", "log_roots", "apply_log_level",
           "metric_logger"]

log = logging.getLogger(__name__)

PRECEDENCE = "default < MC_TENT_CONF < environment < argument"


class ConfigWarning(UserWarning):
    """A configuration value is suspicious but allowed (typo, unknown key, clamp...)."""


class InertOptionWarning(UserWarning):
    """An option was set that does nothing here: the table declares it ``no_effect`` (with the
    reason) or ``pending`` (not wired yet).  Issued once per option per process."""


#: options already warned about as inert in this process
_INERT_WARNED: set[str] = set()
_INERT_LOCK = threading.Lock()


# ---- lookup ------------------------------------------------------------------------------------

class _Table:
    """The gathered rows and their lookups by env name, TENT path, row name and short name."""

    def __init__(self, options: tuple[Option, ...]) -> None:
        self.options = options
        self.env = {e: o for o in options for e in o.env}
        self.tent = {o.tent: o for o in options if o.tent}
        self.exact = {**self.env, **self.tent, **{o.name: o for o in options}}
        # ``slice_size`` for ``MC_SLICE_SIZE``; a TENT-only row's last path part when unique
        self.short = {e[3:].lower(): o for e, o in self.env.items() if e.startswith("MC_")}
        last: dict[str, list[Option]] = {}
        for o in options:
            if not o.env:
                last.setdefault(o.name.rsplit("/", 1)[-1], []).append(o)
        self.short.update({k: v[0] for k, v in last.items()
                           if len(v) == 1 and k not in self.short})


_TABLE: tuple[tuple[str, ...], _Table] | None = None
_TABLE_LOCK = threading.Lock()


def _gather() -> _Table:
    from mooncake.registry import transport_classes

    rows, seen = list(CORE_OPTIONS), {k for o in CORE_OPTIONS for k in (o.name, *o.env)}
    for name, cls in sorted(transport_classes().items()):
        for o in getattr(cls, "options", ()):
            clash = seen & {o.name, *o.env}
            if not isinstance(o, Option) or o.owner != name or clash:
                why = f"declares {sorted(clash)} already declared" if clash else \
                    f"row {getattr(o, 'name', o)!r} is not an Option owned by {name!r}"
                log.warning("transport %s: option row ignored: %s", name, why)
                continue
            rows.append(o)
            seen |= {o.name, *o.env}
    return _Table(tuple(rows))


def _t() -> _Table:
    """The current table (gathered again when a transport is registered or removed)."""
    global _TABLE
    from mooncake.registry import transport_names

    key = tuple(transport_names())
    table = _TABLE
    if table is None or table[0] != key:
        with _TABLE_LOCK:
            if _TABLE is None or _TABLE[0] != key:
                _TABLE = (key, _gather())
            table = _TABLE
    return table[1]


def all_options() -> tuple[Option, ...]:
    """Every row: the framework's (:data:`mooncake.options.CORE_OPTIONS`), then each
    transport's ``options``, gathered through the registry (a transport that cannot run here
    still declares its rows; one that does not import has none)."""
    return _t().options


def __getattr__(name: str) -> Any:
    if name == "OPTIONS":  # the gathered table, as a module attribute
        return all_options()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _lookup(key: str) -> Option | None:
    t = _t()
    return t.exact.get(key) or t.short.get(key.lower().removeprefix("mc_"))


def _close(key: str, candidates, cutoff: float = 0.75) -> list[str]:
    return difflib.get_close_matches(key, list(candidates), n=3, cutoff=cutoff)


def _unknown(key: str) -> str:
    t = _t()
    near = _close(key, [*t.exact, *t.short]) or _close(key.lower(), t.short)
    hint = f"; close matches: {', '.join(near)}" if near else ""
    return f"unknown configuration key {key!r}{hint}"


# ---- parsing: one function per type ----------------------------------------------------------


class _Invalid(ValueError):
    """Raised by the parsers; the caller adds the variable's name and the allowed values."""


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE | re.ASCII)
_MULT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise _Invalid("a boolean is not a number")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        s = raw.strip()
        for base in (10, 0):  # decimal first (so "010" is 10), then 0x/0o/0b
            try:
                return int(s, base)
            except ValueError:
                pass
    raise _Invalid("not an integer")


def _size(raw: Any) -> int:
    if isinstance(raw, str) and (m := _SIZE.fullmatch(raw.strip())):
        n = Fraction(m.group(1)) * _MULT[m.group(2).upper()]
        if n.denominator == 1:
            return int(n)
        raise _Invalid("not a whole number of bytes")
    return _int(raw)


def parse_size(text: Any) -> int:
    """Bytes from ``65536``, ``64K``, ``2MiB``, ``1.5G`` (binary suffixes); ValueError otherwise."""
    return _size(text)


def _float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise _Invalid("a boolean is not a number")
    try:
        v = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise _Invalid("not a number") from None
    except OverflowError:  # an int beyond any float
        raise _Invalid("not a finite number") from None
    if not math.isfinite(v):  # nan, inf, and "1e999"
        raise _Invalid("not a finite number")
    return v


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        s = raw.strip().lower()
        if s in _TRUE or s in _FALSE:
            return s in _TRUE
    raise _Invalid("not a boolean")


def _str(raw: Any) -> str:
    if isinstance(raw, (str, os.PathLike)):
        return os.fspath(raw)
    raise _Invalid("not a string")


def _list(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    if isinstance(raw, (list, tuple)) and all(isinstance(p, str) for p in raw):
        return tuple(raw)
    raise _Invalid("not a list of names")


def _auto(raw: Any) -> str | bool:
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        return "auto"
    return _bool(raw)


_PARSERS: dict[Any, Callable[[Any], Any]] = {
    int: _int, "size": _size, float: _float, bool: _bool, str: _str, "enum": _str,
    "list": _list, "auto": _auto,
}


def _parse(opt: Option, raw: Any) -> Any:
    """``raw`` (str from env, JSON value, or a Python object) as ``opt``'s type, checked."""
    value = _PARSERS[opt.type](raw)
    if opt.type == "enum":
        for choice in opt.choices:
            if value.strip().upper() == choice.upper():
                return choice
        raise _Invalid("not one of the choices")
    if any(value == v for v, _ in opt.special):
        return value
    if opt.choices is not None and value not in opt.choices:
        raise _Invalid("not one of the choices")
    if opt.range is not None:
        lo, hi = opt.range
        if lo is not None and (value <= lo if opt.min_exclusive else value < lo):
            raise _Invalid("too small")
        if hi is not None and value > hi:
            raise _Invalid("too large")
    return value


def _human(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def allowed(opt: Option) -> str:
    """What ``opt`` accepts, in words (used in every error message)."""
    if opt.type is bool:
        return "one of 0/1/true/false/yes/no/on/off (any case)"
    if opt.type == "auto":
        return "auto or one of 0/1/true/false/yes/no/on/off (any case)"
    if opt.type == "enum":
        return f"one of {', '.join(opt.choices)} (any case)"
    if opt.type == "list":
        return "a comma-separated list of names (a JSON list in TENT)"
    if opt.type is str:
        return "any string"
    fmt = (lambda n: f"{n} ({_human(n)})" if n >= 1024 else str(n)) if opt.type == "size" else str
    unit = f" {opt.unit}" if opt.unit else ""
    if opt.choices is not None:
        text = f"one of {', '.join(fmt(c) for c in opt.choices)}{unit}"
    else:
        lo, hi = opt.range or (None, None)
        low = None if lo is None else f"{'>' if opt.min_exclusive else '>='} {fmt(lo)}"
        if lo is not None and hi is not None and not opt.min_exclusive and opt.type is not float:
            text = f"{fmt(lo)}..{fmt(hi)}{unit}"
        else:
            text = " and ".join(p for p in (low, hi is not None and f"<= {fmt(hi)}") if p) + unit
    text = " or ".join([*(f"{v} ({what})" for v, what in opt.special), text])
    if opt.type == "size":
        text += "; K/M/G/T suffixes are binary (2M = 2MB = 2097152)"
    return text


def _brief(raw: Any, limit: int = 80) -> str:
    if isinstance(raw, int) and not isinstance(raw, bool) and raw.bit_length() > 256:
        return f"<an integer of {raw.bit_length()} bits>"  # repr refuses > 4300 digits
    text = repr(raw)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _checked(opt: Option, raw: Any, where: str) -> Any:
    try:
        return _parse(opt, raw)
    except (ValueError, TypeError, OverflowError) as e:  # _Invalid, or a parser's own
        label = opt.name if where == opt.name else f"{where} ({opt.name})"
        msg = f"{label}={_brief(raw)} is invalid ({e}); allowed: {allowed(opt)}"
        raise ConfigError(msg) from None


# ---- TENT JSON -----------------------------------------------------------------------------------


#: the largest TENT config (file or inline) read, in bytes
TENT_MAX_BYTES = 1 << 20
#: the deepest nesting of objects/arrays a TENT config may have
TENT_MAX_DEPTH = 32
#: unknown TENT keys warned about one by one; beyond, one summary
_TENT_MAX_UNKNOWN = 20

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _json_depth(text: str, limit: int) -> int:
    """How deep ``text`` nests ``[``/``{`` (outside strings), counting no further than
    ``limit + 1``; no recursion, so any input is safe."""
    depth = deepest = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        if m.group() in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def _read_tent_file(spec: str, path: str, what: str) -> str:
    """The text of the TENT file at ``path``: a regular file of at most TENT_MAX_BYTES; never
    blocks (a FIFO, a device or a directory is refused at once)."""
    def fail(why: str) -> ConfigError:
        return ConfigError(f"MC_TENT_CONF={spec!r}: {why}; allowed: {what}")

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise fail(f"cannot read the file ({e.strerror or e})") from None
    except ValueError as e:  # an embedded NUL
        raise fail(f"cannot read the file ({e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else
                    "a directory" if stat.S_ISDIR(st.st_mode) else
                    "a character device" if stat.S_ISCHR(st.st_mode) else
                    "a block device" if stat.S_ISBLK(st.st_mode) else
                    "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
            raise fail(f"{path} is {kind}, not a regular file")
        too_big = fail(f"{path} is larger than {TENT_MAX_BYTES} bytes "
                       f"({_human(TENT_MAX_BYTES)}), the limit of a TENT config")
        if st.st_size > TENT_MAX_BYTES:
            raise too_big
        chunks, got = [], 0
        while got <= TENT_MAX_BYTES:  # the file may grow while we read it
            chunk = os.read(fd, TENT_MAX_BYTES + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > TENT_MAX_BYTES:
            raise too_big
    except OSError as e:
        raise fail(f"cannot read the file ({e.strerror or e})") from None
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_tent(spec: str, warn: Callable[[str], None]) -> tuple[dict[str, tuple[str, Any]], str]:
    """``{option name: (path, raw value)}`` from MC_TENT_CONF, and the source label."""
    text = spec.strip()
    what = "a JSON file path, or inline JSON starting with '{'"
    if text.startswith(("{", "[")):
        label = "inline"
        if len(text) > TENT_MAX_BYTES:
            raise ConfigError(f"MC_TENT_CONF={_brief(spec)}: inline JSON of {len(text)} "
                              f"characters is larger than {TENT_MAX_BYTES} "
                              f"({_human(TENT_MAX_BYTES)}), the limit of a TENT config; "
                              f"allowed: {what}")
    else:
        label = os.path.abspath(os.path.expanduser(text))
        text = _read_tent_file(spec, label, what)
    if _json_depth(text, TENT_MAX_DEPTH) > TENT_MAX_DEPTH:
        raise ConfigError(f"MC_TENT_CONF={_brief(spec)}: JSON nested deeper than "
                          f"{TENT_MAX_DEPTH} levels; allowed: {what}, at most "
                          f"{TENT_MAX_DEPTH} levels deep")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5000-digit number...
        raise ConfigError(f"MC_TENT_CONF={_brief(spec)}: malformed JSON ({str(e)[:200]}); "
                          f"allowed: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"MC_TENT_CONF={_brief(spec)}: the top level is not a JSON object; "
                          f"allowed: {what}")
    found: dict[str, tuple[str, Any]] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path in _t().tent:
                found[_t().tent[path].name] = (path, value)
            elif isinstance(value, dict) and value:
                walk(value, path + "/")
            else:
                unknown.append(path)

    unknown: list[str] = []
    walk(data, "")
    for path in unknown[:_TENT_MAX_UNKNOWN]:
        near = _close(path, _t().tent) if len(path) <= 200 else []
        hint = f"; close matches: {', '.join(near)}" if near else ""
        warn(f"MC_TENT_CONF ({label}): key {_brief(path)} is not a mooncake option, "
             f"ignored{hint}")
    if len(unknown) > _TENT_MAX_UNKNOWN:
        warn(f"MC_TENT_CONF ({label}): {len(unknown) - _TENT_MAX_UNKNOWN} more keys are not "
             "mooncake options, ignored")
    return found, label


# ---- loading -------------------------------------------------------------------------------------


def _normalise(overrides: Mapping[str, Any] | None) -> dict[str, tuple[str, Any]]:
    """``{option name: (key as given, value)}``; None values count as not given."""
    out: dict[str, tuple[str, Any]] = {}
    for key, value in (overrides or {}).items():
        opt = _lookup(key) if isinstance(key, str) else None
        if opt is None:
            raise ConfigError(_unknown(str(key)))
        if value is None:
            continue
        if opt.name in out and out[opt.name][1] != value:
            a, b = ("***", "***") if opt.secret else (repr(out[opt.name][1]), repr(value))
            raise ConfigError(f"arguments {out[opt.name][0]!r} and {key!r} both set {opt.name} "
                              f"({a} vs {b}); allowed: one value")
        out[opt.name] = (key, value)
    return out


def _emit(msg: str, category: type[Warning] = ConfigWarning) -> None:
    """Log ``msg`` and warn, attributed to the first caller outside this module."""
    log.warning("%s", msg)
    level, frame = 1, sys._getframe()
    while frame is not None and frame.f_code.co_filename == __file__:
        level, frame = level + 1, frame.f_back
    warnings.warn(msg, category, stacklevel=level)


def _inert(values: dict[str, Any], sources: dict[str, str]) -> dict[str, str]:
    """``{name: message}`` for each option set (not left at its default) that does nothing
    here; warns about each once per process."""
    out: dict[str, str] = {}
    for opt in _t().options:
        if opt.inert and sources[opt.name] != "default":
            shown = "***" if opt.secret else _brief(values[opt.name])
            out[opt.name] = msg = (f"{opt.name}={shown} ({sources[opt.name]}) is accepted but has "
                                   f"{opt.effect.replace('not in effect yet', 'no effect yet')}")
            with _INERT_LOCK:
                first = opt.name not in _INERT_WARNED
                _INERT_WARNED.add(opt.name)
            if first:
                _emit(msg, InertOptionWarning)
    return out


def _build(args: dict[str, tuple[str, Any]], env: dict[str, str], seen: list[str]) -> Config:
    """Resolve every option; warnings already in ``seen`` are recorded but not re-issued."""
    notes: list[str] = []
    table = _t()

    def warn(msg: str) -> None:
        notes.append(msg)
        if msg not in seen:
            _emit(msg)

    for name in env:
        if name.startswith("MC_") and name not in table.env and name not in KNOWN_UNUSED:
            if near := _close(name, table.env, cutoff=0.8):
                warn(f"unknown environment variable {name}: did you mean {', '.join(near)}?")

    tent: dict[str, tuple[str, Any]] = {}
    tent_label = ""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    conf = table.exact["MC_TENT_CONF"]
    for opt in (conf, *(o for o in table.options if o is not conf)):
        set_env = [e for e in opt.env if env.get(e, "").strip()]
        if opt.name in args:
            key, raw = args[opt.name]
            value, source = _checked(opt, raw, f"argument {key!r}"), "argument"
        elif set_env:
            used = set_env[0]
            value, source = _checked(opt, env[used], used), f"env:{used}"
            for other in set_env[1:]:
                if env[other].strip() != env[used].strip():
                    warn(f"{used}={env[used]!r} and {other}={env[other]!r} are both set; "
                         f"using {used}")
            if used in opt.deprecated:
                warn(f"{used} is deprecated; use {opt.env[0]}")
        elif opt.name in tent:
            path, raw = tent[opt.name]
            value = _checked(opt, raw, f"MC_TENT_CONF key {path}")
            source = f"tent:{tent_label}"
        else:
            value, source = opt.default, "default"
        values[opt.name], sources[opt.name] = value, source
        if opt is conf and value.strip():
            tent, tent_label = _read_tent(value, warn)

    _cross_check(values, sources, warn)
    inert = _inert(values, sources)
    order = [o.name for o in table.options]
    return Config({n: values[n] for n in order}, {n: sources[n] for n in order}, notes,
                  args=args, env=env, inert=inert)


def _cross_check(v: dict[str, Any], src: dict[str, str], warn: Callable[[str], None]) -> None:
    def at(name: str) -> str:
        return f"{name}={v[name]} ({src[name]})"

    if v["MC_MIN_RPC_PORT"] > v["MC_MAX_RPC_PORT"]:
        raise ConfigError(f"{at('MC_MIN_RPC_PORT')} is above {at('MC_MAX_RPC_PORT')}; allowed: "
                          "MC_MIN_RPC_PORT <= MC_MAX_RPC_PORT, both 1024..65535")
    if v["MC_FRAGMENT_RATIO"] >= v["MC_SLICE_SIZE"]:
        raise ConfigError(f"{at('MC_FRAGMENT_RATIO')} is not below {at('MC_SLICE_SIZE')}; "
                          f"allowed: 1..{v['MC_SLICE_SIZE'] - 1} (1 <= ratio < slice size)")
    from mooncake.registry import transport_classes

    for cls in transport_classes().values():  # each transport checks its own rows
        if all(o.name in v for o in getattr(cls, "options", ())):
            cls.check_config(v, src, warn)

def load_config(overrides: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """The effective configuration.

    ``overrides`` (explicit arguments, highest precedence) are keyed by env name, alias, TENT
    path, or short name (``slice_size``); a None value counts as not given.  ``env`` defaults to
    ``os.environ`` (read, never written).
    """
    source = os.environ if env is None else env
    snapshot = {k: str(v) for k, v in source.items() if k.startswith("MC_") or k in _t().env}
    return _build(_normalise(overrides), snapshot, [])


class Config(Mapping[str, Any]):
    """Effective values, keyed by option name; also answers to aliases, TENT paths, short names."""

    def __init__(self, values: dict[str, Any], sources: dict[str, str], notes: list[str], *,
                 args: dict[str, tuple[str, Any]], env: dict[str, str],
                 inert: dict[str, str] | None = None) -> None:
        self._inert = dict(inert or {})
        self._values = values
        self._sources = sources
        self._notes = notes
        self._args = args
        self._env = env
        self._clamps: list[tuple[str, Any, str]] = []
        self._lock = threading.Lock()

    def option(self, name: str) -> Option:
        opt = _lookup(name) if isinstance(name, str) else None
        if opt is None:
            raise KeyError(_unknown(str(name)))
        return opt

    def __getitem__(self, name: str) -> Any:
        return self._values[self.option(name).name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def source(self, name: str) -> str:
        """``default``, ``tent:<file path or inline>``, ``env:<VAR>`` or ``argument``."""
        return self._sources[self.option(name).name]

    @property
    def notes(self) -> list[str]:
        """Warnings recorded while loading or clamping, each with its reason."""
        return list(self._notes)

    @property
    def inert(self) -> dict[str, str]:
        """``{option name: why}`` for each option set here that has no effect (declared
        ``no_effect``, or ``pending`` with no reader, in the table)."""
        return dict(self._inert)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A new Config: these arguments on top of this one's (same env snapshot, clamps kept)."""
        cfg = _build({**self._args, **_normalise(overrides)}, self._env, self._notes)
        for name, limit, reason in self._clamps:
            if (msg := cfg._clamp(name, limit, reason)) and msg not in self._notes:
                _emit(msg)
        return cfg

    def clamp(self, name: str, limit: Any, reason: str) -> Any:
        """Lower ``name`` to ``limit`` if it is above (a device limit, e.g. ``max_qp_wr``);
        record a note and warn.  Returns the effective value."""
        if msg := self._clamp(name, limit, reason):
            _emit(msg)
        return self[name]

    def _clamp(self, name: str, limit: Any, reason: str) -> str | None:
        opt = self.option(name)
        with self._lock:
            value = self._values[opt.name]
            if value is None or value <= limit:
                return None
            self._values[opt.name] = limit
            self._clamps.append((opt.name, limit, reason))
            msg = f"{opt.name}={value} clamped to {limit} ({reason})"
            self._notes.append(msg)
            return msg

    def __repr__(self) -> str:
        changed = {k: "***" if self.option(k).secret else v for k, v in self._values.items()
                   if self._sources[k] != "default"}
        return f"<Config {changed!r}>"


# ---- mooncake config show ----------------------------------------------------------------------


def _shown(opt: Option, value: Any, as_json: bool) -> Any:
    if opt.secret and value:
        return "***"
    if as_json:
        return list(value) if isinstance(value, tuple) else value
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value) or '""'
    if opt.type == "size":
        return f"{value} ({_human(value)})"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return '""' if value == "" else str(value)


def parse_env_block(text: str, where: str = "env block") -> dict[str, str]:
    """``{NAME: value}`` from shell lines ``[export] NAME=value [# comment]`` (quotes as in sh);
    blank and comment lines are skipped; anything else is a ConfigError naming the line."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise ConfigError(f"{where} line {n}: {e}; allowed: [export] NAME=value") from None
        if words[:1] == ["export"]:
            words = words[1:]
        for w in words:
            name, eq, value = w.partition("=")
            if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ConfigError(f"{where} line {n}: {_brief(line.strip())} is not an "
                                  "assignment; allowed: [export] NAME=value [# comment]")
            out[name] = value
    return out


def _effect_json(o: Option) -> dict[str, Any]:
    return {"in_effect": not o.inert, "effect": o.effect,
            "reads": [r.split("::")[0] for r in o.reads], "no_effect": o.no_effect,
            "pending": o.pending}


def _key_as_set(o: Option, source: str) -> str:
    """The name a setting was given under: its TENT path for a TENT value, its env name."""
    if source.startswith("tent:") and o.tent:
        return o.tent if o.tent == o.name else f"{o.tent} ({o.name})"
    if source.startswith("env:") and source[4:] != o.name:
        return f"{source[4:]} ({o.name})"
    return o.name


def show(as_json: bool = False, overrides: Mapping[str, Any] | None = None,
         env: Mapping[str, str] | None = None) -> str:
    """Every effective value with its source (``mooncake config show [--json]``), what each
    option that is set does (its meaning, who applies it, or why it does nothing), and the
    notes.  ``env`` replaces ``os.environ`` (e.g. a template read with :func:`parse_env_block`).
    """
    cfg = load_config(overrides, env)
    if as_json:
        options = {
            o.name: {
                "value": _shown(o, cfg[o.name], True), "source": cfg.source(o.name),
                "default": _shown(o, o.default, True), "allowed": allowed(o),
                "type": o.type if isinstance(o.type, str) else o.type.__name__, "unit": o.unit,
                "env": list(o.env), "tent": o.tent, "owner": o.owner, "doc": o.doc,
                "hint": o.hint, **_effect_json(o),
            } for o in _t().options
        }
        doc = {"precedence": PRECEDENCE, "options": options, "notes": cfg.notes,
               "inert": cfg.inert}
        return json.dumps(doc, indent=2)
    rows = [("NAME", "VALUE", "SOURCE", "")]
    rows += [(o.name, _shown(o, cfg[o.name], False), cfg.source(o.name),
              "" if o.reads and not o.pending else o.effect) for o in _t().options]
    w0, w1, w2 = (max(len(r[i]) for r in rows) for i in (0, 1, 2))
    lines = [f"# precedence: {PRECEDENCE}"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c:<{w2}}  {d}".rstrip() for a, b, c, d in rows]
    chosen = [o for o in _t().options if cfg.source(o.name) != "default"]
    if chosen:
        lines += ["", "what each setting does:"]
        for o in chosen:
            src = cfg.source(o.name)
            lines.append(f"  {_key_as_set(o, src)} = {_shown(o, cfg[o.name], False)}  [{src}]")
            lines.append(f"      meaning: {o.doc}")
            lines.append(f"      effect:  {o.effect}")
            if o.hint:
                lines.append(f"      tuning:  {o.hint}")
    lines += ["", "notes:", *(f"  - {n}" for n in cfg.notes)] if cfg.notes else []
    return "\n".join(lines) + "\n"


# ---- logging: MC_LOG_LEVEL, MC_LOG_DIR, MC_TE_METRIC ---------------------------------------------


def log_roots() -> tuple[str, ...]:
    """The logger hierarchies MC_LOG_LEVEL governs: :data:`mooncake.options.LOG_ROOTS` plus the
    top-level package of every transport/metadata plugin the ``mooncake`` distribution itself
    declares (so first-party plugins moved to another package stay covered)."""
    from importlib.metadata import entry_points

    roots = list(LOG_ROOTS)
    try:
        for group in ("mooncake.transports", "mooncake.metadata"):
            for ep in entry_points(group=group):
                if ep.dist is not None and ep.dist.name == "mooncake":
                    top = ep.value.split(":")[0].split(".")[0]
                    if top and top not in roots:
                        roots.append(top)
    except Exception as e:  # broken metadata must not stop an engine
        log.debug("log roots: cannot read entry points: %s", e)
    return tuple(roots)


def _level_number(level: str) -> int:
    name = str(level).strip().upper()
    if name == "TRACE":
        return logging.DEBUG
    n = logging.getLevelName(name)
    if not isinstance(n, int):
        raise ConfigError(f"MC_LOG_LEVEL={level!r} is invalid; allowed: "
                          f"{allowed(_t().exact['MC_LOG_LEVEL'])}")
    return n


def apply_log_level(level: str, log_dir: str = "") -> tuple[str, ...]:
    """Set MC_LOG_LEVEL on every project logger hierarchy (:func:`log_roots`); TRACE is DEBUG.
    With ``log_dir`` (MC_LOG_DIR), also append those loggers' records to
    ``<log_dir>/mooncake.log`` (one handler per directory, however often this is called).
    Returns the roots.  The metric line's logger keeps its own level (:func:`metric_logger`)."""
    lvl = _level_number(level)
    roots = log_roots()
    handler = None
    if log_dir:
        path = os.path.join(os.path.abspath(os.path.expanduser(log_dir)), "mooncake.log")
        for root in roots:  # the same handler object on every root: find it on any
            handler = next((h for h in logging.getLogger(root).handlers
                            if getattr(h, "_mooncake_log_file", None) == path), handler)
        if handler is None:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                handler = logging.FileHandler(path, encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"MC_LOG_DIR={log_dir!r}: cannot write {path} "
                                  f"({e.strerror or e}); allowed: a writable directory") from None
            handler.setFormatter(logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"))
            handler._mooncake_log_file = path  # type: ignore[attr-defined]
    for root in roots:
        lg = logging.getLogger(root)
        lg.setLevel(lvl)
        if handler is not None and handler not in lg.handlers:
            lg.addHandler(handler)
    return roots


class _MetricFallback(logging.Handler):
    """stderr for the metric line while no other handler would take it: what
    :data:`logging.lastResort` does for WARNING, at any level (looked up at each record, so
    logging configured later takes over and nothing prints twice)."""

    def emit(self, record: logging.LogRecord) -> None:
        lg: logging.Logger | None = logging.getLogger(record.name)
        while lg is not None:
            if any(h is not self for h in lg.handlers):
                return
            if not lg.propagate:
                break
            lg = lg.parent
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def metric_logger() -> logging.Logger:
    """The logger of MC_TE_METRIC's periodic throughput line (``mooncake.metrics``).  Its
    own level is INFO (unless someone set one), so MC_LOG_LEVEL=WARNING on ``mooncake`` does not
    hide it, like Mooncake's; it propagates to configured handlers, and prints to stderr
    when there are none."""
    lg = logging.getLogger(METRIC_LOGGER)
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.INFO)
    if not any(isinstance(h, _MetricFallback) for h in lg.handlers):
        h = _MetricFallback()
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        lg.addHandler(h)
    return lg

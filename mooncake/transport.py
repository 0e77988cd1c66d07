"""The transport contract: what a plugin in the ``mooncake.transports`` group implements.

A transport is constructed once per engine with a :class:`TransportContext`.  It publishes the
fields its peers need (``start`` for the segment, ``register`` per buffer), says whether it can
reach a peer (``can_reach``), and moves slices (``submit``), reporting each finished slice into
the batch table (``Slices.batch`` / ``mc_slice_done`` in the kernel).  Data flows one way:
transports call into ``mooncake`` and ``mooncake._core``, never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from mooncake.fields import Field
from mooncake.options import Option

if TYPE_CHECKING:
    from mooncake._core.batch import Slices
    from mooncake._core.regions import Registration
    from mooncake.config import Config

__all__ = ["Region", "BufferDesc", "SegmentDesc", "TransportContext", "Transport", "memory_kind"]


def memory_kind(location: str) -> str:
    """``"cuda"`` for ``cuda:N``, ``"cxl"`` for ``cxl...``, else ``"cpu"`` (``cpu:N``, ``*``,
    Mooncake's ``segments:...`` NUMA layouts)."""
    head = location.split(":", 1)[0].lower()
    return head if head in ("cuda", "cxl") else "cpu"


#: access flags of a region (``Region.flags``; mirrors ``mooncake._core.regions``)
LOCAL_WRITE, REMOTE_READ, REMOTE_WRITE = 1, 2, 4


@dataclass(eq=False)
class Region:
    """A registered local range."""

    addr: int
    length: int
    location: str = "cpu:0"
    #: where same-host peers can map it: ``/proc/<pid>/fd/<fd>`` of a sealed memfd
    shm_name: str | None = None
    #: the Python object that owns the memory (kept alive while registered)
    owner: Any = None
    #: per-transport published fields, filled by ``Transport.register``
    fields: dict[str, dict] = field(default_factory=dict)
    #: ``LOCAL_WRITE | REMOTE_READ | REMOTE_WRITE`` bits; a read-only buffer has REMOTE_READ only
    flags: int = 7
    #: the owned registration in the kernel's table (pins, revocation, the buffer export)
    handle: Registration | None = None

    @property
    def writable(self) -> bool:
        """Local READs and peers' WRITEs may land in it."""
        return bool(self.flags & LOCAL_WRITE)

    @property
    def end(self) -> int:
        return self.addr + self.length

    def contains(self, addr: int, length: int) -> bool:
        return self.addr <= addr and addr + length <= self.end

    def describe(self) -> dict:
        d = {"addr": self.addr, "length": self.length, "location": self.location}
        if not self.flags & REMOTE_WRITE:
            d["access"] = "ro"
        if self.shm_name:
            d["shm_name"] = self.shm_name
        if self.fields:
            d["transports"] = self.fields
        return d


@dataclass
class BufferDesc:
    """A buffer as published in a segment descriptor."""

    addr: int
    length: int
    location: str = "cpu:0"
    shm_name: str | None = None
    transports: dict[str, dict] = field(default_factory=dict)
    #: False when the peer registered it read-only (its target refuses WRITEs into it)
    writable: bool = True

    @property
    def end(self) -> int:
        return self.addr + self.length


@dataclass
class SegmentDesc:
    """A peer's (or our own) segment descriptor, decoded from JSON."""

    name: str
    host_id: str = ""
    pid: int = 0
    buffers: list[BufferDesc] = field(default_factory=list)
    transports: dict[str, dict] = field(default_factory=dict)
    timestamp: float = 0.0

    @property
    def host(self) -> str:
        return self.name.rsplit(":", 1)[0]

    def find_buffer(self, addr: int, length: int) -> BufferDesc | None:
        for b in self.buffers:
            if b.addr <= addr and addr + length <= b.end:
                return b
        return None


@dataclass
class TransportContext:
    """What the engine lends a transport."""

    config: Config
    #: our segment name, ``host:rpc_port``
    segment_name: str
    #: the host (IP or name) the engine binds to
    host: str
    #: same-host identity (boot id + network namespace), published in the descriptor
    host_id: str
    #: the engine's region table (``mooncake._core.regions.RegionTable``)
    regions: Any
    #: ``add_rpc_handler(method, fn)``: serve ``fn(args: dict) -> dict`` on the engine's RPC port
    add_rpc_handler: Callable[[str, Callable[[dict], Any]], None]
    #: ``rpc_call(segment_name, method, args, timeout) -> Any`` to a peer's RPC port
    rpc_call: Callable[..., Any]
    #: the ``device_name`` argument of ``initialize``: a comma-separated device whitelist
    device_name: str = ""
    #: the cluster token (:class:`mooncake.auth.ClusterAuth`): a transport with connections of
    #: its own runs ``auth.client``/``auth.serve`` on each before anything else
    auth: Any = None


class Transport:
    """Base class of every transport plugin."""

    #: the name users pass as ``protocol`` (set by subclasses)
    name: ClassVar[str] = ""
    #: with ``protocol="auto"`` the reachable transport with the lowest value wins
    auto_priority: ClassVar[int] = 100
    #: True for same-host-only transports (shm): the engine warns once when such a transport
    #: cannot reach a peer that is on this host and it falls back to another one
    same_host_only: ClassVar[bool] = False
    #: memory locations it can move: "cpu", "cuda", "cxl"
    memory_kinds: ClassVar[frozenset[str]] = frozenset({"cpu"})
    #: the fields it publishes in a segment descriptor (``start``) and per buffer
    #: (``register``): the one descriptor validator checks a peer's against these before any
    #: transport reads them
    segment_fields: ClassVar[dict[str, Field]] = {}
    buffer_fields: ClassVar[dict[str, Field]] = {}
    #: the configuration rows it reads (:class:`mooncake.options.Option`, ``owner`` = its
    #: name): :func:`mooncake.config.all_options` gathers them through the registry
    options: ClassVar[tuple[Option, ...]] = ()
    #: a bool option of its own that, when true, makes the engine install this transport only
    #: (``MC_FORCE_TCP``)
    forced_by: ClassVar[str] = ""

    @classmethod
    def check_config(cls, values: Mapping[str, Any], sources: Mapping[str, str],
                     warn: Callable[[str], None]) -> None:
        """Cross-check its options once every option is resolved: raise
        :class:`~mooncake.errors.ConfigError` for an impossible combination, ``warn`` about a
        suspicious one."""

    @classmethod
    def describe(cls) -> str:
        """How it was built and what it found here, for ``mooncake transports`` (whether or not
        it can run)."""
        return ""

    @classmethod
    def probe(cls) -> str | None:
        """Why this transport cannot run on this machine, or None when it can."""
        return None

    def __init__(self, ctx: TransportContext) -> None:
        self.ctx = ctx
        cfg = ctx.config
        self.slice_size: int = cfg["MC_SLICE_SIZE"]
        self.fragment_ratio: int = cfg["MC_FRAGMENT_RATIO"]

    def start(self) -> dict:
        """Open listeners/devices; return segment-level fields peers need."""
        return {}

    def register(self, region: Region) -> dict | None:
        """Prepare a newly registered region; return per-buffer fields to publish."""
        return None

    def unregister(self, region: Region) -> None:
        """Forget a region before its memory may be freed.  The engine has already revoked it
        and waited for every local task and served request pinning it; return only once
        nothing this transport started (or lets peers do, e.g. mapped access) can touch it."""

    def can_reach(self, peer: SegmentDesc) -> str | None:
        """None when this transport can move data to/from ``peer``, else the reason why not."""
        return None if self.name in peer.transports else f"peer does not publish {self.name!r}"

    def explain(self, peer: SegmentDesc, local: int | None = None,
                remote: int | None = None) -> dict:
        """How a transfer from ``local`` to ``remote`` would travel to ``peer`` (the NICs or
        lanes it would use and the rule that chose them); {} when there is nothing to say."""
        return {}

    def rails(self) -> list[dict]:
        """Per-rail counters (e.g. rdma's NIC pairs): dicts with ``local``, ``peer``,
        ``remote``, ``completions``, ``errors``, ``pauses``, ``paused``; [] for none."""
        return []

    def submit(self, peer: SegmentDesc, slices: Slices) -> None:
        """Start moving ``slices``; report every slice through the batch table.  Must not block
        for long; must report every slice exactly once (failures included)."""
        raise NotImplementedError

    def transfer(self, peer: SegmentDesc, slices: Slices, timeout: float) -> bool:
        """Move ``slices`` and wait for them; False on timeout.  Transports may override this with
        a faster synchronous path."""
        self.submit(peer, slices)
        return slices.batch.wait(timeout)

    def abort(self, peer: SegmentDesc) -> None:
        """Cut the connections to ``peer`` that still hold work, so every slice on them ends
        (called when a cancelled batch's slices did not end within the grace period: the peer
        stopped answering).  Work of batches that were not cancelled may be re-posted on fresh
        connections instead of failed."""

    def close(self) -> None:
        """Release every resource; in-flight slices end FAILED."""

"""Hosts made of network namespaces: N namespaces on one bridge, addresses 10.77.<k>.<i>/24.

``Net(3).up()`` makes namespaces ``mc<id>h0..2``, a bridge and one veth pair per host (``eth0``
inside), brings up ``lo`` and ``eth0``, and gives the bridge ``.254`` so the test process can reach
every host.  ``down()`` kills the processes it started and removes everything it made; it is
safe to call twice and after a half-finished ``up()``.  Faults: ``netem()`` (tc netem: delay,
loss, reordering — when the kernel has sch_netem), ``drop()`` (nftables random loss),
``rate()`` (tc tbf), ``link()`` (carrier up/down).  Everything needs root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Net", "Host", "why_no_netns", "why_no_netem", "why_no_nft"]


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def why_no_netns() -> str | None:
    """Why this process cannot make namespaces here, or None."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN/CAP_SYS_ADMIN) to create network namespaces"
    if shutil.which("ip") is None:
        return "the `ip` command is missing (apt-get install iproute2)"
    name = f"mcprobe{os.getpid()}"
    r = _run(["ip", "netns", "add", name], check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    _run(["ip", "netns", "del", name], check=False)
    return None


def why_no_netem() -> str | None:
    """Why ``tc ... netem`` cannot run here (e.g. a kernel built without sch_netem), or None."""
    if shutil.which("tc") is None:
        return "the `tc` command is missing (apt-get install iproute2)"
    name = f"mcprobe{os.getpid()}"
    _run(["ip", "netns", "add", name])
    try:
        r = _run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root",
                  "netem", "delay", "1ms"], check=False)
        if r.returncode != 0:
            return f"tc netem unavailable ({r.stderr.strip()}: kernel lacks sch_netem?)"
        return None
    finally:
        _run(["ip", "netns", "del", name], check=False)


def why_no_nft() -> str | None:
    if shutil.which("nft") is None:
        return "the `nft` command is missing (apt-get install nftables)"
    return None


@dataclass
class Host:
    """One namespace: ``ns`` name, ``ip`` address, ``veth`` (root side) and ``dev`` (inside)."""

    ns: str
    ip: str
    veth: str
    dev: str = "eth0"
    procs: list[subprocess.Popen] = field(default_factory=list)

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(self.argv(*cmd), check=check)

    def popen(self, cmd: list[str], **kw: object) -> subprocess.Popen:
        """Start ``cmd`` inside this host; ``Net.down()`` kills it if still running."""
        p = subprocess.Popen(self.argv(*cmd), start_new_session=True, **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p


def _free_subnet() -> int:
    used = _run(["ip", "-o", "-4", "addr", "show"]).stdout
    for k in [0, *range(1, 250)]:
        if f" 10.77.{k}." not in used:
            return k
    raise RuntimeError("no free 10.77.k.0/24 subnet")


class Net:
    """``n`` hosts on a bridge.  Use as ``with Net(3) as net: net.hosts[0].popen([...])``."""

    def __init__(self, n: int = 3) -> None:
        self.id = uuid.uuid4().hex[:6]
        self.bridge = f"mcbr{self.id}"
        self.k = -1
        self.hosts: list[Host] = []
        self.n = n
        self._nft: set[str] = set()

    def up(self) -> Net:
        try:
            self.k = _free_subnet()
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "addr", "add", f"10.77.{self.k}.254/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            for i in range(self.n):
                h = Host(f"mc{self.id}h{i}", f"10.77.{self.k}.{i + 1}", f"mcv{self.id}{i}")
                self.hosts.append(h)
                _run(["ip", "netns", "add", h.ns])
                _run(["ip", "link", "add", h.veth, "type", "veth", "peer", "name",
                      f"mcp{self.id}{i}"])
                _run(["ip", "link", "set", f"mcp{self.id}{i}", "netns", h.ns])
                h.run("ip", "link", "set", f"mcp{self.id}{i}", "name", h.dev)
                h.run("ip", "addr", "add", f"{h.ip}/24", "dev", h.dev)
                h.run("ip", "link", "set", h.dev, "up")
                h.run("ip", "link", "set", "lo", "up")
                _run(["ip", "link", "set", h.veth, "master", self.bridge])
                _run(["ip", "link", "set", h.veth, "up"])
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for h in self.hosts:
            for p in h.procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
            h.procs.clear()
        for h in self.hosts:
            _run(["ip", "netns", "del", h.ns], check=False)  # takes its veth end along
            _run(["ip", "link", "del", h.veth], check=False)
        _run(["ip", "link", "del", self.bridge], check=False)
        self.hosts = []

    def __enter__(self) -> Net:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def leftovers(self) -> list[str]:
        """Names this Net made that still exist (for tests of the cleanup itself)."""
        out = _run(["ip", "netns", "list"]).stdout + _run(["ip", "-o", "link"]).stdout
        return sorted({w for w in out.replace(":", " ").replace("@", " ").split()
                       if self.id in w})

    # -- faults ------------------------------------------------------------------------------
    def netem(self, host: Host, spec: str) -> None:
        """``tc qdisc replace dev eth0 root netem <spec>`` inside ``host`` (egress)."""
        host.run("tc", "qdisc", "replace", "dev", host.dev, "root", "netem", *spec.split())

    def rate(self, host: Host, rate: str = "20mbit", burst: str = "32kbit",
             latency: str = "400ms") -> None:
        """Token-bucket rate limit on ``host``'s egress (``tc tbf``)."""
        host.run("tc", "qdisc", "replace", "dev", host.dev, "root", "tbf", "rate", rate,
                 "burst", burst, "latency", latency)

    def clear_qdisc(self, host: Host) -> None:
        host.run("tc", "qdisc", "del", "dev", host.dev, "root", check=False)

    def drop(self, host: Host, percent: int) -> None:
        """Drop ``percent``% of ``host``'s outgoing TCP packets at random (nftables)."""
        host.run("nft", "add", "table", "inet", "mcfault")
        host.run("nft", "add chain inet mcfault out { type filter hook output priority 0 ; }")
        host.run("nft", f"add rule inet mcfault out meta l4proto tcp numgen random mod 100 "
                        f"< {int(percent)} drop")
        self._nft.add(host.ns)

    def clear_drop(self, host: Host) -> None:
        host.run("nft", "delete", "table", "inet", "mcfault", check=False)
        self._nft.discard(host.ns)

    def link(self, host: Host, up: bool) -> None:
        """Take ``host``'s link down (its packets vanish) or back up, from the bridge side."""
        _run(["ip", "link", "set", host.veth, "up" if up else "down"])


@contextlib.contextmanager
def hosts(n: int = 3) -> Iterator[Net]:
    """``with hosts(3) as net:`` — made on entry, removed on exit (even on failure)."""
    net = Net(n)
    try:
        yield net.up()
    finally:
        net.down()


if __name__ == "__main__":  # `python tests/netns.py` : can this machine make namespaces?
    print(why_no_netns() or "netns: ok", why_no_netem() or "netem: ok", why_no_nft() or "nft: ok",
          sep="\n")
    sys.exit(0)

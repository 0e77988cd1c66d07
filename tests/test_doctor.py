"""``mooncake doctor``: the seed's production checklist, run as ``python -m mooncake doctor``.

* On the two fixture trees (tests/data/sysfs): the healthy 8-GPU box exits 0 with the seed's
  settings and 1 with the defaults (Relaxed Ordering off on a GPU host); copies of the trees
  broken one thing at a time give the finding, severity, troubleshooting row, fix and exit
  status each implies: a DOWN or INIT port (2), no huge pages while MC_STORE_USE_HUGEPAGE=1
  (2), a low memlock limit (1), a RoCE v1 or empty GID index (1 / 2), an MTU below MC_MTU (1),
  a NIC's PCIe link below its capability (1), Relaxed Ordering disabled in a NIC's config space
  (1), no cluster token on a routable address (1), a bad option value (2).
* On this machine's real sysfs/procfs: every check runs and the exit status is the worst
  severity; the memlock limit read is the process's own (lowered in the child to prove it).
* ``--peer``: against a real engine in another process (mooncake.testing.peer.Peer, tcp, on
  127.0.0.1): probe, route, and a checksummed write+read that leaves the peer's bytes as they
  were; an unreachable segment is an error.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mooncake import doctor as D

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HGX8, CPU2S = HERE / "data" / "sysfs" / "hgx8", HERE / "data" / "sysfs" / "cpu2s"
SEED = ROOT.parent / "shared" / "seed" / "000_34b6f3e8dd72c2ae.txt"
#: the seed's high-throughput settings that matter here, and a token
GOOD = {"MC_CLUSTER_TOKEN": "t0ken", "MC_IB_PCI_RELAXED_ORDERING": "1"}
HOST = "10.4.0.11"  # a routable address of the fixture box (nothing binds to it)


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MC_") and k != "NCCL_IB_GID_INDEX"}
    env.update(extra or {})
    return env


def doctor(*args: str, env: dict | None = None, preexec=None, as_json: bool = True):
    """``(exit status, JSON report or text)`` of ``python -m mooncake doctor``."""
    r = subprocess.run([sys.executable, "-m", "mooncake", "doctor",
                        *(["--json"] if as_json else []), *args],
                       capture_output=True, text=True, cwd=ROOT, env=_env(env), timeout=60,
                       preexec_fn=preexec)
    assert r.returncode in (0, 1, 2), r.stderr
    if not as_json:
        return r.returncode, r.stdout
    rep = json.loads(r.stdout)
    assert rep["exit_status"] == r.returncode
    return r.returncode, rep


def find(rep: dict, check: str, subject: str | None = None) -> list[dict]:
    return [f for f in rep["findings"] if f["check"] == check
            and (subject is None or f["subject"] == subject)]


def one(rep: dict, check: str, subject: str | None = None) -> dict:
    got = find(rep, check, subject)
    assert len(got) == 1, (check, subject, got)
    return got[0]


def worst(rep: dict, exclude: tuple[str, ...] = ()) -> set[str]:
    return {(f["check"], f["subject"]) for f in rep["findings"]
            if f["severity"] in ("warn", "error") and f["check"] not in exclude}


@pytest.fixture
def tree(tmp_path):
    """A writable copy of a fixture tree."""
    def copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst, symlinks=True)
        return dst
    return copy


# ---- the seed's rows -----------------------------------------------------------------------------


def test_rows_are_the_seeds_troubleshooting_table():
    assert len(D.ROWS) == 7
    if not SEED.exists():
        pytest.skip(f"{SEED} not present")
    text = SEED.read_text(encoding="utf-8")
    table = text[text.index("12.12.3"):]
    for english, (zh, _cause, _check) in D.ROWS.items():
        assert f"| {zh} |" in table, english


# ---- the healthy 8-GPU box -----------------------------------------------------------------------


def test_hgx8_with_the_seeds_settings_is_healthy():
    rc, rep = doctor("--root", str(HGX8), "--host", HOST, env=GOOD)
    assert rc == 0, worst(rep)
    assert rep["summary"]["warn"] == rep["summary"]["error"] == 0
    ports = find(rep, "rdma.port")
    assert len(ports) == 8 and {f["severity"] for f in ports} == {"ok"}
    for i in range(8):
        g = one(rep, "rdma.gid", f"mlx5_bond_{i} port 1")
        assert g["severity"] == "ok" and g["data"]["auto_index"] == 3
        assert f"10.{i}.0.11" in g["seen"] and g["checklist"].startswith("2.")
        m = one(rep, "rdma.mtu", f"mlx5_bond_{i} port 1")
        assert m["severity"] == "ok" and m["data"]["active_mtu"] == 4096
    for i, bond in enumerate((4, 5, 6, 7, 0, 1, 2, 3)):
        p = one(rep, "gpu.nic_path", f"cuda:{i}")
        assert p["severity"] == "ok"
        assert p["data"]["nearest"] == [f"mlx5_bond_{bond}"] and p["data"]["class"] == "PIX"
    assert one(rep, "gpu.peer_memory")["severity"] == "ok"
    assert one(rep, "memory.memlock")["severity"] == "ok"
    assert {f["severity"] for f in find(rep, "net.sysctl")} == {"ok"}
    assert one(rep, "security.cluster_token")["severity"] == "ok"
    assert one(rep, "memory.hugepages")["severity"] == "info"  # reserved, but not asked for
    layout = one(rep, "numa.layout")["data"]
    assert layout["0"]["nics"] == [f"mlx5_bond_{i}" for i in (4, 5, 6, 7)]
    assert layout["1"]["gpus"] == [f"cuda:{i}" for i in (4, 5, 6, 7)]
    assert rep["topology"]["gpu_nic"]["cuda:0"]["mlx5_bond_6"] == "NODE"
    assert [n["name"] for n in rep["tent_topology"]["nics"]][:1] == ["mlx5_bond_0"]
    assert "transports" not in {f["check"] for f in rep["findings"]}  # not this host's


def test_hgx8_defaults_warn_about_relaxed_ordering_and_the_token():
    rc, rep = doctor("--root", str(HGX8), "--host", HOST)
    assert rc == 1
    assert worst(rep) == {("pcie.relaxed_ordering", "MC_IB_PCI_RELAXED_ORDERING"),
                          ("security.cluster_token", f"host {HOST}")}
    ro = one(rep, "pcie.relaxed_ordering")
    assert ro["row"] == "GPU Direct throughput low"
    assert "MC_IB_PCI_RELAXED_ORDERING=1" in ro["fix"]
    tok = one(rep, "security.cluster_token")
    assert "MC_CLUSTER_TOKEN" in tok["fix"] and "not loopback" in tok["seen"]
    rc, rep = doctor("--root", str(HGX8), "--host", "127.0.0.1",
                     env={"MC_IB_PCI_RELAXED_ORDERING": "2"})
    assert rc == 0 and one(rep, "security.cluster_token")["severity"] == "ok"


def test_human_output_is_aligned_text():
    rc, text = doctor("--root", str(HGX8), "--host", HOST, as_json=False)
    assert rc == 1
    lines = text.splitlines()
    rows = [ln for ln in lines if ln.split(" ", 1)[0] in ("OK", "INFO", "WARN", "ERROR")]
    assert len(rows) > 40
    cols = {ln.index(ln.split()[1]) for ln in rows}  # the check column starts in one place
    assert len(cols) == 1
    assert any(ln.strip().startswith("fix: export MC_IB_PCI_RELAXED_ORDERING=1") for ln in lines)
    assert any('seed 12.12.3: "GPU Direct throughput low"' in ln for ln in lines)
    header = next(i for i, ln in enumerate(lines) if ln.startswith("PCI paths"))
    assert lines[header + 1].split() == [f"mlx5_bond_{i}" for i in range(8)]
    assert lines[header + 2].split() == ["cuda:0", "SYS", "SYS", "SYS", "SYS", "PIX", "PXB",
                                         "NODE", "NODE"]
    assert lines[-1].endswith("(exit status 1)")


def test_render_in_process_plain_or_rich():
    rep = D.run(str(CPU2S), host="127.0.0.1", env={})
    assert rep.exit_status == 1 and rep.summary()["warn"] == 5
    for rich in (False, True):  # rich's table when rich is installed, else the plain text
        text = D.render(rep, rich=rich)
        assert "mooncake doctor" in text and text.rstrip().endswith("(exit status 1)")
        assert "rxe1" in text and "cpu:0" in text


# ---- one thing broken at a time ------------------------------------------------------------------


def test_down_port_is_an_error(tree):
    root = tree(HGX8)
    port = root / "sys/class/infiniband/mlx5_bond_2/ports/1"
    (port / "state").write_text("1: DOWN\n")
    (port / "phys_state").write_text("3: Disabled\n")
    rc, rep = doctor("--root", str(root), "--host", HOST, env=GOOD)
    assert rc == 2
    assert worst(rep) == {("rdma.port", "mlx5_bond_2 port 1")}
    f = one(rep, "rdma.port", "mlx5_bond_2 port 1")
    assert f["severity"] == "error" and f["seen"].startswith("DOWN, Disabled")
    assert f["row"] == "Frequent transfer timeouts" and "ip link set bond2 up" in f["fix"]
    assert f["checklist"].startswith("1.")


def test_init_port_needs_a_subnet_manager(tree):
    root = tree(CPU2S)
    (root / "sys/class/infiniband/mlx5_0/ports/1/state").write_text("2: INIT\n")
    rc, rep = doctor("--root", str(root), "--host", "127.0.0.1")
    assert rc == 2
    f = one(rep, "rdma.port", "mlx5_0 port 1")
    assert f["severity"] == "error" and "opensm" in f["fix"]


def test_missing_port_selected_by_mc_ib_port():
    rc, rep = doctor("--root", str(CPU2S), "--host", "127.0.0.1", env={"MC_IB_PORT": "2"})
    assert rc == 2
    assert {f["subject"] for f in find(rep, "rdma.port") if f["severity"] == "error"} == \
        {"mlx5_0 port 2", "mlx5_1 port 2", "rxe0 port 2", "rxe1 port 2"}


def test_hugepages_required_but_missing(tree):
    rc, rep = doctor("--root", str(CPU2S), "--host", "127.0.0.1",
                     env={"MC_STORE_USE_HUGEPAGE": "1"})
    assert rc == 2
    f = one(rep, "memory.hugepages")
    assert f["severity"] == "error" and "no free 2 MiB pages" in f["seen"]
    assert "nr_hugepages" in f["fix"] and f["checklist"].startswith("4.")
    # the 8-GPU box has 4096 x 2 MiB reserved, but no 1 GiB page
    rc, rep = doctor("--root", str(HGX8), "--host", HOST, env={**GOOD,
                                                              "MC_STORE_USE_HUGEPAGE": "1"})
    assert rc == 0 and one(rep, "memory.hugepages")["severity"] == "ok"
    assert "4096 free 2 MiB pages (8 GiB)" in one(rep, "memory.hugepages")["seen"]
    rc, rep = doctor("--root", str(HGX8), "--host", HOST, env={
        **GOOD, "MC_STORE_USE_HUGEPAGE": "1", "MC_STORE_HUGEPAGE_SIZE": "1GB"})
    assert rc == 2 and one(rep, "memory.hugepages")["severity"] == "error"
    root = tree(HGX8)
    shutil.rmtree(root / "sys/kernel/mm/hugepages/hugepages-1048576kB")
    rc, rep = doctor("--root", str(root), "--host", HOST, env={
        **GOOD, "MC_STORE_USE_HUGEPAGE": "1", "MC_STORE_HUGEPAGE_SIZE": "1GB"})
    assert rc == 2 and "offers no 1 GiB huge pages" in one(rep, "memory.hugepages")["seen"]


def test_low_memlock_on_an_rdma_host(tree):
    root = tree(HGX8)
    limits = root / "proc/self/limits"
    limits.write_text(limits.read_text().replace("unlimited            unlimited",
                                                 "65536                65536"))
    rc, rep = doctor("--root", str(root), "--host", HOST, env=GOOD)
    assert rc == 1
    assert worst(rep) == {("memory.memlock", "memlock")}
    f = one(rep, "memory.memlock")
    assert f["data"] == {"soft": 65536, "hard": 65536, "cap_ipc_lock": False}
    assert "64 KiB" in f["seen"] and "ulimit -l unlimited" in f["fix"]
    # CAP_IPC_LOCK lifts the limit
    status = root / "proc/self/status"
    status.write_text(status.read_text().replace("CapEff:\t0000000000000000",
                                                 "CapEff:\t0000000000004000"))
    rc, rep = doctor("--root", str(root), "--host", HOST, env=GOOD)
    assert rc == 0 and one(rep, "memory.memlock")["severity"] == "ok"


def test_memlock_of_this_process_is_what_getrlimit_says():
    def low():
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (65536, 65536))

    rc, rep = doctor("--host", "127.0.0.1", preexec=low)
    f = one(rep, "memory.memlock")
    assert f["data"]["soft"] == 65536 and f["data"]["hard"] == 65536
    if f["data"]["cap_ipc_lock"]:
        assert f["severity"] == "ok"
    else:
        assert f["severity"] == ("warn" if rep["topology"]["rdma_devices"] else "info")


def test_gid_index_checks():
    rc, rep = doctor("--root", str(HGX8), "--host", HOST, env={**GOOD, "MC_GID_INDEX": "2"})
    assert rc == 1
    f = one(rep, "rdma.gid", "mlx5_bond_0 port 1")
    assert f["severity"] == "warn" and "RoCE v1" in f["seen"] and "MC_GID_INDEX=3" in f["fix"]
    rc, rep = doctor("--root", str(HGX8), "--host", HOST, env={**GOOD, "MC_GID_INDEX": "6"})
    assert rc == 2
    f = one(rep, "rdma.gid", "mlx5_bond_7 port 1")
    assert f["severity"] == "error" and "slot is empty" in f["seen"]
    assert f["row"] == "Frequent transfer timeouts"
    rc, rep = doctor("--root", str(CPU2S), "--host", "127.0.0.1")
    assert one(rep, "rdma.gid", "mlx5_0 port 1")["data"]["auto_index"] == 0
    assert one(rep, "rdma.gid", "rxe0 port 1")["data"]["auto_index"] == 1
    f = one(rep, "rdma.gid", "rxe1 port 1")  # link-local only
    assert f["severity"] == "warn" and "IPv4" in f["fix"]


def test_mtu_checks():
    rc, rep = doctor("--root", str(CPU2S), "--host", "127.0.0.1")
    f = one(rep, "rdma.mtu", "rxe0 port 1")
    assert f["severity"] == "warn" and f["row"] == "Throughput far below line rate"
    assert "path MTU 1024" in f["seen"] and "ip link set dev eno1 mtu 9000" in f["fix"]
    assert one(rep, "rdma.mtu", "mlx5_1 port 1")["severity"] == "ok"
    assert one(rep, "rdma.mtu", "mlx5_0 port 1")["severity"] == "info"  # IB: unknown
    rc, rep = doctor("--root", str(HGX8), "--host", HOST, env={**GOOD, "MC_MTU": "1024"})
    assert rc == 0
    f = one(rep, "rdma.mtu", "mlx5_bond_0 port 1")
    assert f["severity"] == "info" and "path MTU 1024" in f["seen"]


def test_cpu2s_findings():
    rc, rep = doctor("--root", str(CPU2S), "--host", "127.0.0.1")
    assert rc == 1
    assert worst(rep) == {("rdma.mtu", "rxe0 port 1"), ("rdma.mtu", "rxe1 port 1"),
                          ("rdma.gid", "rxe1 port 1"), ("rdma.link_layer", "RDMA devices"),
                          ("memory.memlock", "memlock")}
    assert {f["severity"] for f in find(rep, "net.sysctl")} == {"info"}  # RDMA carries data
    assert one(rep, "gpu.devices")["severity"] == "info"
    assert one(rep, "pcie.relaxed_ordering")["severity"] == "info"  # no GPU here
    assert "rxe1" in one(rep, "rdma.devices")["seen"]
    # the same box without RDMA in use: the TCP buffers matter
    rc, rep = doctor("--root", str(CPU2S), "--host", "127.0.0.1",
                     env={"MC_TE_FILTERS": "nosuchdev"})
    assert rc == 2
    assert one(rep, "rdma.filter", "RDMA devices")["severity"] == "error"
    assert {f["severity"] for f in find(rep, "net.sysctl")} == {"warn"}
    assert one(rep, "net.sysctl", "net.core.rmem_max")["fix"] == \
        "sysctl -w net.core.rmem_max=16777216 (root; /etc/sysctl.d/ to keep it)"


def test_degraded_pcie_link_and_unknown_numa(tree):
    root = tree(HGX8)
    pf = Path(os.path.realpath(root / "sys/class/infiniband/mlx5_bond_4/device"))
    (pf / "current_link_width").write_text("8\n")
    (pf / "numa_node").write_text("-1\n")
    rc, rep = doctor("--root", str(root), "--host", HOST, env=GOOD)
    assert rc == 1
    assert worst(rep) == {("pcie.link", "mlx5_bond_4"), ("numa.nic", "mlx5_bond_4")}
    f = one(rep, "pcie.link", "mlx5_bond_4")
    assert "x8 (capable of 32.0 GT/s PCIe x16)" in f["seen"]
    assert f["row"] == "Throughput far below line rate"
    assert one(rep, "numa.nic")["row"] == "Tail latency abnormally high"


def _config_space(relaxed: bool) -> bytes:
    cfg = bytearray(256)
    cfg[0x06], cfg[0x34] = 0x10, 0x40
    cfg[0x40:0x42] = bytes([0x10, 0x00])  # PCI Express capability
    cfg[0x48:0x4A] = (0x2810 if relaxed else 0x2800).to_bytes(2, "little")
    return bytes(cfg)


def test_relaxed_ordering_from_config_space(tree):
    root = tree(HGX8)
    for i in range(8):
        pf = Path(os.path.realpath(root / f"sys/class/infiniband/mlx5_bond_{i}/device"))
        (pf / "config").write_bytes(_config_space(relaxed=i != 5))
    rc, rep = doctor("--root", str(root), "--host", HOST, env=GOOD)
    assert rc == 1
    f = one(rep, "pcie.relaxed_ordering")
    assert f["severity"] == "warn" and "RlxdOrd-: mlx5_bond_5" in f["seen"]
    assert f["data"]["devices"]["mlx5_bond_5"] is False
    assert f["data"]["devices"]["mlx5_bond_0"] is True
    pf = Path(os.path.realpath(root / "sys/class/infiniband/mlx5_bond_5/device"))
    (pf / "config").write_bytes(_config_space(relaxed=True))
    rc, rep = doctor("--root", str(root), "--host", HOST, env=GOOD)
    assert rc == 0 and one(rep, "pcie.relaxed_ordering")["severity"] == "ok"


def test_configuration_findings(tmp_path):
    rc, rep = doctor("--root", str(HGX8), "--host", HOST,
                     env={**GOOD, "MC_DISABLE_METACACHE": "1"})
    assert rc == 1 and one(rep, "config.metacache")["row"] == "Slow connection setup"
    rc, rep = doctor("--root", str(HGX8), "--host", HOST,
                     env={**GOOD, "MC_MAX_CQE_PER_CTX": "256", "MC_MAX_WR": "512"})
    assert rc == 1 and one(rep, "config.cq_depth")["row"] == "Tail latency abnormally high"
    rc, rep = doctor("--root", str(HGX8), "--host", HOST,
                     env={**GOOD, "MC_SLICE_SIZ": "5", "MC_STORE_MEMCPY": "0"})
    assert rc == 1
    assert "MC_SLICE_SIZE" in one(rep, "config.note")["seen"]  # a likely typo
    assert one(rep, "config.inert", "MC_STORE_MEMCPY")["severity"] == "info"  # Store-only
    rc, rep = doctor("--root", str(HGX8), "--host", HOST, env={**GOOD, "MC_MTU": "1000"})
    assert rc == 2 and "MC_MTU" in one(rep, "config.load")["seen"]
    rc, rep = doctor("--root", str(HGX8), "--host", HOST,
                     env={"MC_CLUSTER_TOKEN_FILE": str(tmp_path / "missing")})
    assert rc == 2 and one(rep, "security.cluster_token")["severity"] == "error"


# ---- this machine --------------------------------------------------------------------------------


def test_this_machine():
    rc, rep = doctor("--host", "127.0.0.1")
    checks = {f["check"] for f in rep["findings"]}
    assert {"rdma.devices", "numa.layout", "gpu.devices", "memory.hugepages", "memory.memlock",
            "net.sysctl", "security.cluster_token", "transports"} <= checks
    assert rc == max(D.EXIT[f["severity"]] for f in rep["findings"])
    for f in rep["findings"]:
        assert f["severity"] in D.SEVERITIES and (f["row"] is None or f["row"] in D.ROWS)
    if not rep["topology"]["rdma_devices"]:
        assert "no RDMA devices" in one(rep, "rdma.devices")["seen"]
    else:  # e.g. rxe0 in the Soft-RoCE VM: every port is judged
        assert len(find(rep, "rdma.port")) >= len(rep["topology"]["rdma_devices"])
    for name in ("net.core.rmem_max", "net.ipv4.tcp_wmem"):
        with open("/proc/sys/" + name.replace(".", "/")) as fh:
            assert one(rep, "net.sysctl", name)["data"]["value"] == " ".join(fh.read().split())
    rc2, text = doctor("--host", "127.0.0.1", as_json=False)
    assert rc2 == rc and text.splitlines()[-1].endswith(f"(exit status {rc})")


# ---- --peer --------------------------------------------------------------------------------------


def test_peer_probe_and_checked_roundtrip(peer):  # conftest's tcp peer
    addr = peer.alloc(1 << 20, seed=7)
    before = peer.sha(addr, 1 << 20)
    try:
        rc, rep = doctor("--host", "127.0.0.1", "--peer", peer.segment, "--write")
        assert one(rep, "peer.probe")["severity"] == "ok"
        route = one(rep, "peer.route")
        assert route["severity"] == "ok" and route["data"]["chosen"] == "tcp"
        f = one(rep, "peer.transfer", f"{peer.segment} via tcp")
        assert f["severity"] == "ok", f
        assert "write+read 1 MiB" in f["seen"] and "equal" in f["seen"]
        assert "restored" in f["seen"]
        assert peer.sha(addr, 1 << 20) == before  # the peer's bytes are as they were
        rc, rep = doctor("--host", "127.0.0.1", "--peer", peer.segment)  # read only
        f = one(rep, "peer.transfer", f"{peer.segment} via tcp")
        assert f["severity"] == "ok" and "no write" in f["seen"]
    finally:
        peer.free(addr)


def test_unreachable_peer_is_an_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    rc, rep = doctor("--host", "127.0.0.1", "--peer", f"127.0.0.1:{port}")
    assert rc == 2
    f = one(rep, "peer.probe")
    assert f["severity"] == "error" and f["row"] == "Frequent transfer timeouts"
    assert not find(rep, "peer.transfer")

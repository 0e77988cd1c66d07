"""mooncake.topology and ``python -m mooncake.transfer_engine_topology_dump``.

* Two real server layouts as sysfs/procfs fixture trees (tests/data/sysfs, written by
  make_fixtures.py; a test regenerates them and compares, so they never drift from the
  script): the seed's 8-GPU/8-NIC 2-socket box (section 12.10.1) and a 2-socket CPU node with
  an InfiniBand and a RoCE NIC plus two Soft-RoCE devices.  Asserted exactly: NCCL's path class
  of every GPU/NUMA node and NIC pair, NIC NUMA nodes and PCI addresses, the GID index the auto
  pick uses, the RoCE active MTU, soft devices resolved through their netdev, TENT's topology
  JSON and the classic priority matrix.
* The path classifier and the GID/MTU/config-space helpers on hand-made inputs.
* This machine's real sysfs: discovery works whatever is there (here: no RDMA device; in the
  Soft-RoCE VM: rxe0 on a virtual netdev), agrees with libibverbs' device list when the verbs
  module is built, and its JSON has TENT's shape.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mooncake import topology as T
from mooncake.errors import ConfigError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYSFS = HERE / "data" / "sysfs"
HGX8, CPU2S = SYSFS / "hgx8", SYSFS / "cpu2s"

sys.path.insert(0, str(SYSFS))
import make_fixtures  # noqa: E402


def _tree(root: Path) -> dict[str, tuple[str, str]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", p.read_text(encoding="utf-8"))
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
    return out


@pytest.mark.parametrize("layout", make_fixtures.LAYOUTS)
def test_committed_fixtures_match_the_generator(layout, tmp_path):
    fresh = make_fixtures.build(layout, tmp_path / layout)
    assert _tree(fresh) == _tree(SYSFS / layout), \
        f"tests/data/sysfs/{layout} is stale: run python tests/data/sysfs/make_fixtures.py"


def _matrix(text: str) -> dict[str, dict[str, str]]:
    """An ``nvidia-smi topo -m``-like table: a header (a label, the columns), then rows
    ``name class...``."""
    lines = [ln.split() for ln in text.strip().splitlines()]
    cols = lines[0][1:]
    return {r[0]: dict(zip(cols, r[1:], strict=True)) for r in lines[1:]}


# ---- the seed's 8-GPU box ------------------------------------------------------------------------

# each GPU shares a lower PCIe switch with one NIC (PIX), an upper switch with the next pair
# (PXB: three switches), its socket's other root complex (NODE), and nothing with the other
# socket (SYS); bonds 4-7 are on NUMA 0, bonds 0-3 on NUMA 1, as section 12.10.1 lists them
HGX8_GPU_NIC = {g: {f"mlx5_bond_{n}": c for n, c in row.items()} for g, row in _matrix("""
mlx5_bond_N  0    1    2    3    4    5    6    7
cuda:0  SYS  SYS  SYS  SYS  PIX  PXB  NODE NODE
cuda:1  SYS  SYS  SYS  SYS  PXB  PIX  NODE NODE
cuda:2  SYS  SYS  SYS  SYS  NODE NODE PIX  PXB
cuda:3  SYS  SYS  SYS  SYS  NODE NODE PXB  PIX
cuda:4  PIX  PXB  NODE NODE SYS  SYS  SYS  SYS
cuda:5  PXB  PIX  NODE NODE SYS  SYS  SYS  SYS
cuda:6  NODE NODE PIX  PXB  SYS  SYS  SYS  SYS
cuda:7  NODE NODE PXB  PIX  SYS  SYS  SYS  SYS
""").items()}
HGX8_NIC_PCI = {"mlx5_bond_0": "0000:9d:00.0", "mlx5_bond_1": "0000:a1:00.0",
                "mlx5_bond_2": "0000:bd:00.0", "mlx5_bond_3": "0000:c1:00.0",
                "mlx5_bond_4": "0000:1b:00.0", "mlx5_bond_5": "0000:1f:00.0",
                "mlx5_bond_6": "0000:3d:00.0", "mlx5_bond_7": "0000:41:00.0"}
HGX8_GPU_PCI = ["0000:1a:00.0", "0000:1e:00.0", "0000:3c:00.0", "0000:40:00.0",
                "0000:9c:00.0", "0000:a0:00.0", "0000:bc:00.0", "0000:c0:00.0"]


@pytest.fixture(scope="module")
def hgx8():
    return T.discover(str(HGX8))


@pytest.fixture(scope="module")
def cpu2s():
    return T.discover(str(CPU2S))


def test_hgx8_devices_numa_and_pci(hgx8):
    assert [d.name for d in hgx8.rdma_devices] == [f"mlx5_bond_{i}" for i in range(8)]
    for i, d in enumerate(hgx8.rdma_devices):
        assert d.kind == "pci" and d.driver == "mlx5_core" and d.note == ""
        assert d.pci_bus_id == HGX8_NIC_PCI[d.name]
        assert d.numa_node == (1 if i < 4 else 0)
        assert d.pci.root in ("pci0000:15", "pci0000:37", "pci0000:97", "pci0000:b7")
    assert [(n.id, len(n.cpus), n.cpulist) for n in hgx8.numa_nodes] == \
        [(0, 96, "0-47,96-143"), (1, 96, "48-95,144-191")]
    assert [(g.name, g.vendor, g.pci_bus_id, g.numa_node) for g in hgx8.gpus] == \
        [(f"cuda:{i}", "nvidia", HGX8_GPU_PCI[i], 0 if i < 4 else 1) for i in range(8)]


def test_hgx8_ports_gids_and_mtu(hgx8):
    for i, d in enumerate(hgx8.rdma_devices):
        [p] = d.ports
        assert (p.num, p.state, p.state_code, p.phys_state) == (1, "ACTIVE", 4, "LinkUp")
        assert p.link_layer == "Ethernet" and p.roce and p.rate_gbps == 400.0
        assert p.netdev == f"bond{i}" and f"bond{i}" in d.netdevs
        # four GIDs (link-local and IPv4, v1 and v2 each); the empty slots 4-7 are skipped
        assert [(g.index, g.type) for g in p.gids] == \
            [(0, "RoCE v1"), (1, "RoCE v2"), (2, "RoCE v1"), (3, "RoCE v2")]
        assert p.gid_index == 3  # the seed's "RoCEv2 usually uses GID index 3 (IPv4)"
        g = p.gid(3)
        assert g.ipv4 == f"10.{i}.0.11" and g.netdev == f"bond{i}"
        assert g.gid == f"0000:0000:0000:0000:0000:ffff:0a{i:02x}:000b"
        assert p.gid(0).gid.startswith("fe80:")
        # bond MTU 4200 - 96 bytes of RoCE headers >= 4096
        assert (p.netdev_mtu, p.active_mtu, p.mtu_source) == (4200, 4096, "netdev")
        assert (d.pci.link_speed, d.pci.link_width) == ("32.0 GT/s PCIe", 16)


def test_hgx8_gpu_nic_path_classes(hgx8):
    assert hgx8.gpu_nic_matrix() == HGX8_GPU_NIC
    assert [hgx8.nearest_nics(g) for g in hgx8.gpus] == \
        [[f"mlx5_bond_{b}"] for b in (4, 5, 6, 7, 0, 1, 2, 3)]


def test_hgx8_numa_and_nic_path_classes(hgx8):
    on0 = {f"mlx5_bond_{i}" for i in (4, 5, 6, 7)}
    assert hgx8.numa_nic_matrix() == {
        0: {n: "PHB" if n in on0 else "SYS" for n in HGX8_NIC_PCI},
        1: {n: "SYS" if n in on0 else "PHB" for n in HGX8_NIC_PCI}}
    m = hgx8.nic_nic_matrix()
    assert m["mlx5_bond_4"]["mlx5_bond_4"] == "X"
    assert m["mlx5_bond_4"]["mlx5_bond_5"] == "PXB"  # same root complex, different lower switch
    assert m["mlx5_bond_4"]["mlx5_bond_6"] == "NODE"
    assert m["mlx5_bond_4"]["mlx5_bond_0"] == "SYS"


def _check_tent_shape(j: dict) -> None:
    assert set(j) == {"nics", "mems"}
    for n in j["nics"]:
        assert set(n) == {"name", "pci_bus_id", "type", "numa_node"}
        assert n["type"] == T.NIC_RDMA and isinstance(n["numa_node"], int)
        assert n["pci_bus_id"] == "" or re.fullmatch(r"[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.\d",
                                                     n["pci_bus_id"])
    assert j["mems"][0]["name"] == "*"
    for m in j["mems"]:
        assert set(m) == {"name", "pci_bus_id", "type", "numa_node", "device_list"}
        assert set(m["device_list"]) == {"rank0", "rank1", "rank2"}
        ids = [i for r in m["device_list"].values() for i in r]
        assert sorted(ids) == list(range(len(j["nics"]))), m  # every NIC in exactly one tier
    assert json.loads(json.dumps(j)) == j


def test_hgx8_tent_json(hgx8):
    j = hgx8.to_tent_json()
    _check_tent_shape(j)
    idx = {n["name"]: i for i, n in enumerate(j["nics"])}
    assert [n["name"] for n in j["nics"]] == list(HGX8_NIC_PCI)
    assert [n["pci_bus_id"] for n in j["nics"]] == list(HGX8_NIC_PCI.values())
    assert [m["name"] for m in j["mems"]] == ["*", "cpu:0", "cpu:1",
                                               *(f"cuda:{i}" for i in range(8))]
    mems = {m["name"]: m for m in j["mems"]}
    on0 = [idx[f"mlx5_bond_{i}"] for i in (4, 5, 6, 7)]
    on1 = [idx[f"mlx5_bond_{i}"] for i in (0, 1, 2, 3)]
    assert mems["*"]["device_list"] == {"rank0": [], "rank1": [], "rank2": list(range(8))}
    assert mems["cpu:0"] == {"name": "cpu:0", "pci_bus_id": "", "type": T.MEM_HOST,
                             "numa_node": 0,
                             "device_list": {"rank0": sorted(on0), "rank1": [],
                                             "rank2": sorted(on1)}}
    # cuda:0: its PIX NIC, then the rest of NUMA 0, then NUMA 1 (TENT's cuda_probe tiers)
    assert mems["cuda:0"] == {"name": "cuda:0", "pci_bus_id": "0000:1a:00.0",
                              "type": T.MEM_CUDA, "numa_node": 0,
                              "device_list": {"rank0": [idx["mlx5_bond_4"]],
                                              "rank1": sorted(set(on0) - {idx["mlx5_bond_4"]}),
                                              "rank2": sorted(on1)}}
    assert mems["cuda:4"]["device_list"]["rank0"] == [idx["mlx5_bond_0"]]
    pm = hgx8.to_priority_matrix()
    assert pm["cpu:1"] == [[f"mlx5_bond_{i}" for i in range(4)],
                           [f"mlx5_bond_{i}" for i in range(4, 8)]]
    assert pm["cuda:7"][0] == ["mlx5_bond_3"] and len(pm["cuda:7"][1]) == 7


def test_filtered_keeps_tent_indices_consistent(hgx8):
    sub = hgx8.filtered(["mlx5_bond_5", "mlx5_bond_0"])
    j = sub.to_tent_json()
    _check_tent_shape(j)
    assert [n["name"] for n in j["nics"]] == ["mlx5_bond_0", "mlx5_bond_5"]
    cuda0 = next(m for m in j["mems"] if m["name"] == "cuda:0")
    assert cuda0["device_list"] == {"rank0": [1], "rank1": [], "rank2": [0]}  # PXB, then SYS
    assert [d.name for d in hgx8.filtered(exclude=["mlx5_bond_0"]).rdma_devices][0] == \
        "mlx5_bond_1"


# ---- the 2-socket CPU node: InfiniBand, RoCE, Soft-RoCE ------------------------------------------


def test_cpu2s_devices(cpu2s):
    d = {x.name: x for x in cpu2s.rdma_devices}
    assert list(d) == ["mlx5_0", "mlx5_1", "rxe0", "rxe1"]
    ib, roce, rxe0, rxe1 = d.values()
    assert (ib.kind, ib.pci_bus_id, ib.numa_node, ib.netdevs) == \
        ("pci", "0000:01:00.0", 0, ["ib0"])
    [p] = ib.ports
    assert (p.link_layer, p.roce, p.lid, p.rate_gbps) == ("InfiniBand", False, 0x12, 200.0)
    assert [(g.index, g.type) for g in p.gids] == [(0, "IB")] and p.gid_index == 0
    assert p.active_mtu is None and p.mtu_source is None  # sysfs has no IB MTU
    assert (roce.kind, roce.pci_bus_id, roce.numa_node) == ("pci", "0000:81:00.0", 1)
    assert roce.ports[0].gid_index == 3 and roce.ports[0].gid(3).ipv4 == "192.168.1.20"
    assert roce.ports[0].active_mtu == 4096  # MTU 9000
    # soft devices follow their netdev: eno1 is a PCI function on NUMA 0, dummy0 is virtual
    assert (rxe0.kind, rxe0.pci_bus_id, rxe0.numa_node, rxe0.netdevs, rxe0.driver) == \
        ("soft", "0000:02:00.0", 0, ["eno1"], None)
    assert "eno1" in rxe0.note
    assert rxe0.ports[0].gid_index == 1 and rxe0.ports[0].gid(1).ipv4 == "10.1.0.5"
    assert rxe0.ports[0].active_mtu == 1024  # MTU 1500
    assert (rxe1.kind, rxe1.pci, rxe1.pci_bus_id, rxe1.numa_node) == ("soft", None, "", -1)
    assert "dummy0 is virtual" in rxe1.note
    assert rxe1.ports[0].gid_index == 0  # no IPv4: the only (link-local) RoCE v2 GID
    assert rxe1.ports[0].gid(0).ipv4 is None


def test_cpu2s_path_classes(cpu2s):
    assert cpu2s.gpus == [] and cpu2s.gpu_nic_matrix() == {}
    assert cpu2s.numa_nic_matrix() == {
        0: {"mlx5_0": "PHB", "mlx5_1": "SYS", "rxe0": "PHB", "rxe1": None},
        1: {"mlx5_0": "SYS", "mlx5_1": "PHB", "rxe0": "SYS", "rxe1": None}}
    m = cpu2s.nic_nic_matrix()
    assert m["mlx5_0"]["rxe0"] == "PHB"  # two root ports of one root complex
    assert m["mlx5_0"]["mlx5_1"] == "SYS"
    assert m["rxe1"]["mlx5_0"] is None


def test_cpu2s_tent_json(cpu2s):
    j = cpu2s.to_tent_json()
    _check_tent_shape(j)
    assert j["nics"] == [
        {"name": "mlx5_0", "pci_bus_id": "0000:01:00.0", "type": 0, "numa_node": 0},
        {"name": "mlx5_1", "pci_bus_id": "0000:81:00.0", "type": 0, "numa_node": 1},
        {"name": "rxe0", "pci_bus_id": "0000:02:00.0", "type": 0, "numa_node": 0},
        {"name": "rxe1", "pci_bus_id": "", "type": 0, "numa_node": -1}]
    assert [(m["name"], m["device_list"]["rank0"], m["device_list"]["rank2"])
            for m in j["mems"]] == [("*", [], [0, 1, 2, 3]), ("cpu:0", [0, 2], [1, 3]),
                                    ("cpu:1", [1], [0, 2, 3])]
    assert cpu2s.to_priority_matrix() == {"cpu:0": [["mlx5_0", "rxe0"], ["mlx5_1", "rxe1"]],
                                          "cpu:1": [["mlx5_1"], ["mlx5_0", "rxe0", "rxe1"]]}


# ---- helpers on hand-made input ------------------------------------------------------------------


def _dev(path: str, numa: int = 0) -> T.PciDevice:
    root, *chain = path.split("/")
    return T.PciDevice(chain[-1], root, tuple(chain), numa)


@pytest.mark.parametrize("a,b,want", [
    # one switch: upstream 01:00.0, downstream 02:00.0 / 02:01.0
    ("pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0",
     "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0", "PIX"),
    # two functions of one device below one downstream port
    ("pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0",
     "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.1", "PIX"),
    # two levels of switches: lower, upper, lower
    ("pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0/0000:04:00.0/0000:05:00.0",
     "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:06:00.0/0000:07:00.0/0000:08:00.0",
     "PXB"),
    # directly on two root ports of one root complex
    ("pci0000:00/0000:00:01.0/0000:01:00.0", "pci0000:00/0000:00:02.0/0000:02:00.0", "PHB"),
    # two functions directly below one root port: through the root complex
    ("pci0000:00/0000:00:01.0/0000:01:00.0", "pci0000:00/0000:00:01.0/0000:01:00.1", "PHB"),
])
def test_path_class_same_root(a, b, want):
    assert T.path_class(_dev(a), _dev(b)) == want
    assert T.path_class(_dev(b), _dev(a)) == want


def test_path_class_across_root_complexes():
    a = _dev("pci0000:00/0000:00:01.0/0000:01:00.0", 0)
    assert T.path_class(a, _dev("pci0000:17/0000:17:01.0/0000:18:00.0", 0)) == "NODE"
    assert T.path_class(a, _dev("pci0000:80/0000:80:01.0/0000:81:00.0", 1)) == "SYS"
    unknown = _dev("pci0000:17/0000:17:01.0/0000:18:00.0", -1)
    assert T.path_class(a, unknown) == "SYS"  # unknown NUMA on a multi-node box: remote
    assert T.path_class(a, unknown, single_node=True) == "NODE"
    assert T.path_class(a, None) is None


def _gid(i: int, text: str, typ: str) -> T.Gid:
    return T.Gid(i, text, typ)


def test_select_gid_order():
    ll = "fe80:0000:0000:0000:0202:c9ff:fe00:0001"
    v4 = "0000:0000:0000:0000:0000:ffff:0a00:0001"
    v6 = "2001:0db8:0000:0000:0000:0000:0000:0001"
    assert T.select_gid([_gid(0, ll, "RoCE v1"), _gid(1, ll, "RoCE v2"),
                         _gid(2, v4, "RoCE v1"), _gid(3, v4, "RoCE v2")]) == 3
    assert T.select_gid([_gid(0, ll, "RoCE v1"), _gid(1, v6, "RoCE v2"),
                         _gid(2, v4, "RoCE v1")]) == 1  # any v2 beats an IPv4 v1
    assert T.select_gid([_gid(0, ll, "IB")]) == 0
    assert T.select_gid([_gid(0, ":".join(["0000"] * 8), "RoCE v2")]) is None
    assert T.select_gid([]) is None


@pytest.mark.parametrize("mtu,want", [(9000, 4096), (4200, 4096), (4192, 4096), (4191, 2048),
                                      (1500, 1024), (1100, 512), (None, None), (300, None)])
def test_iboe_mtu(mtu, want):
    assert T.iboe_mtu(mtu) == want


def test_parse_cpulist():
    assert T.parse_cpulist("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert T.parse_cpulist("") == [] and T.parse_cpulist(None) == []


def _config(devctl: int | None, caps: bool = True) -> bytes:
    cfg = bytearray(256)
    if caps:
        cfg[0x06] = 0x10
        cfg[0x34] = 0x40
        cfg[0x40:0x42] = bytes([0x01, 0x60])  # power management, next 0x60
        cfg[0x60:0x62] = bytes([0x10, 0x00])  # PCI Express, last
        if devctl is not None:
            cfg[0x68:0x6A] = devctl.to_bytes(2, "little")
    return bytes(cfg)


def test_relaxed_ordering_from_config_space(tmp_path):
    assert T.pcie_devctl_relaxed_ordering(_config(0x2810)) is True  # RlxdOrd+ (bit 4)
    assert T.pcie_devctl_relaxed_ordering(_config(0x2800)) is False
    assert T.pcie_devctl_relaxed_ordering(_config(0, caps=False)) is None
    assert T.pcie_devctl_relaxed_ordering(_config(0x2810)[:64]) is None  # unprivileged read
    d = tmp_path / "sys" / "devices" / "pci0000:00" / "0000:00:01.0"
    d.mkdir(parents=True)
    (d / "config").write_bytes(_config(0x2810))
    dev = T.PciDevice("0000:00:01.0", "pci0000:00", ("0000:00:01.0",), 0,
                      sysfs="devices/pci0000:00/0000:00:01.0")
    assert T.relaxed_ordering(str(tmp_path), dev) is True
    assert T.relaxed_ordering(str(HGX8), T.discover(str(HGX8)).rdma_devices[0].pci) is None


# ---- this machine's sysfs ------------------------------------------------------------------------


def test_real_sysfs():
    topo = T.discover("/")
    assert topo.numa_nodes and all(n.id >= 0 for n in topo.numa_nodes)
    assert sum(len(n.cpus) for n in topo.numa_nodes) >= 1
    if not topo.rdma_devices:
        assert any("no RDMA devices" in n for n in topo.notes)
    for d in topo.rdma_devices:
        assert d.ports, d.name
        if d.kind == "soft":  # rxe/siw: resolved through the netdev, or said why not
            assert d.pci is not None or "no PCI device" in d.note, d
        else:
            assert d.pci is not None and re.fullmatch(r"[0-9a-f:.]+", d.pci_bus_id)
        for p in d.ports:
            assert p.state != "UNKNOWN" and p.link_layer in ("InfiniBand", "Ethernet")
            assert p.gid_index is None or p.gid(p.gid_index) is not None
            assert p.active_mtu in (None, 256, 512, 1024, 2048, 4096)
    _check_tent_shape(topo.to_tent_json())
    assert [m["name"] for m in topo.to_tent_json()["mems"]][1:1 + len(topo.numa_nodes)] == \
        [f"cpu:{n.id}" for n in topo.numa_nodes]
    json.dumps(topo.to_dict())


def test_real_sysfs_agrees_with_libibverbs():
    """The sysfs scan finds exactly the devices libibverbs lists (none here; rxe0 in the VM)."""
    try:
        from mooncake._core import verbs
    except ImportError:
        pytest.skip("built without the verbs kernels: no second opinion to compare with")
    if verbs.library_error():
        pytest.skip(f"no libibverbs to compare with: {verbs.library_error()}")
    assert {d.name for d in T.discover("/").rdma_devices} == set(verbs.device_names())


def test_real_gpus_match_nvidia_smi():
    got = [g.pci_bus_id for g in T.discover("/").gpus if g.vendor == "nvidia"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no working nvidia-smi to compare with")
    smi = sorted(b.strip().lower()[-12:] for b in out.splitlines() if b.strip())
    assert sorted(got) == smi


# ---- the dump tool -------------------------------------------------------------------------------


def _dump(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mooncake.transfer_engine_topology_dump",
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_dump_tool_on_fixtures(hgx8, cpu2s):
    r = _dump("--root", str(HGX8))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == hgx8.to_tent_json()
    r = _dump("--root", str(CPU2S), "--backend", "te", "--label", "--compact",
              "--exclude", "rxe1")
    assert r.returncode == 0, r.stderr
    prefix = "Local topology [te/discover]: "
    assert r.stdout.startswith(prefix)
    assert json.loads(r.stdout[len(prefix):]) == cpu2s.filtered(exclude=["rxe1"]) \
        .to_priority_matrix()
    r = _dump("--root", str(CPU2S), "--backend", "full", "--device-name", "mlx5_1")
    full = json.loads(r.stdout)
    assert [d["name"] for d in full["rdma_devices"]] == ["mlx5_1"]
    assert full["tent"]["nics"][0]["pci_bus_id"] == "0000:81:00.0"


def test_dump_tool_on_this_machine():
    r = _dump()
    assert r.returncode == 0, r.stderr
    _check_tent_shape(json.loads(r.stdout))


# ---- MC_CUSTOM_TOPO_JSON: the NIC priority matrix --------------------------------------------

def test_priority_matrix_reads_both_formats_the_dump_writes(hgx8, tmp_path):
    classic = hgx8.to_priority_matrix()
    got = T.parse_priority_matrix(classic)
    assert got == {k: (v[0], v[1]) for k, v in classic.items()}
    tent = T.parse_priority_matrix(hgx8.to_tent_json())
    for loc, (pref, avail) in got.items():  # the same ranking; TENT's adds "*"
        assert tent[loc][0] == pref and set(tent[loc][1]) == set(avail), loc
    assert tent["*"] == ([], [d.name for d in hgx8.rdma_devices])
    f = tmp_path / "m.json"
    f.write_text(json.dumps(classic))
    assert T.load_priority_matrix(str(f)) == got
    assert got["cpu:1"][0] and all(hgx8.numa_of(next(d for d in hgx8.rdma_devices if d.name == n))
                                   == 1 for n in got["cpu:1"][0])


@pytest.mark.parametrize("doc,what", [
    ([["mlx5_0"]], "must be a JSON object"),
    ({"gpu0": [["mlx5_0"], []]}, "is not a memory location"),
    ({"cpu:0": "mlx5_0"}, r"must be \[\[preferred NICs\], \[available NICs\]\]"),
    ({"cpu:0": [["mlx5_0", "mlx5_0"], []]}, "listed twice"),
    ({"cpu:0": [["bad name"], []]}, "is not a NIC name"),
    ({"cpu:0": [["mlx5_0"] * 65, []]}, "at most 64 NIC names"),
    ({"nics": [{"name": "mlx5_0"}], "mems": [{"name": "cpu:0",
                                              "device_list": {"rank0": [1]}}]},
     r"mems\[0\].device_list.rank0: must list indices 0..0 into nics"),
    ({"nics": [], "mems": [{"name": "cpu:0"}]}, "needs \"name\" and \"device_list\""),
    ({"nics": [], "mems": [], "extra": 1}, "unknown key 'extra'"),
])
def test_priority_matrix_refuses_what_it_cannot_use(doc, what):
    with pytest.raises(ConfigError, match=what):
        T.parse_priority_matrix(doc)


def test_priority_matrix_file_checks(tmp_path):
    f = tmp_path / "m.json"
    f.write_text('{"cpu:0": [["a"], []], "cpu:0": [["b"], []]}')
    with pytest.raises(ConfigError, match="MC_CUSTOM_TOPO_JSON=.*appears twice"):
        T.load_priority_matrix(str(f))
    f.write_bytes(b"{" + b" " * T.MAX_PRIORITY_MATRIX_BYTES + b"}")
    with pytest.raises(ConfigError, match="too large"):
        T.load_priority_matrix(str(f))
    with pytest.raises(ConfigError, match="cannot read it"):
        T.load_priority_matrix(str(tmp_path / "missing.json"))

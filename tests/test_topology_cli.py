"""``mooncake topology show|dump|generate`` and the ``cluster-topology.json`` reader.

* ``show`` on the seed's 8-GPU/8-NIC fixture (tests/data/sysfs/hgx8), as JSON and as a table
  (rich, and the plain fallback with rich hidden): the 8 NICs with their port, GID, NUMA node
  and PCI address, the NUMA nodes, the GPUs and every GPU/NUMA x NIC path class, checked
  against what tests/test_topology.py asserts about the fixture; the 2-socket fixture's soft
  devices; this machine's sysfs.
* ``dump`` prints byte for byte what ``python -m mooncake.transfer_engine_topology_dump`` does.
* :func:`mooncake.topology.load_cluster_topology` loads the seed's example and Mooncake's
  generator output, and refuses malformed files (bad keys, wrong types, negative, zero, NaN or
  huge numbers, duplicate keys, oversized or non-UTF-8 files) with a ConfigError naming what is
  wrong; on arbitrary JSON it raises nothing else.
* The partition matching ``generate`` writes is one-to-one, best first, leaves failed pairs out
  and loads back.
* ``generate`` against a peer reachable only over tcp from this host (no RDMA device here) exits
  1 naming both reasons and writes nothing; in the Soft-RoCE VM (rdma-marked) it measures
  rxe0 -> rxe0 against an rdma peer and writes a file that loads back with that pair.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from rdma_util import RXE_DEV, needs_rxe
from test_topology import CPU2S, HGX8, HGX8_GPU_NIC, HGX8_GPU_PCI, HGX8_NIC_PCI

from mooncake import topology as T
from mooncake.errors import ConfigError
from mooncake.topology_cli import PairResult, partition_matchings

ROOT = Path(__file__).resolve().parents[1]
NICS = list(HGX8_NIC_PCI)
ON_NUMA0 = {f"mlx5_bond_{i}" for i in (4, 5, 6, 7)}
#: the hgx8 NUMA rows: PHB to the NICs on the node, SYS to the others
HGX8_NUMA_NIC = {"cpu:0": {n: "PHB" if n in ON_NUMA0 else "SYS" for n in NICS},
                 "cpu:1": {n: "SYS" if n in ON_NUMA0 else "PHB" for n in NICS}}


def mc(*args: str, env: dict[str, str] | None = None,
       timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MC_")}
    return subprocess.run([sys.executable, "-m", "mooncake", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**base, **(env or {})}, timeout=timeout)


# ---- show ----------------------------------------------------------------------------------------


def test_show_json_on_the_8_gpu_fixture_has_its_nics_numa_nodes_and_path_classes():
    r = mc("topology", "show", "--root", str(HGX8), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [x["name"] for x in d["rdma_devices"]] == NICS
    for i, x in enumerate(d["rdma_devices"]):
        assert (x["port"], x["state"], x["link_layer"], x["rate_gbps"]) == \
            (1, "ACTIVE", "Ethernet", 400.0)
        assert (x["netdev"], x["gid_index"], x["gid_type"], x["ipv4"]) == \
            (f"bond{i}", 3, "RoCE v2", f"10.{i}.0.11")
        assert (x["numa_node"], x["pci_bus_id"], x["active_mtu"]) == \
            (1 if i < 4 else 0, HGX8_NIC_PCI[x["name"]], 4096)
    assert [(n["id"], n["cpus"], n["cpulist"]) for n in d["numa_nodes"]] == \
        [(0, 96, "0-47,96-143"), (1, 96, "48-95,144-191")]
    assert [(g["name"], g["pci_bus_id"], g["numa_node"]) for g in d["gpus"]] == \
        [(f"cuda:{i}", HGX8_GPU_PCI[i], 0 if i < 4 else 1) for i in range(8)]
    assert d["paths"] == {**HGX8_GPU_NIC, **HGX8_NUMA_NIC}


def _cells(line: str) -> list[str]:
    """A table row's cells, rich's box characters or plain spacing alike."""
    return [c for c in re.split(r"\s*[│┃]\s*|\s{2,}", line.strip().lstrip("* ")) if c]


def _rows(text: str, first: str) -> dict[str, list[str]]:
    """Rows (by first cell) of the table whose header row starts with ``first``."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if _cells(ln)[:1] == [first])
    out = {}
    for ln in lines[start + 1:]:
        if not ln.strip():
            break
        c = _cells(ln)
        if c and not set(ln.strip()) <= set("━─┡┩└┘┗┛╇┴┼ "):
            out[c[0]] = c[1:]
    return out


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "plain"])
def test_show_table_on_the_8_gpu_fixture(rich, tmp_path):
    env = {}
    if not rich:  # hide the optional extra: the plain-text fallback must say the same
        (tmp_path / "rich").mkdir()
        (tmp_path / "rich" / "__init__.py").write_text("raise ImportError('rich hidden')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    r = mc("topology", "show", "--root", str(HGX8), env=env)
    assert r.returncode == 0, r.stderr
    assert ("┃" in r.stdout) is rich
    devs = _rows(r.stdout, "device")
    assert list(devs) == NICS
    for i, n in enumerate(NICS):
        assert devs[n] == ["1", "ACTIVE", "Ethernet", "400 Gb/s", f"bond{i}", "3", "RoCE v2",
                           f"10.{i}.0.11", "4096", "1" if i < 4 else "0", HGX8_NIC_PCI[n]]
    assert _rows(r.stdout, "node") == {"0": ["96", "0-47,96-143", "1007.4"],
                                       "1": ["96", "48-95,144-191", "1008.0"]}
    assert {g: c[-2:] for g, c in _rows(r.stdout, "gpu").items()} == \
        {f"cuda:{i}": [HGX8_GPU_PCI[i], "0" if i < 4 else "1"] for i in range(8)}
    lines = r.stdout.splitlines()  # the matrix: its header is an empty cell and the NICs
    head = next(i for i, ln in enumerate(lines) if _cells(ln) == NICS)
    matrix = {c[0]: c[1:] for ln in lines[head + 1:] if len(c := _cells(ln)) == 9}
    want = {**HGX8_GPU_NIC, **HGX8_NUMA_NIC}
    assert matrix == {row: [want[row][n] for n in NICS] for row in want}


def test_show_json_on_the_cpu_node_fixture_names_soft_devices_and_unknowns():
    r = mc("topology", "show", "--root", str(CPU2S), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    devs = {x["name"]: x for x in d["rdma_devices"]}
    assert list(devs) == ["mlx5_0", "mlx5_1", "rxe0", "rxe1"]
    assert (devs["mlx5_0"]["link_layer"], devs["mlx5_0"]["gid_type"]) == ("InfiniBand", "IB")
    assert (devs["rxe0"]["kind"], devs["rxe0"]["pci_bus_id"], devs["rxe0"]["numa_node"]) == \
        ("soft", "0000:02:00.0", 0)
    assert (devs["rxe1"]["numa_node"], devs["rxe1"]["pci_bus_id"]) == (-1, "")
    assert "dummy0 is virtual" in devs["rxe1"]["note"]
    assert d["gpus"] == []
    assert d["paths"] == {"cpu:0": {"mlx5_0": "PHB", "mlx5_1": "SYS", "rxe0": "PHB",
                                    "rxe1": None},
                          "cpu:1": {"mlx5_0": "SYS", "mlx5_1": "PHB", "rxe0": "SYS",
                                    "rxe1": None}}
    text = mc("topology", "show", "--root", str(CPU2S)).stdout
    assert "rxe1: netdev dummy0 is virtual: no PCI device" in text


def test_show_on_this_machine_agrees_with_discovery():
    r = mc("topology", "show", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    topo = T.discover("/")
    assert [x["name"] for x in d["rdma_devices"]] == \
        [x.name for x in topo.rdma_devices for _ in (x.ports or [None])]
    assert [n["id"] for n in d["numa_nodes"]] == [n.id for n in topo.numa_nodes]
    r = mc("topology", "show")
    assert r.returncode == 0 and "NUMA nodes" in r.stdout, r.stderr


# ---- dump ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [[], ["--root", str(HGX8)],
                                  ["--root", str(CPU2S), "--backend", "te", "--label",
                                   "--exclude", "rxe1"],
                                  ["--root", str(HGX8), "--backend", "full", "--compact"]],
                         ids=["live", "hgx8", "cpu2s-te", "hgx8-full"])
def test_dump_prints_what_the_dump_tool_prints(args):
    ours = mc("topology", "dump", *args)
    tool = subprocess.run([sys.executable, "-m", "mooncake.transfer_engine_topology_dump",
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert ours.returncode == tool.returncode == 0, ours.stderr
    assert ours.stdout == tool.stdout and ours.stdout.strip()


# ---- the reader ----------------------------------------------------------------------------------

#: the seed's example (section 12.10.3), verbatim
SEED_EXAMPLE = """
{
    "partition_matchings": {
        "0-0": [
            {
                "src_dev": "mlx5_bond_4",
                "dst_dev": "mlx5_bond_3",
                "src_numa": 0,
                "dst_numa": 0,
                "bandwidth": 21926.19,
                "latency": 7.95
            }
        ],
        "0-1": [
            {
                "src_dev": "mlx5_bond_4",
                "dst_dev": "mlx5_bond_7",
                "src_numa": 0,
                "dst_numa": 1,
                "bandwidth": 21931.28,
                "latency": 5.65
            }
        ]
    }
}
"""


def _m(src: str, dst: str, sn: int, dn: int, bw: float = 100.0, lat: float = 5.0) -> dict:
    return {"src_dev": src, "dst_dev": dst, "src_numa": sn, "dst_numa": dn, "bandwidth": bw,
            "latency": lat}


def _load(tmp_path: Path, doc: object | str | bytes):
    p = tmp_path / "cluster-topology.json"
    if isinstance(doc, bytes):
        p.write_bytes(doc)
    else:
        p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return T.load_cluster_topology(str(p))


def test_reader_loads_the_seeds_example(tmp_path):
    got = _load(tmp_path, SEED_EXAMPLE)
    assert got == {
        (0, 0): [T.Matching("mlx5_bond_4", "mlx5_bond_3", 0, 0, 21926.19, 7.95)],
        (0, 1): [T.Matching("mlx5_bond_4", "mlx5_bond_7", 0, 1, 21931.28, 5.65)]}


def test_reader_loads_mooncakes_generator_output_and_picks_a_host_pair(tmp_path):
    """Mooncake's scripts/generate_cluster_topology.py writes a list of host-pair records with
    their endpoints and "S-D_extra" partitions."""
    rec = {"src_host": "a", "dst_host": "b",
           "endpoints": [_m("m0", "m1", 1, 0), _m("m2", "m3", 1, 0, 90.0)],
           "partition_matchings": {"1-0": [_m("m0", "m1", 1, 0)],
                                   "1-0_extra": [_m("m2", "m3", 1, 0, 90.0)],
                                   "-1--1": [_m("r0", "r1", -1, -1)]}}
    got = _load(tmp_path, [rec])
    assert [(m.src_dev, m.dst_dev) for m in got[(1, 0)]] == [("m0", "m1"), ("m2", "m3")]
    assert got[(-1, -1)][0].src_numa == -1
    other = {**rec, "dst_host": "c", "partition_matchings": {"0-0": [_m("x", "y", 0, 0)]}}
    p = tmp_path / "two.json"
    p.write_text(json.dumps([rec, other]))
    with pytest.raises(ConfigError, match="2 of its 2 host pairs match"):
        T.load_cluster_topology(str(p))
    assert list(T.load_cluster_topology(str(p), dst_host="c")) == [(0, 0)]


def _good() -> dict:
    return {"partition_matchings": {"0-0": [_m("mlx5_0", "mlx5_1", 0, 0)]}}


def _with(**entry) -> dict:
    d = _good()
    d["partition_matchings"]["0-0"][0].update(entry)
    return d


MALFORMED = [
    ("not-json", "{partition", "not JSON"),
    ("nan", '{"partition_matchings": {"0-0": [{"src_dev": "a", "dst_dev": "b", "src_numa": 0, '
            '"dst_numa": 0, "bandwidth": NaN, "latency": 1}]}}', "NaN is not a number"),
    ("dup-key", '{"partition_matchings": {}, "partition_matchings": {}}', "appears twice"),
    ("not-utf8", b'{"partition_matchings": "\xff"}', "not UTF-8"),
    ("deep", "[" * 100000 + "]" * 100000, "nested too deeply"),
    ("scalar", 3, "allowed: an object with partition_matchings"),
    ("empty-list", [], "allowed: an object with partition_matchings"),
    ("no-partitions", {"endpoints": []}, "partition_matchings: missing or empty"),
    ("empty-partitions", {"partition_matchings": {}}, "missing or empty"),
    ("unknown-top-key", {**_good(), "partiton_matchings": {}}, "unknown key(s) 'partiton"),
    ("bad-partition-key", {"partition_matchings": {"0_0": [_m("a", "b", 0, 0)]}},
     "is not a partition key"),
    ("numa-in-key-too-large", {"partition_matchings": {"0-5000": [_m("a", "b", 0, 0)]}},
     "NUMA node 5000 is not allowed"),
    ("empty-partition", {"partition_matchings": {"0-0": []}}, "is empty"),
    ("partition-not-list", {"partition_matchings": {"0-0": {}}}, "is dict; allowed: a list"),
    ("entry-not-object", {"partition_matchings": {"0-0": ["mlx5_0"]}}, "is str"),
    ("missing-field", {"partition_matchings": {"0-0": [{"src_dev": "a"}]}}, "lacks dst_dev"),
    ("unknown-field", _with(bandwith=1.0), "unknown key(s) 'bandwith'"),
    ("negative-bandwidth", _with(bandwidth=-21926.19), "bandwidth: -21926.19 is negative"),
    ("zero-latency", _with(latency=0), "latency: 0 is zero"),
    ("negative-latency", _with(latency=-1.5), "latency: -1.5 is negative"),
    ("huge-bandwidth", _with(bandwidth=1e300), "is too large"),
    ("overflowing-bandwidth", '{"partition_matchings": {"0-0": [{"src_dev": "a", "dst_dev": '
     '"b", "src_numa": 0, "dst_numa": 0, "bandwidth": 1e999, "latency": 1}]}}', "too large"),
    ("string-bandwidth", _with(bandwidth="21926.19"), "is str; allowed: a number of MB/s"),
    ("bool-latency", _with(latency=True), "is bool"),
    ("float-numa", _with(src_numa=0.0), "src_numa: 0.0 is not allowed"),
    ("numa-below-unknown", _with(dst_numa=-2), "dst_numa: -2 is not allowed"),
    ("numa-too-large", _with(dst_numa=4096), "dst_numa: 4096 is not allowed"),
    ("numa-not-its-partition", _with(dst_numa=1), "not its partition 0-0"),
    ("bad-nic-name", _with(src_dev="mlx5 0; rm -rf"), "is not a NIC name"),
    ("empty-nic-name", _with(dst_dev=""), "is not a NIC name"),
    ("long-nic-name", _with(dst_dev="m" * 65), "is not a NIC name"),
    ("nic-not-string", _with(src_dev=7), "is not a NIC name"),
    ("pair-twice", {"partition_matchings": {"0-0": [_m("a", "b", 0, 0), _m("a", "b", 0, 0)]}},
     "lists a->b twice"),
    ("host-not-string", {**_good(), "src_host": 1}, "src_host: allowed: a string"),
    ("bad-endpoint", {**_good(), "endpoints": [_m("a", "b", 0, 0, bw=-1)]},
     "endpoints[0].bandwidth"),
    ("too-many", {"partition_matchings": {"0-0": [_m("a", f"b{i}", 0, 0)
                                                  for i in range(T.MAX_MATCHINGS + 1)]}},
     "too many matchings"),
]


@pytest.mark.parametrize("doc,want", [(d, w) for _, d, w in MALFORMED],
                         ids=[n for n, _, _ in MALFORMED])
def test_reader_refuses_malformed_files_naming_what_is_wrong(tmp_path, doc, want):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, doc)
    msg = str(e.value)
    assert want in msg and msg.startswith("cluster topology "), msg


def test_reader_refuses_an_oversized_file_and_a_missing_one(tmp_path):
    p = tmp_path / "big.json"
    with open(p, "wb") as f:
        f.write(b" " * (T.MAX_CLUSTER_TOPOLOGY_BYTES + 1))
    with pytest.raises(ConfigError, match="too large; allowed: at most"):
        T.load_cluster_topology(str(p))
    with pytest.raises(ConfigError, match="cannot read it"):
        T.load_cluster_topology(str(tmp_path / "absent.json"))


def test_reader_on_arbitrary_json_raises_only_config_errors():
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    scalars = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
               | st.sampled_from(["0-0", "1-0_extra", "-1--1", "mlx5_0", "src_dev"]))
    anything = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                            | st.dictionaries(st.text(max_size=12) | st.sampled_from(
                                ["partition_matchings", "endpoints", *_m("a", "b", 0, 0)]),
                                c, max_size=6), max_leaves=30)
    # near-valid documents: one field of a good matching replaced by anything
    near = st.builds(lambda k, v: _with(**{k: v}), st.sampled_from(list(_m("a", "b", 0, 0))),
                     anything)

    @hyp.given(anything | near)
    def check(doc):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(doc, f)
        try:
            got = T.load_cluster_topology(f.name)
        except ConfigError:
            return
        finally:
            os.unlink(f.name)
        for (s, d), ms in got.items():  # what loads keeps every promise
            assert ms and all((m.src_numa, m.dst_numa) == (s, d) for m in ms)
            assert all(0 < m.bandwidth <= T.MAX_BANDWIDTH_MBPS and
                       0 < m.latency <= T.MAX_LATENCY_US for m in ms)

    check()


# ---- what generate writes ------------------------------------------------------------------------


def test_partition_matching_is_one_to_one_best_first_and_loads_back():
    r = [PairResult("a0", 0, "b0", 0, 900, 1000, 5.0), PairResult("a0", 0, "b1", 0, 950, 990, 6),
         PairResult("a1", 0, "b0", 0, 800, 800, 4.0), PairResult("a1", 0, "b1", 0, 500, 600, 7),
         PairResult("a2", 1, "b0", 0, 100, 100, 9.0),
         PairResult("a2", 1, "b1", 0, error="TransferFailed: rail down")]
    pm = partition_matchings(r)
    # 0-0: a0->b1 (min(950, 990) = 950) beats a0->b0 (900); then a1 takes the free b0
    assert pm == {"0-0": [_m("a0", "b1", 0, 0, 950.0, 6.0), _m("a1", "b0", 0, 0, 800.0, 4.0)],
                  "1-0": [_m("a2", "b0", 1, 0, 100.0, 9.0)]}
    got = T.parse_cluster_topology({"partition_matchings": pm,
                                    "endpoints": [x.matching() for x in r if x.ok]})
    assert [(m.src_dev, m.dst_dev) for m in got[(0, 0)]] == [("a0", "b1"), ("a1", "b0")]
    assert partition_matchings([r[-1]]) == {}


# ---- generate ------------------------------------------------------------------------------------


def test_generate_against_a_tcp_only_peer_fails_naming_why(peer, tmp_path):
    peer.alloc(1 << 20)
    out = tmp_path / "cluster-topology.json"
    r = mc("topology", "generate", "--peer", peer.segment, "--output", str(out),
           "--size", "4K", "--batch-size", "4", "--threads", "1")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"peer {peer.segment} publishes no RDMA device (its transports: tcp)" in r.stderr
    if not T.discover("/").rdma_devices:
        assert "this host has no RDMA device" in r.stderr
    assert not out.exists()


def test_generate_refuses_bad_flags_and_an_unwritable_output(tmp_path):
    r = mc("topology", "generate", "--peer", "127.0.0.1:1", "--size", "0")
    assert r.returncode == 2 and "a size must be > 0" in r.stderr
    r = mc("topology", "generate")
    assert r.returncode == 2 and "--peer" in r.stderr
    r = mc("topology", "generate", "--peer", "127.0.0.1:1", "--output",
           str(tmp_path / "no" / "such" / "dir" / "x.json"))
    assert r.returncode == 1 and "does not exist or is not writable" in r.stderr


def test_generate_against_an_unreachable_peer_says_so(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = mc("topology", "generate", "--peer", f"127.0.0.1:{port}", "--output",
           str(tmp_path / "x.json"))
    assert r.returncode == 1
    assert f"cannot read peer 127.0.0.1:{port}'s segment descriptor" in r.stderr


def test_generate_measures_the_rxe_pair_and_the_file_loads_back(tmp_path):
    from mooncake.engine import TransferEngine
    from mooncake.testing.peer import Peer

    p = Peer(protocol="rdma", device_name=RXE_DEV, _start_timeout=180)
    try:
        p.alloc(1 << 20)
        eng = TransferEngine("127.0.0.1", protocol="rdma", device_name=RXE_DEV)
        try:
            info = eng.segment(p.segment, refresh=True).transports["rdma"]
        finally:
            eng.close()
        peer_numa = info.get("numa0", -1)
        assert info["dev0"] == RXE_DEV
        out = tmp_path / "cluster-topology.json"
        r = mc("topology", "generate", "--peer", p.segment, "--output", str(out),
               "--size", "16K", "--batch-size", "8", "--threads", "2", "--duration", "0.5",
               "--json", timeout=900)
    finally:
        p.close()
    assert r.returncode == 0, (r.stdout, r.stderr)
    rep = json.loads(r.stdout)
    local_numa = T.discover("/").numa_of(T.discover("/").device(RXE_DEV))
    [pair] = rep["pairs"]
    assert (pair["src_dev"], pair["dst_dev"], pair["error"]) == (RXE_DEV, RXE_DEV, "")
    assert (pair["src_numa"], pair["dst_numa"]) == (local_numa, peer_numa)
    assert pair["write_mbps"] > 0 and pair["read_mbps"] > 0 and pair["latency_us"] > 0
    got = T.load_cluster_topology(str(out))
    [m] = got[(local_numa, peer_numa)]
    assert (m.src_dev, m.dst_dev) == (RXE_DEV, RXE_DEV)
    assert m.bandwidth == round(min(pair["write_mbps"], pair["read_mbps"]), 2) > 0
    assert m.latency > 0
    doc = json.loads(out.read_text())
    assert doc["dst_host"] == rep["peer"] and len(doc["endpoints"]) == 1


test_generate_measures_the_rxe_pair_and_the_file_loads_back.pytestmark = needs_rxe

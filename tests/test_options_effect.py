"""Every option does something, or says why not (issue 10, items 4 and 5).

* The walk: each row of the option table names the modules that read it (and each really
  does), or declares ``no_effect``/``pending`` with a reason; no module reads an option the
  table does not credit it with.
* Declared rows: setting one warns once per process and ``config show`` prints the reason.
* The seed's three templates (tests/data/seed, copied from shared/seed) load and ``config show``
  says what each of their lines does.
* The formerly inert knobs, each proved by its effect: MC_TENT_RPC_THREADS (concurrent RPC
  handlers), send_timeout (the QP's ACK timeout), max_retry_count = MC_RETRY_CNT (the workers'
  retry budget), MC_SLICE_TIMEOUT (stuck slices end TIMEOUT), MC_RDMA_RAIL_PAUSE_SECONDS and
  MC_CONN_PAUSE_TTL_MS (no reconnect storms), MC_AUTO_GID_MAX_RETRIES (GID re-probes),
  MC_MAX_MR_SIZE (refused registrations), MC_ENABLE_HCA_PEER_AFFINITY/MC_NIC_PEER_AFFINITY (the
  peer NICs used).  RDMA ones run against a recording stand-in for the verbs modules (the real
  verbs path runs in the Soft-RoCE VM).
* Logs: MC_LOG_LEVEL sets every project logger (transports included); MC_TE_METRIC's line is
  printed whatever the level, to stderr when nothing else handles it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import mooncake.config as C
from mooncake import cli
from mooncake.config import (
    OPTIONS,
    ConfigWarning,
    InertOptionWarning,
    load_config,
    parse_env_block,
    show,
)
from mooncake.errors import ConfigError, MooncakeError, PeerUnreachable, TransportUnavailable
from mooncake.options import LOG_ROOTS, METRIC_LOGGER

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "seed"
SEED = ROOT.parent / "shared" / "seed" / "000_34b6f3e8dd72c2ae.txt"
TEMPLATES = {"te_high_throughput.env": "高吞吐 KVCache 传输场景",
             "te_low_latency.env": "低延迟在线推理场景",
             "tent_high_performance.json": "TENT 引擎高性能配置"}


def quiet(overrides=None, env=None):
    """load_config failing on any ConfigWarning (inert-option warnings are another class)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        warnings.simplefilter("ignore", InertOptionWarning)
        return load_config(overrides, env={} if env is None else env)


@pytest.fixture
def fresh_warnings():
    """Forget which inert options this process has warned about."""
    with C._INERT_LOCK:
        saved = set(C._INERT_WARNED)
        C._INERT_WARNED.clear()
    yield
    with C._INERT_LOCK:
        C._INERT_WARNED.clear()
        C._INERT_WARNED.update(saved)


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("MC_") or k == "NCCL_IB_GID_INDEX":
            monkeypatch.delenv(k)


# ---- the walk --------------------------------------------------------------------------------

# first-party modules whose option reads count (config.py/options.py are the table itself;
# doctor.py inspects options to judge them, which gives them no effect; mooncake/testing is
# test support)
MODULES = sorted(p.relative_to(ROOT).as_posix() for p in
                 [*ROOT.glob("mooncake/**/*.py"), *ROOT.glob("transports/**/*.py")]
                 if "testing" not in p.parts
                 # the table itself, and the tools that judge or write settings (doctor, tune,
                 # topology generate)
                 and p.name not in ("config.py", "options.py", "doctor.py", "tune.py",
                                    "topology_cli.py"))


def _source(rel: str) -> str:
    """A module's text without the option rows it declares (a declaration is not a read)."""
    text = (ROOT / rel).read_text(encoding="utf-8")
    return re.sub(r"(?ms)^OPTIONS: tuple\[Option, \.\.\.\] = \(\n.*?^\)\n", "", text)


def _keys(o) -> list[str]:
    return [o.name, *o.env, *([o.tent] if o.tent else [])]


def _reads(text: str, o) -> bool:
    """``text`` reads ``o``: a quoted name, alias or TENT path used as a subscript or as an
    argument of a call (``cfg["X"]``, ``g("X")``, ``self.option("X", ...)``, ``get(cfg, "X")``),
    not assigned to (``env["X"] = ...``)."""
    alts = "|".join(re.escape(k) for k in _keys(o))
    # an assignment (env["MC_TENT_CONF"] = ...) is not a read
    return re.search(rf"""[\[(,]\s*f?["'](?:{alts})["'](?!\]\s*=[^=])""", text) is not None


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.name)
def test_every_option_has_a_consumer_or_a_declared_reason(opt):
    assert bool(opt.no_effect) != bool(opt.reads or opt.pending), \
        f"{opt.name}: declare reads and/or pending, or no_effect alone"
    for reason in (opt.no_effect, opt.pending):
        assert not reason or len(reason) >= 20, f"{opt.name}: say why ({reason!r})"
    for entry in opt.reads:
        path, _, token = entry.partition("::")
        assert (ROOT / path).is_file(), f"{opt.name}: {path} does not exist"
        text = _source(path)
        if token:
            assert token in text, f"{opt.name}: {path} does not contain {token!r}"
        else:
            assert _reads(text, opt), f"{opt.name}: {path} never reads it ({_keys(opt)})"


def test_no_module_reads_an_option_the_table_does_not_credit():
    """The reverse walk: a module that starts reading an option (e.g. when a pending one gets
    wired) must be named in that row's ``reads`` (and the pending reason dropped)."""
    missing = []
    for rel in MODULES:
        text = _source(rel)
        for o in OPTIONS:
            if _reads(text, o) and rel not in {r.split("::")[0] for r in o.reads}:
                kind = "declared no_effect/pending" if not o.reads else "reads omits it"
                missing.append(f"{o.name}: {rel} reads it but the row is {kind}")
    assert not missing, "\n".join(missing)


# the knobs issue 10 found inert, and what became of each
WIRED = ["transports/rdma/endpoint/send_timeout", "transports/rdma/workers/max_retry_count",
         "MC_SLICE_TIMEOUT", "MC_RDMA_RAIL_PAUSE_SECONDS", "MC_AUTO_GID_MAX_RETRIES",
         "MC_TENT_RPC_THREADS", "MC_CONN_PAUSE_TTL_MS", "MC_MAX_MR_SIZE",
         "MC_ENABLE_HCA_PEER_AFFINITY", "MC_NIC_PEER_AFFINITY"]
OWNED_ELSEWHERE = {  # issue 10 items 1-3 and issue 9 own these: pending until they land
    "transports/rdma/workers/grace_period_ns": "issue 10 item 1",
    "transports/rdma/shared_quota_shm_path": "issue 10 item 2",
    "transports/rdma/max_timeout_ns": "issue 10 item 3",
    "transports/rdma/num_lanes": "issue 9",
    "transports/rdma/workers/rail_topo_path": "issue 9",
}


@pytest.mark.parametrize("name", WIRED)
def test_formerly_inert_knob_is_read(name):
    assert quiet().option(name).reads, name


@pytest.mark.parametrize("name", sorted(OWNED_ELSEWHERE))
def test_knob_owned_elsewhere_is_pending_with_its_owner_or_wired(name):
    o = quiet().option(name)
    assert o.reads or OWNED_ELSEWHERE[name] in o.pending, (name, o.pending)


def test_store_memcpy_has_no_effect_with_a_reason():
    o = quiet().option("MC_STORE_MEMCPY")
    assert o.no_effect and "Store" in o.no_effect and not o.reads


# ---- declared rows: warned once, shown with the reason ------------------------------------------


def test_setting_an_inert_option_warns_once_per_process(fresh_warnings, caplog):
    env = {"MC_STORE_MEMCPY": "0"}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cfg = load_config(env=env)
        again = load_config(env=env)
        cfg.with_overrides({"slice_size": 131072})
    hits = [w for w in rec if issubclass(w.category, InertOptionWarning)]
    assert len(hits) == 1, [str(w.message) for w in rec]
    assert "MC_STORE_MEMCPY" in str(hits[0].message) and "no effect" in str(hits[0].message)
    assert "Store" in str(hits[0].message)
    assert not any(issubclass(w.category, ConfigWarning) for w in rec)
    assert "MC_STORE_MEMCPY" in cfg.inert and "MC_STORE_MEMCPY" in again.inert
    assert cfg.notes == []  # a value the option allows is not a suspicious value
    assert sum("MC_STORE_MEMCPY" in r.getMessage() for r in caplog.records) == 1


def test_an_inert_option_left_at_its_default_is_silent(fresh_warnings):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(env={})
    assert cfg.inert == {}


def test_pending_option_warns_as_not_in_effect_yet(fresh_warnings):
    pending = next(o for o in OPTIONS if o.pending and o.type in (str, bool))
    with pytest.warns(InertOptionWarning, match="no effect yet"):
        cfg = load_config({pending.name: True if pending.type is bool else "x"}, env={})
    assert pending.pending in cfg.inert[pending.name]


def test_config_show_prints_no_effect_with_its_reason(clean_env, monkeypatch):
    monkeypatch.setenv("MC_STORE_MEMCPY", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InertOptionWarning)
        text = show()
        doc = json.loads(show(as_json=True))
    store = next(o for o in OPTIONS if o.name == "MC_STORE_MEMCPY")
    row = next(ln for ln in text.splitlines() if ln.startswith("MC_STORE_MEMCPY "))
    assert f"no effect: {store.no_effect}" in row
    for o in OPTIONS:  # every declared row carries its reason in the table, others nothing
        line = next(ln for ln in text.splitlines() if ln.split()[:1] == [o.name])
        assert (o.effect in line) == bool(o.no_effect or o.pending), line
    j = doc["options"]["MC_STORE_MEMCPY"]
    assert j["in_effect"] is False and j["no_effect"] == store.no_effect
    assert doc["options"]["MC_SLICE_SIZE"]["reads"] == ["mooncake/transport.py"]
    assert "MC_STORE_MEMCPY" in doc["inert"]


# ---- the seed's three templates ------------------------------------------------------------------


def _seed_blocks() -> dict[str, str]:
    text = SEED.read_text(encoding="utf-8")
    sec = text[text.index("### 12.12.2"):text.index("### 12.12.3")]
    found = dict(re.findall(r"\*\*(.+?)\*\*:\s*\n\s*\n```\w+\n(.*?)```", sec, re.S))
    return {f: found[title] for f, title in TEMPLATES.items()}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_data_is_the_seed_verbatim(name):
    if not SEED.exists():
        pytest.skip(f"{SEED} not present")
    assert (DATA / name).read_text(encoding="utf-8") == _seed_blocks()[name]


def _template_env(name: str) -> dict[str, str]:
    text = (DATA / name).read_text(encoding="utf-8")
    if name.endswith(".json"):
        return {"MC_TENT_CONF": str(DATA / name)}
    return parse_env_block(text, name)


def _tent_leaves(node: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_tent_leaves(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_loads_without_config_warnings(name, fresh_warnings):
    env = _template_env(name)
    cfg = quiet(env=env)
    assert cfg.notes == []
    if name.endswith(".json"):
        leaves = _tent_leaves(json.loads((DATA / name).read_text(encoding="utf-8")))
        for path, value in leaves.items():
            assert cfg.source(path).startswith("tent:"), path
            want = value.upper() if path == "log_level" else value
            assert cfg[path] == want, path
    else:
        for var in env:
            assert cfg.source(var) == f"env:{var}", var
        assert cfg["MC_LOG_LEVEL"] == "WARNING"
    # what the template sets that does nothing here is said, not hidden
    expect = {o.name for o in OPTIONS if o.inert and cfg.source(o.name) != "default"}
    assert set(cfg.inert) == expect


def test_high_throughput_template_names_store_memcpy_as_inert(fresh_warnings):
    with pytest.warns(InertOptionWarning, match="MC_STORE_MEMCPY"):
        cfg = load_config(env=_template_env("te_high_throughput.env"))
    assert cfg["MC_SLICE_SIZE"] == 131072 and cfg["MC_MAX_CQE_PER_CTX"] == 8192
    assert cfg["MC_TE_METRIC"] is True and cfg["MC_STORE_USE_HUGEPAGE"] is True


def test_tent_template_max_retry_count_is_the_retry_knob():
    cfg = quiet(env=_template_env("tent_high_performance.json"))
    assert cfg["MC_RETRY_CNT"] == 8 and cfg.source("MC_RETRY_CNT").startswith("tent:")
    assert cfg["transports/rdma/endpoint/send_timeout"] == 14


def _explained(out: str) -> dict[str, list[str]]:
    """``{key as set: [meaning, effect, tuning...]}`` from show()'s "what each setting does"."""
    part = out.split("what each setting does:\n", 1)[1].split("\n\nnotes:", 1)[0]
    blocks: dict[str, list[str]] = {}
    key = None
    for line in part.splitlines():
        if line.startswith("  ") and not line.startswith("      "):
            key = line.strip().split(" = ")[0]
            blocks[key] = []
        elif key and line.strip():
            blocks[key].append(line.strip())
    return blocks


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_config_show_says_what_each_template_line_does(name, clean_env, capsys, fresh_warnings):
    path = str(DATA / name)
    argv = ["config", "show", "--tent", path] if name.endswith(".json") else \
        ["config", "show", "--env-file", path]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InertOptionWarning)
        assert cli.main(argv) == 0
    out = capsys.readouterr().out
    blocks = _explained(out)
    if name.endswith(".json"):
        keys = list(_tent_leaves(json.loads((DATA / name).read_text(encoding="utf-8"))))
    else:
        keys = list(parse_env_block((DATA / name).read_text(encoding="utf-8")))
    for key in keys:
        opt = quiet().option(key)
        block = next((b for k, b in blocks.items() if k.split(" (")[0] == key), None)
        assert block is not None, f"{name}: line {key} is not explained:\n{out}"
        assert f"meaning: {opt.doc}" in block, block
        assert f"effect:  {opt.effect}" in block, block
    if name == "te_high_throughput.env":
        assert any("no effect:" in ln for ln in blocks["MC_STORE_MEMCPY"])
    if name.endswith(".json"):
        eff = blocks["transports/rdma/workers/max_retry_count (MC_RETRY_CNT)"]
        assert "effect:  read by transports/rdma.py" in eff


def test_config_show_env_file_errors_are_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.env"
    bad.write_text("export MC_SLICE_SIZE=64K\nsysctl -w net.core.rmem_max=16777216\n")
    assert cli.main(["config", "show", "--env-file", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert parse_env_block("export A=1  # c\nB='x y'\n\n# z\n") == {"A": "1", "B": "x y"}


# ---- MC_TENT_RPC_THREADS: how many RPC handlers run at once -------------------------------------


@pytest.mark.parametrize("threads", [1, 3])
def test_rpc_threads_bound_concurrent_handlers(threads):
    from mooncake.engine import TransferEngine
    from mooncake.rpc import RpcClient

    running = peak = 0
    lock = threading.Lock()

    def slow(args):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.25)
        with lock:
            running -= 1
        return {}

    with TransferEngine("127.0.0.1", protocol="tcp", MC_TENT_RPC_THREADS=threads) as e:
        e._rpc.add_handler("test.slow", slow)
        client = RpcClient(1 << 20, 5.0)
        calls = [threading.Thread(target=client.call, args=(e.segment_name, "test.slow", {}, 10))
                 for _ in range(5)]
        t0 = time.monotonic()
        for t in calls:
            t.start()
        for t in calls:
            t.join()
        took = time.monotonic() - t0
    assert peak == threads
    assert took >= 0.25 * -(-5 // threads) * 0.9  # 5 calls in ceil(5/threads) waves


# ---- the RDMA knobs, against a recording stand-in for the verbs modules --------------------------


class _FakeQP:
    def __init__(self, *a):
        self.qp_num = 7
        self.calls = []

    def to_init(self, *a):
        self.calls.append(("init", a))

    def to_rtr(self, *a, **k):
        self.calls.append(("rtr", a))
        self.rtr_kw = k

    def to_rts(self, *a, **k):
        self.calls.append(("rts", a, k))

    def close(self):
        pass


class _FakeDev:
    def __init__(self, name, gid_scans_empty=0, max_mr_size=1 << 40):
        self.name = name
        self.limits = {"phys_port_cnt": 1, "max_qp_wr": 32768, "max_sge": 30, "max_cqe": 1 << 22,
                       "max_cq": 1 << 16, "max_qp": 1 << 18, "max_mr_size": max_mr_size,
                       "vendor_id": 0x2C9}
        self.empty_scans = gid_scans_empty
        self.scans = 0

    def query_port(self, port):
        return {"state": 4, "link_layer": 2, "gid_tbl_len": 4, "active_mtu": 4096, "lid": 0}

    def gid_entry(self, port, i):
        if i == 0:
            self.scans += 1
        if self.scans <= self.empty_scans:
            return None
        return (bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1]), 2) if i == 1 else None

    def query_gid(self, port, i):
        return bytes(16)


class _FakeV:
    MTU_ENUM = {256: 1, 512: 2, 1024: 3, 2048: 4, 4096: 5}
    PORT_ACTIVE = 4
    LINK_LAYER_ETHERNET = 2
    GID_TYPE_ROCE_V2 = 2
    ACCESS_RW = 7
    ACCESS_LOCAL_WRITE, ACCESS_REMOTE_WRITE, ACCESS_REMOTE_READ = 1, 2, 4
    ACCESS_RELAXED_ORDERING = 1 << 20

    def __init__(self, devs):
        self.devs = {d.name: d for d in devs}
        self.mrs = []

    @staticmethod
    def library_error():  # libibverbs.so.1 "loaded"
        return ""

    def device_names(self):
        return list(self.devs)

    def Device(self, name):  # noqa: N802 (the verbs module's class name)
        return self.devs[name]

    def CompChannel(self, dev):  # noqa: N802
        return object()

    def CQ(self, dev, cqe, chan, i):  # noqa: N802
        return SimpleNamespace(cqe=cqe)

    def QP(self, *a):  # noqa: N802
        return _FakeQP(*a)

    def MR(self, dev, addr, length, acc):  # noqa: N802
        mr = SimpleNamespace(addr=addr, length=length, rkey=1, lkey=2, close=lambda: None)
        self.mrs.append(mr)
        return mr


class _FakeWorker:
    def __init__(self, slots, hub, retry_cnt, grace=0.0):
        self.slots, self.retry_cnt, self.grace, self.stopped = slots, retry_cnt, grace, False

    def run(self):
        pass

    def stop(self):
        self.stopped = True

    def stats(self):
        return {}


class _FakeHub:
    def take(self, timeout):
        time.sleep(min(timeout, 0.01))
        return None

    def close(self):
        pass


class _FakeK:
    def __init__(self):
        self.submits = []

    def CQSlot(self, cq):  # noqa: N802
        return SimpleNamespace(cq=cq, errors=0, last_error=0)

    Worker = _FakeWorker
    Hub = _FakeHub

    def KeyTable(self, rows, n):  # noqa: N802
        return SimpleNamespace(rows=rows)

    def reap_graves(self):
        pass

    def submit(self, slices, ltab, lcol, rtab, cols, eps, rr, lcols=None):
        self.submits.append((list(cols), list(eps)))
        self.lcols = list(lcols) if lcols is not None else None

    def usable(self, eps):  # verbs_kernel.usable: none aborted, no QP in error
        return all(e.healthy == len(e.qps) and not e.aborted for e in eps)


class _FakeEp:
    """What ``_watch`` and the store see of a ``verbs_kernel.Endpoint``."""

    _ids = 100

    def __init__(self, users=1, qps=2):
        _FakeEp._ids += 1
        self.id = _FakeEp._ids
        self.users, self.completions = users, 0
        self.qps, self.healthy, self.aborted = [None] * qps, qps, False
        self.slot = None
        self.aborts = []
        self.requeue = False
        self.last_status = 0

    def abort(self, err, requeue):
        self.aborts.append(err)
        self.aborted = True
        return []

    def destroy(self):
        pass


class _Slices:
    def __init__(self, local=0x1000, remote=0x2000):
        self.failed = None
        self.local, self.remote = local, remote
        self.batch = SimpleNamespace(priority=0)  # the engine's quota class

    def __iter__(self):  # one slice: (task, op, local, remote, length)
        yield (0, 1, self.local, self.remote, 4096)

    def head(self):
        return (self.local, self.remote, 4096)

    def fail_all(self, err):
        self.failed = err


@pytest.fixture
def rdma(monkeypatch):
    """``make(devs=..., **options)``: an RdmaTransport on the stand-ins (started when
    ``start=True``), with the RPC calls it makes recorded; closed after the test."""
    import mooncake.transports.rdma as R
    from mooncake.transport import TransportContext

    made = []

    def make(devs=("fake0",), start=False, rpc=None, **options):
        fv = _FakeV([d if isinstance(d, _FakeDev) else _FakeDev(d) for d in devs])
        fk = _FakeK()
        monkeypatch.setattr(R, "V", fv)
        monkeypatch.setattr(R, "K", fk)
        calls = []

        def rpc_call(seg, method, args, timeout=10.0):
            calls.append((seg, method, args))
            if rpc is None:
                raise PeerUnreachable("no peer in this test")
            return rpc(seg, method, args)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InertOptionWarning)
            cfg = load_config(options, env={})
        ctx = TransportContext(cfg, "me:1", "127.0.0.1", "host", None, lambda *a: None,
                               rpc_call, "")
        t = R.RdmaTransport(ctx)
        t.fv, t.fk, t.calls = fv, fk, calls
        if start:
            t.start()
        else:
            t.devs = [R._Dev(index=i, dev=d, port=1, gid_index=1, gid=bytes(16), lid=0,
                             mtu=4096, store=R.EndpointStore(16, "SIEVE"))
                      for i, d in enumerate(fv.devs.values())]
            t._place = lambda d, lane=None: (None, SimpleNamespace(cq=None))  # no workers
        made.append(t)
        return t

    yield make
    for t in made:
        for ep in [*t._retired, *(e for d in t.devs for e in d.store.values())]:
            ep.users = 0  # the stand-in endpoints hold no real work
        t.close()


def _peer(pdevs=("p0",), inst="a" * 32, name="peer:2"):
    info = {"instance": inst, "ndevs": len(pdevs), **{f"dev{i}": d for i, d in enumerate(pdevs)}}
    return SimpleNamespace(name=name, transports={"rdma": info}, buffers=[], timestamp=1)


def test_send_timeout_is_the_qps_ack_timeout(rdma):
    remote = {"gid": "00" * 16, "lid": 0, "mtu": 4096, "qpns": [5], "psns": [9]}
    for opts, want in (({}, 14), ({"transports/rdma/endpoint/send_timeout": 20}, 20)):
        t = rdma(**opts)
        qp = _FakeQP()
        t._bring_up(t.devs[0], [qp], remote, [3])
        rts = [c for c in qp.calls if c[0] == "rts"]
        assert rts == [("rts", (3, want), {})]


def test_tent_max_retry_count_is_the_workers_retry_budget(rdma):
    conf = json.dumps({"transports": {"rdma": {"workers": {"max_retry_count": 3}}}})
    t = rdma(start=True, MC_TENT_CONF=conf)
    workers = [w for d in t.devs for w in d.workers]
    assert workers and all(w.retry_cnt == 3 for w in workers)
    # the TE's name wins over the TENT key, as every env var does; 0 means no retries
    cfg = load_config(env={"MC_TENT_CONF": conf, "MC_RETRY_CNT": "5"})
    assert cfg["MC_RETRY_CNT"] == 5
    t0 = rdma(start=True, MC_RETRY_CNT=0)
    assert all(w.retry_cnt == 0 for d in t0.devs for w in d.workers)


def test_grace_period_reaches_every_rdma_worker(rdma):
    conf = json.dumps({"transports": {"rdma": {"workers": {"grace_period_ns": 20_000_000}}}})
    t = rdma(start=True, MC_TENT_CONF=conf)
    workers = [w for d in t.devs for w in d.workers]
    assert workers and all(w.grace == 0.02 for w in workers)


def test_auto_gid_reprobes_the_table(rdma, monkeypatch):
    import mooncake.transports.rdma as R

    monkeypatch.setattr(R.RdmaTransport, "GID_RETRY_DELAY_S", 0.0)
    dev = _FakeDev("fake0", gid_scans_empty=2)  # the table fills in on the third scan
    t = rdma(devs=[dev], start=True, MC_AUTO_GID_MAX_RETRIES=2)
    assert t.devs[0].gid_index == 1 and dev.scans == 3
    dev = _FakeDev("fake0", gid_scans_empty=2)
    with pytest.raises(TransportUnavailable, match="after 2 probes.*MC_AUTO_GID_MAX_RETRIES=1"):
        rdma(devs=[dev], start=True, MC_AUTO_GID_MAX_RETRIES=1)
    assert dev.scans == 2


def test_auto_gid_waits_between_probes(rdma, monkeypatch):
    import mooncake.transports.rdma as R

    monkeypatch.setattr(R.RdmaTransport, "GID_RETRY_DELAY_S", 0.05)
    t0 = time.monotonic()
    rdma(devs=[_FakeDev("fake0", gid_scans_empty=2)], start=True, MC_AUTO_GID_MAX_RETRIES=4)
    assert time.monotonic() - t0 >= 0.09


def test_max_mr_size_refuses_larger_registrations_and_is_clamped(rdma):
    from mooncake.transport import Region

    t = rdma(start=True, MC_MAX_MR_SIZE="1M")
    assert t.register(Region(0x10000, 1 << 20)) == {"rkey0": 1, "numa": -1}  # not mapped here
    with pytest.raises(MooncakeError, match="MC_MAX_MR_SIZE=1048576"):
        t.register(Region(0x20000, (1 << 20) + 1))
    assert len(t.fv.mrs) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # the clamp warns, by design
        small = rdma(devs=[_FakeDev("fake0", max_mr_size=4096)], start=True)
    assert small.max_mr_size == 4096 and "MC_MAX_MR_SIZE" in small.clamped
    with pytest.raises(MooncakeError, match="MC_MAX_MR_SIZE=4096"):
        small.register(Region(0x30000, 8192))


def _stuck_endpoint(t, peer="peer:2", inst="a" * 32, pdev="p0"):
    ep = _FakeEp(users=3)
    t.devs[0].store.insert((peer, inst, pdev, 0), ep)
    return ep


def _watch_until(t, cond, limit):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit and not cond():
        t._watch()
        time.sleep(0.005)
    return time.monotonic() - t0


def test_slice_timeout_ends_stuck_slices_timeout(rdma):
    import mooncake.transports.rdma as R

    alive = {"instance": "a" * 32}
    t = rdma(rpc=lambda s, m, a: alive, MC_SLICE_TIMEOUT=0.15)
    t.stall_s = 0.03  # the peer is pinged (and answers) long before the slice timeout
    ep = _stuck_endpoint(t)
    took = _watch_until(t, lambda: ep.aborts, 2.0)
    assert ep.aborts == [R._E_TIMEOUT] and 0.14 <= took < 1.0
    assert any(m == "rdma.ping" for _, m, _ in t.calls)  # pings did not reset the clock
    assert len(t.devs[0].store) == 0  # the next submit builds a fresh endpoint


def test_without_slice_timeout_a_slow_live_peer_keeps_its_slices(rdma):
    t = rdma(rpc=lambda s, m, a: {"instance": "a" * 32})
    t.stall_s = 0.03
    ep = _stuck_endpoint(t)
    _watch_until(t, lambda: ep.aborts, 0.3)
    assert ep.aborts == [] and len(t.devs[0].store) == 1


def test_slice_timeout_does_not_fire_while_completions_flow(rdma):
    t = rdma(rpc=lambda s, m, a: {"instance": "a" * 32}, MC_SLICE_TIMEOUT=0.1)
    ep = _stuck_endpoint(t)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.4:
        ep.completions += 1
        t._watch()
        time.sleep(0.01)
    assert ep.aborts == []


def test_rail_pause_skips_a_nic_pair_that_failed_to_come_up(rdma, monkeypatch):
    t = rdma(devs=("l0",), MC_RDMA_RAIL_PAUSE_SECONDS=7)
    monkeypatch.setattr(type(t), "ROUTE_CACHE_S", 0.0)  # each submit chooses its paths afresh
    tries = []

    def connect(d, peer, inst, pdev, lane=0):
        tries.append(pdev)
        if pdev == "p1":  # as _connect does when _bring_up raises
            t._pause_rail(d.name, peer, inst, pdev, "its QPs did not come up: test")
            raise PeerUnreachable("bring-up failed")
        ep = _FakeEp(users=0)
        t._install(d, (peer, inst, pdev, lane), ep)
        return ep

    monkeypatch.setattr(t, "_connect", connect)
    peer = _peer(("p0", "p1"))
    s = _Slices()
    t.submit(peer, s)
    assert s.failed is None and t.fk.submits[-1][0] == [0]  # the working rail carries it
    assert tries == ["p0", "p1"]
    until, why = t._paused_rails[("l0", "peer:2", "a" * 32, "p1")]
    assert 6.5 < until - time.monotonic() <= 7.0 and "did not come up" in why
    t.submit(peer, _Slices())
    assert tries == ["p0", "p1"]  # no new handshake on the paused rail
    t._paused_rails[("l0", "peer:2", "a" * 32, "p1")] = (time.monotonic() - 1, why)
    t.submit(peer, _Slices())
    assert tries == ["p0", "p1", "p1"]  # cooled down: tried again


def test_rail_pause_fails_at_once_when_every_rail_is_paused(rdma, monkeypatch):
    t = rdma(devs=("l0",))
    monkeypatch.setattr(t, "_connect", lambda *a: pytest.fail("no handshake while paused"))
    t._pause_rail("l0", "peer:2", "a" * 32, "p0", "test")
    s = _Slices()
    t.submit(_peer(("p0",)), s)
    import mooncake.transports.rdma as R

    assert s.failed == R._E_PEER and t.fk.submits == []


def test_real_bring_up_failure_pauses_the_rail(rdma):
    """Through _connect itself: the handshake answers, the QPs refuse RTR."""
    reply = {"instance": "a" * 32, "gid": "00" * 16, "lid": 0, "qpns": [1, 2], "psns": [3, 4],
             "mtu": 4096}
    t = rdma(devs=("l0",), rpc=lambda s, m, a: reply, MC_RDMA_RAIL_PAUSE_SECONDS=5)

    def bad_rtr(*a):
        raise OSError(22, "ibv_modify_qp INIT->RTR: Invalid argument")

    t.fv.QP = lambda *a: SimpleNamespace(qp_num=1, to_init=lambda *x: None, to_rtr=bad_rtr,
                                         close=lambda: None)
    with pytest.raises(PeerUnreachable, match="did not come up"):
        t._endpoint(t.devs[0], "peer:2", "a" * 32, "p0")
    with pytest.raises(PeerUnreachable, match="MC_RDMA_RAIL_PAUSE_SECONDS"):
        t._endpoint(t.devs[0], "peer:2", "a" * 32, "p0")
    assert sum(m == "rdma.connect" for _, m, _ in t.calls) == 1


def test_conn_pause_after_a_peer_was_torn_down(rdma):
    def rpc(seg, method, args):
        if method == "rdma.ping":
            return {"instance": "b" * 32}  # another process answers there now
        raise PeerUnreachable("connection refused")

    t = rdma(rpc=rpc, MC_CONN_PAUSE_TTL_MS=300)
    t.stall_s = 0.02
    ep = _stuck_endpoint(t)
    _watch_until(t, lambda: ep.aborts, 1.0)
    assert ep.aborts
    n = len(t.calls)
    with pytest.raises(PeerUnreachable, match="MC_CONN_PAUSE_TTL_MS"):
        t._endpoint(t.devs[0], "peer:2", "a" * 32, "p0")
    assert len(t.calls) == n  # refused without a handshake
    time.sleep(0.32)
    with pytest.raises(PeerUnreachable, match="handshake"):  # tried again (and failed)
        t._endpoint(t.devs[0], "peer:2", "a" * 32, "p0")
    assert [m for _, m, _ in t.calls[n:]] == ["rdma.connect"]


def test_conn_pause_off_by_default(rdma):
    t = rdma()
    for _ in range(2):
        with pytest.raises(PeerUnreachable, match="handshake"):
            t._endpoint(t.devs[0], "peer:2", "a" * 32, "p0")
    assert [m for _, m, _ in t.calls] == ["rdma.connect", "rdma.connect"]
    assert t._paused_peers == {}


def _submit_cols(t, monkeypatch, pdevs):
    def connect(d, peer, inst, pdev, lane=0):
        ep = _FakeEp(users=0)
        t._install(d, (peer, inst, pdev, lane), ep)
        return ep

    monkeypatch.setattr(t, "_connect", connect)
    t.submit(_peer(pdevs), _Slices())
    return t.fk.submits[-1][0]


def test_hca_peer_affinity_picks_the_mapped_peer_nics(rdma, monkeypatch):
    t = rdma(devs=("l0",), MC_ENABLE_HCA_PEER_AFFINITY=True,
             MC_NIC_PEER_AFFINITY="l0=p2,p1;l9=p0")
    assert _submit_cols(t, monkeypatch, ("p0", "p1", "p2")) == [2, 1]
    plain = rdma(devs=("l0",), MC_NIC_PEER_AFFINITY="l0=p2")  # the map alone does nothing
    assert _submit_cols(plain, monkeypatch, ("p0", "p1", "p2")) == [0, 1, 2]


def test_hca_peer_affinity_falls_back_loudly(rdma, monkeypatch, caplog):
    t = rdma(devs=("l0",), MC_ENABLE_HCA_PEER_AFFINITY=True, MC_NIC_PEER_AFFINITY="l0=px")
    with caplog.at_level(logging.WARNING, logger="mooncake.transports.rdma"):
        assert _submit_cols(t, monkeypatch, ("p0", "p1")) == [0, 1]
    assert any("MC_NIC_PEER_AFFINITY maps l0 to px" in r.getMessage() for r in caplog.records)


# ---- issue 9: the NIC pairs a buffer goes through ---------------------------------------------


def _connecting(t, monkeypatch):
    def connect(d, peer, inst, pdev, lane=0):
        ep = _FakeEp(users=0)
        t._install(d, (peer, inst, pdev, lane), ep)
        return ep

    monkeypatch.setattr(t, "_connect", connect)


def _numa_peer(pdevs, dev_nodes, buf_node, addr=0x2000):
    """A peer publishing each NIC's NUMA node and one buffer on ``buf_node``."""
    peer = _peer(pdevs)
    peer.transports["rdma"].update({f"numa{i}": n for i, n in enumerate(dev_nodes)})
    peer.buffers = [SimpleNamespace(addr=addr, length=1 << 20, writable=True,
                                    transports={"rdma": {"rkey0": 1, "numa": buf_node}})]
    return peer


def _local_buffer(t):
    """A registered, touched buffer of this process, and its NUMA node (from the kernel)."""
    from mooncake import numa
    from mooncake.transport import Region

    buf = np.ones(1 << 20, np.uint8)
    t.register(Region(buf.ctypes.data, buf.nbytes))
    return buf, numa.node_of(buf.ctypes.data, buf.nbytes)


def test_buffer_numa_node_picks_the_local_nics_on_it(rdma, monkeypatch):
    """A buffer's pages on node N go through the NICs on node N only (both of them: one
    submit stripes over every pair); with no NIC on that node, every NIC, said so."""
    t = rdma(devs=("l0", "l1", "l2"))
    _connecting(t, monkeypatch)
    buf, node = _local_buffer(t)
    assert node is not None  # this host's kernel says where the pages are
    t.devs[0].numa, t.devs[1].numa, t.devs[2].numa = node + 1, node, node
    t.submit(_peer(("p0",)), _Slices(buf.ctypes.data))
    assert t.fk.lcols == [1, 2] and t.fk.submits[-1][0] == [0, 0]
    why = t.explain(_peer(("p0",)), buf.ctypes.data)
    assert why["local_numa"] == node and why["pairs"] == ["l1->p0", "l2->p0"]
    assert f"the NICs on the local buffer's node {node}" in why["rule"]
    for d in t.devs:
        d.numa = node + 1
    t.submit(_peer(("p0",)), _Slices(buf.ctypes.data))
    assert t.fk.lcols == [0, 1, 2]
    assert f"none on the local buffer's node {node}" in t.explain(
        _peer(("p0",)), buf.ctypes.data)["rule"]


def test_dest_affinity_picks_the_peer_nic_near_the_remote_buffer(rdma, monkeypatch):
    t = rdma(devs=("l0",), MC_ENABLE_DEST_DEVICE_AFFINITY=True)
    _connecting(t, monkeypatch)
    t.submit(_numa_peer(("p0", "p1", "p2"), (0, 1, 1), 1), _Slices())
    assert t.fk.submits[-1][0] == [1, 2]  # the peer NICs on the remote buffer's node 1
    t.submit(_numa_peer(("p0", "l0"), (0, 0), 7), _Slices())
    assert t.fk.submits[-1][0] == [1]  # none on node 7: the NIC of the same name, said so
    assert "no peer NIC on it" in t.explain(_numa_peer(("p0", "l0"), (0, 0), 7))["rule"]
    off = rdma(devs=("l0",))
    _connecting(off, monkeypatch)
    off.submit(_numa_peer(("p0", "p1", "p2"), (0, 1, 1), 1), _Slices())
    assert off.fk.submits[-1][0] == [0, 1, 2]


def test_rail_topo_path_direct_pairs_override(rdma, monkeypatch, tmp_path):
    f = tmp_path / "rails.json"
    f.write_text(json.dumps({"all": [{"local": "l0", "remote": "p0"},
                                     {"local": "l1", "remote": "p1"}],
                             "direct": [{"local": "l1", "remote": "p1"}]}))
    t = rdma(devs=("l0", "l1"), **{"transports/rdma/workers/rail_topo_path": str(f)})
    _connecting(t, monkeypatch)
    t.submit(_peer(("p0", "p1")), _Slices())
    assert t.fk.lcols == [1] and t.fk.submits[-1][0] == [1]
    assert t.explain(_peer(("p0", "p1")))["rule"] == "rail_topo_path direct pairs"
    for bad in ('{"all": [{"local": "l0"}]}', '[]', '{"direct": 5}', "{", '{"x": []}'):
        f.write_text(bad)
        with pytest.raises(ConfigError, match="rail_topo_path"):
            rdma(devs=("l0",), **{"transports/rdma/workers/rail_topo_path": str(f)})


def test_partition_matchings_pick_the_measured_pair(rdma, monkeypatch, tmp_path):
    """topology/cluster_topology_path: the pairs listed for (local buffer node, remote buffer
    node) win over the NUMA rule; a partition the file lacks falls back to it, said so."""
    t0 = rdma(devs=("l0",))
    buf0, node = _local_buffer(t0)  # where this host puts a fresh buffer's pages
    m = {"src_numa": node, "dst_numa": 1, "bandwidth": 21926.19, "latency": 7.95}
    f = tmp_path / "cluster-topology.json"
    f.write_text(json.dumps({"partition_matchings": {f"{node}-1": [
        dict(m, src_dev="l1", dst_dev="p1"), dict(m, src_dev="l0", dst_dev="p0")]}}))
    t = rdma(devs=("l0", "l1"), **{"topology/cluster_topology_path": str(f)})
    _connecting(t, monkeypatch)
    buf, _ = _local_buffer(t)
    near, far = _numa_peer(("p0", "p1"), (0, 1), 1), _numa_peer(("p0", "p1"), (0, 1), 3)
    far.timestamp = 2  # another descriptor
    t.submit(near, _Slices(buf.ctypes.data))
    assert t.fk.lcols == [1, 0] and t.fk.submits[-1][0] == [1, 0]
    why = t.explain(near, buf.ctypes.data)
    assert why["rule"] == f"cluster topology partition {node}-1"
    assert why["pairs"] == ["l1->p1", "l0->p0"]
    other = t.explain(far, buf.ctypes.data)
    assert "partition" not in other["rule"] and len(other["pairs"]) == 4
    f.write_text('{"partition_matchings": {"0-1": [{"src_dev": 5}]}}')
    with pytest.raises(ConfigError):
        rdma(devs=("l0",), **{"topology/cluster_topology_path": str(f)})


def test_service_level_and_traffic_class_reach_every_qp(rdma):
    remote = {"gid": "00" * 16, "lid": 0, "mtu": 4096, "qpns": [5], "psns": [9]}
    t = rdma(MC_IB_SL=3, MC_IB_TC=96)
    qp = _FakeQP()
    t._bring_up(t.devs[0], [qp], remote, [3])
    assert qp.rtr_kw == {"service_level": 3} and qp.calls[0][1][-1] == 96
    unset = rdma()
    qp = _FakeQP()
    unset._bring_up(unset.devs[0], [qp], remote, [3])
    assert qp.rtr_kw == {"service_level": 0} and qp.calls[0][1][-1] == 0


def test_num_lanes_sets_workers_qps_and_cqs(rdma, monkeypatch):
    """TENT's lanes: num_lanes workers and CQs per device, and per NIC pair num_lanes
    endpoints of one QP, lane i on worker i, so one pair is posted to by every worker."""
    t = rdma(start=True, **{"transports/rdma/num_lanes": 3})
    assert t.workers_per_ctx == t.lanes == 3 and t.qp_per_ep == 1
    assert len(t.devs[0].workers) == 3 and len(t.devs[0].slots) == 3
    placed = [t._place(t.devs[0], lane)[0] for lane in range(3)]
    assert placed == t.devs[0].workers
    lanes = []

    def connect(d, peer, inst, pdev, lane=0):
        lanes.append(lane)
        ep = _FakeEp(users=0)
        t._install(d, (peer, inst, pdev, lane), ep)
        return ep


    monkeypatch.setattr(t, "_connect", connect)
    t.submit(_peer(("p0",)), _Slices())
    assert lanes == [0, 1, 2] and t.fk.submits[-1][0] == [0, 0, 0]
    assert len(set(map(id, t.fk.submits[-1][1]))) == 3  # three endpoints for the one pair
    t.submit(_peer(("p0",)), _Slices())
    assert lanes == [0, 1, 2]  # kept
    with pytest.raises(ConfigError, match="inconsistent RDMA lanes.*MC_NUM_QP_PER_EP"):
        rdma(**{"transports/rdma/num_lanes": 3, "MC_NUM_QP_PER_EP": 2})


def test_rail_monitor_pauses_after_three_errors_in_ten_seconds(rdma, monkeypatch):
    """TENT's rail monitor: 3 errors on one NIC pair within 10 s pause it; fewer, or spread
    wider, do not; a rail that failed again pauses twice as long (MC_RDMA_RAIL_PAUSE_SECONDS
    first), at most 300 s; one that carries work again starts over."""
    t = rdma(devs=("l0",), MC_RDMA_RAIL_PAUSE_SECONDS=100)
    rail = ("l0", "peer:2", "a" * 32, "p0")
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    t._rail_error(*rail, "x")
    t._rail_error(*rail, "x")
    assert rail not in t._paused_rails
    clock[0] += 11  # the first two fell out of the window
    t._rail_error(*rail, "x")
    assert rail not in t._paused_rails
    t._rail_error(*rail, "x")
    t._rail_error(*rail, "y")
    until, why = t._paused_rails[rail]
    assert until - clock[0] == 100 and "3 errors within 10s, the last: y" in why
    pauses = []
    for _ in range(4):
        t._pause_rail(*rail, "again")
        pauses.append(t._paused_rails[rail][0] - clock[0])
    assert pauses == [200, 300, 300, 300]  # doubling, capped
    t._rail_ok(*rail)
    t._pause_rail(*rail, "after recovery")
    assert t._paused_rails[rail][0] - clock[0] == 100


def test_an_errored_endpoint_counts_against_its_rail(rdma, monkeypatch):
    t = rdma(devs=("l0",))
    _connecting(t, monkeypatch)
    rail, key = ("l0", "peer:2", "a" * 32, "p0"), ("peer:2", "a" * 32, "p0", 0)
    for status, counted in ((12, 1), (10, 1), (-5, 2)):  # retries exceeded / refused / post
        bad = _FakeEp(users=0)
        bad.healthy, bad.last_status = 1, status  # one of its two QPs went to error
        t._install(t.devs[0], key, bad)
        t._endpoint(t.devs[0], *key)
        assert len(t._rail_errors[rail]) == counted, status
    ours = _FakeEp(users=0)  # our own abort (a timeout) is no fault of the rail
    ours.healthy, ours.last_status, ours.aborted = 0, 12, True
    t._install(t.devs[0], key, ours)
    t._endpoint(t.devs[0], *key)
    assert len(t._rail_errors[rail]) == 2


def test_a_path_choice_is_reused_until_something_changes(rdma, monkeypatch):
    """submit keeps its last choice per (descriptor, local region, remote buffer): the next
    small transfer makes no path selection; a pause, a failed or retired endpoint, or
    ROUTE_CACHE_S passing, makes it choose again."""
    t = rdma(devs=("l0", "l1"))
    _connecting(t, monkeypatch)
    calls = []
    real = t._paths
    monkeypatch.setattr(t, "_paths", lambda *a: calls.append(1) or real(*a))
    peer = _peer(("p0",))
    t.submit(peer, _Slices())
    t.submit(peer, _Slices())
    assert len(calls) == 1 and len(t.fk.submits) == 2
    t._pause_rail("l0", "peer:2", "a" * 32, "p0", "down")
    t.submit(peer, _Slices())
    assert len(calls) == 2 and t.fk.lcols == [1]  # the paused rail is out at once
    sick = t.fk.submits[-1][1][0]
    sick.healthy = 1  # a QP of the cached endpoint failed
    t.submit(peer, _Slices())
    assert len(calls) == 3
    monkeypatch.setattr(type(t), "ROUTE_CACHE_S", 0.0)
    t.submit(peer, _Slices())
    assert len(calls) == 4


def test_rail_counters_survive_retired_endpoints(rdma, monkeypatch):
    """rails(): per NIC pair, the kernel's work completions (live and retired endpoints), the
    errors the monitor counted, pauses and whether paused now (what /metrics exports)."""
    t = rdma(devs=("l0",))
    key = ("peer:2", "a" * 32, "p0", 0)
    ep = _FakeEp(users=0)
    ep.completions, ep.info = 7, {"dev": t.devs[0], "key": key}
    t._install(t.devs[0], key, ep)
    assert t.rails() == [{"local": "l0", "peer": "peer:2", "remote": "p0", "completions": 7,
                          "errors": 0, "pauses": 0, "paused": False}]
    with t._lock:
        t._retire([t.devs[0].store.remove(key, ep)])
    for _ in range(3):
        t._rail_error("l0", *key[:3], "retries exceeded")
    row = t.rails()[0]
    assert row["completions"] == 7 and row["errors"] == 3 and row["pauses"] == 1
    assert row["paused"]


def test_a_rail_that_just_failed_is_avoided_while_a_clean_one_remains(rdma, monkeypatch):
    """TENT's fallback: the retry of a failed transfer goes over the other rails; with no clean
    rail left, every rail is tried again."""
    t = rdma(devs=("l0", "l1"))
    _connecting(t, monkeypatch)
    peer = _peer(("p0",))
    t._rail_error("l0", "peer:2", "a" * 32, "p0", "retries exceeded")
    t.submit(peer, _Slices())
    assert t.fk.lcols == [1]
    t._rail_error("l1", "peer:2", "a" * 32, "p0", "retries exceeded")
    t.submit(peer, _Slices())
    assert t.fk.lcols == [0, 1]


def test_every_rail_paused_leaves_the_peer_to_another_transport(rdma):
    t = rdma(devs=("l0", "l1"))
    peer = _peer(("p0",))
    assert t.can_reach(peer) is None
    t._pause_rail("l0", "peer:2", "a" * 32, "p0", "down")
    assert t.can_reach(peer) is None  # l1 -> p0 still works
    t._pause_rail("l1", "peer:2", "a" * 32, "p0", "down too")
    why = t.can_reach(peer)
    assert why.startswith("every RDMA rail to peer:2 is paused") and "down" in why


def test_nic_peer_affinity_syntax():
    from mooncake.transports.rdma import parse_nic_affinity

    assert parse_nic_affinity("mlx5_0=mlx5_1,mlx5_2; mlx5_1=mlx5_3;") == {
        "mlx5_0": ["mlx5_1", "mlx5_2"], "mlx5_1": ["mlx5_3"]}
    assert parse_nic_affinity("") == {}
    for bad in ("mlx5_0", "mlx5_0=", "=mlx5_1", "a b=c"):
        with pytest.raises(ConfigError, match="MC_NIC_PEER_AFFINITY"):
            parse_nic_affinity(bad)


# ---- logs and metrics ------------------------------------------------------------------------


@pytest.fixture
def restore_logging():
    names = [*LOG_ROOTS, "mooncake.engine", "mooncake.transports.tcp", "mooncake.transports.rdma",
             "mooncake.transports.shm", METRIC_LOGGER]
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in names}
    yield
    for n, (level, handlers) in saved.items():
        lg = logging.getLogger(n)
        lg.setLevel(level)
        for h in list(lg.handlers):
            if h not in handlers:
                lg.removeHandler(h)
                h.close()


PROJECT_LOGGERS = ["mooncake.engine", "mooncake.config", "mooncake.rpc", "mooncake.transports.tcp",
                   "mooncake.transports.rdma", "mooncake.transports.cxl", "mooncake.transports.shm",
                   "mooncake.metadata.http_server"]


def test_log_level_governs_every_project_logger(restore_logging):
    from mooncake.engine import _set_log_level

    _set_log_level("WARNING")
    for name in PROJECT_LOGGERS:
        lg = logging.getLogger(name)
        assert not lg.isEnabledFor(logging.INFO) and lg.isEnabledFor(logging.WARNING), name
    _set_log_level("TRACE")
    assert all(logging.getLogger(n).isEnabledFor(logging.DEBUG) for n in PROJECT_LOGGERS)


def test_every_project_logger_is_under_a_governed_root():
    """Each getLogger(...) of the project (module loggers and named ones) is under a root
    MC_LOG_LEVEL sets."""
    roots = C.log_roots()
    assert {"mooncake"} <= set(roots)
    found = 0
    for rel in [*MODULES, "mooncake/config.py"]:
        for m in re.finditer(r"""getLogger\((__name__|"[\w.]+"|'[\w.]+')\)""", _source(rel)):
            arg = m.group(1)
            module = rel[:-3].replace("/", ".")  # transports/ installs as mooncake.transports
            module = "mooncake." + module if module.startswith("transports.") else module
            name = module if arg == "__name__" else arg.strip("\"'")
            found += 1
            assert name.split(".")[0] in roots, f"{rel}: logger {name!r}"
    assert found >= 8


def test_engine_applies_log_level_to_the_transports(restore_logging):
    from mooncake.engine import TransferEngine

    with TransferEngine("127.0.0.1", protocol="tcp", MC_LOG_LEVEL="ERROR"):
        for name in PROJECT_LOGGERS:
            assert logging.getLogger(name).getEffectiveLevel() == logging.ERROR, name


def test_log_dir_writes_every_project_logger_once(restore_logging, tmp_path):
    from mooncake.engine import _set_log_level

    _set_log_level("INFO", str(tmp_path / "logs"))
    _set_log_level("INFO", str(tmp_path / "logs"))  # a second engine: no second handler
    logging.getLogger("mooncake.transports.tcp").info("from tcp")
    logging.getLogger("mooncake.engine").info("from engine")
    logging.getLogger("mooncake.transports.tcp").debug("hidden")
    for h in logging.getLogger("mooncake").handlers:
        h.flush()
    text = (tmp_path / "logs" / "mooncake.log").read_text()
    assert text.count("from tcp") == 1 and text.count("from engine") == 1
    assert "hidden" not in text
    with pytest.raises(ConfigError, match="MC_LOG_DIR"):
        (tmp_path / "file").write_text("")
        _set_log_level("INFO", str(tmp_path / "file"))


def test_metric_line_is_not_filtered_by_log_level(restore_logging, caplog):
    from mooncake.engine import TransferEngine

    with caplog.at_level(logging.DEBUG):  # the handler takes everything; loggers decide
        with TransferEngine("127.0.0.1", protocol="tcp", MC_LOG_LEVEL="WARNING",
                            MC_TE_METRIC=True, MC_TE_METRIC_INTERVAL_SECONDS=0.1) as e:
            logging.getLogger("mooncake.engine").info("an info line")
            time.sleep(0.35)
            name = e.segment_name
    metric = [r for r in caplog.records if r.name == METRIC_LOGGER]
    assert metric and all(r.getMessage().startswith("throughput ") for r in metric)
    assert name in metric[0].getMessage()
    assert not any(r.getMessage() == "an info line" for r in caplog.records)


METRIC_SCRIPT = r"""
import time, numpy as np
from mooncake.engine import TransferEngine
MiB = 1 << 20
with TransferEngine("127.0.0.1", protocol="tcp") as target, \
        TransferEngine("127.0.0.1", protocol="tcp") as e:
    dst = np.zeros(MiB, np.uint8); target.register(dst)
    src = np.ones(MiB, np.uint8); e.register(src)
    for _ in range(4):
        e.write(target.segment_name, src, dst.ctypes.data)
    time.sleep(0.5)
"""


def test_metric_line_prints_to_stderr_at_warning_level_without_logging_setup():
    """Like Mooncake: MC_TE_METRIC=1 with MC_LOG_LEVEL=WARNING (the seed's template) prints
    the throughput line; the engine's INFO lines stay hidden; nothing configures logging."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MC_")}
    env.update(MC_TE_METRIC="1", MC_TE_METRIC_INTERVAL_SECONDS="0.15", MC_LOG_LEVEL="WARNING",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", METRIC_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "mooncake.metrics: throughput" in ln]
    assert lines, r.stderr
    assert any(not re.search(r"throughput 0\.000 ", ln) for ln in lines), lines
    assert " up: transports " not in r.stderr  # the engine's INFO line is filtered


def test_metric_fallback_steps_aside_for_configured_handlers(restore_logging, capsys):
    lg = C.metric_logger()
    C.metric_logger()  # idempotent: one fallback handler
    assert sum(isinstance(h, C._MetricFallback) for h in lg.handlers) == 1
    seen = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    g = Grab()
    lg.addHandler(g)
    try:
        lg.info("throughput 1.000 GB/s")
    finally:
        lg.removeHandler(g)
    assert seen == ["throughput 1.000 GB/s"]
    assert "throughput" not in capsys.readouterr().err

"""The plugin registry: an out-of-tree transport installed as its own distribution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from mooncake.errors import TransportUnavailable
from mooncake.registry import (
    get_transport,
    register_transport,
    transport_status,
    unregister_transport,
)

PLUGIN = textwrap.dedent('''
    """A real out-of-tree transport: WRITE/READ through the target's RPC port."""
    import base64, ctypes
    from mooncake.errors import PeerUnreachable
    from mooncake.transport import REMOTE_WRITE, Transport

    E_REFUSED, E_PEER, E_DENIED = 1000, 1001, 1007  # mooncake._core.batch.E_*

    class RpcCopyTransport(Transport):
        name = "rpccopy"
        auto_priority = 500

        def start(self):
            self.ctx.add_rpc_handler("rpccopy.write", self._write)
            self.ctx.add_rpc_handler("rpccopy.read", self._read)
            return {"v": 1}

        def _check(self, a):
            if not self.ctx.regions.contains(a["addr"], a["len"]):
                raise ValueError("range outside registered memory")

        def _write(self, a):
            self._check(a)
            if not self.ctx.regions.flags(a["addr"], a["len"]) & REMOTE_WRITE:
                raise PermissionError("read-only region")
            ctypes.memmove(a["addr"], base64.b64decode(a["data"]), a["len"])
            return {}

        def _read(self, a):
            self._check(a)
            return base64.b64encode(ctypes.string_at(a["addr"], a["len"])).decode()

        def submit(self, peer, slices):
            for task, op, local, remote, n in slices:
                try:
                    if op == 1:
                        data = base64.b64encode(ctypes.string_at(local, n)).decode()
                        self.ctx.rpc_call(peer.name, "rpccopy.write",
                                          {"addr": remote, "len": n, "data": data})
                    else:
                        got = self.ctx.rpc_call(peer.name, "rpccopy.read",
                                                {"addr": remote, "len": n})
                        ctypes.memmove(local, base64.b64decode(got), n)
                    slices.batch.slice_done(task, n)
                except PeerUnreachable:  # the engine refetches the descriptor and retries
                    slices.batch.slice_done(task, 0, E_PEER)
                except Exception as e:
                    denied = "PermissionError" in str(e) or "read-only" in str(e)
                    slices.batch.slice_done(task, 0, E_DENIED if denied else E_REFUSED)

    class Broken(Transport):
        name = "broken"

        @classmethod
        def probe(cls):
            return "needs hardware this machine lacks"
''')

SCRIPT = textwrap.dedent('''
    import json, numpy as np
    from mooncake.engine import TransferEngine
    from mooncake.registry import transport_status
    rows = {r.name: r.__dict__ for r in transport_status()}
    a = TransferEngine("127.0.0.1", protocol="rpccopy")
    b = TransferEngine("127.0.0.1", protocol="rpccopy")
    src = np.arange(1000, dtype=np.uint8); dst = np.zeros(1000, np.uint8)
    a.register(src); b.register(dst)
    a.write(b.segment_name, src, dst.ctypes.data)
    ok = bool((src == dst).all())
    chosen = a.explain(b.segment_name)["chosen"]
    try:
        TransferEngine("127.0.0.1", protocol="broken")
        broken = "started"
    except Exception as e:
        broken = f"{type(e).__name__}: {e}"
    a.close(); b.close()
    print(json.dumps({"rows": rows, "ok": ok, "chosen": chosen, "broken": broken}))
''')


@pytest.fixture
def plugin_dist(tmp_path):
    """``mc-rpccopy`` as an installed distribution (dist-info + module) on a path entry."""
    (tmp_path / "mc_rpccopy.py").write_text(PLUGIN)
    info = tmp_path / "mc_rpccopy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mc-rpccopy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[mooncake.transports]\nrpccopy = mc_rpccopy:RpcCopyTransport\n"
        "broken = mc_rpccopy:Broken\nghost = mc_rpccopy_missing:Ghost\n")
    return tmp_path


def _run(path, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_out_of_tree_transport_selected_by_name(plugin_dist):
    r = _run(plugin_dist, SCRIPT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    rows = out["rows"]
    assert rows["rpccopy"]["distribution"] == "mc-rpccopy" and rows["rpccopy"]["available"]
    assert rows["tcp"]["distribution"] == "mooncake" and rows["tcp"]["available"]
    assert not rows["broken"]["available"]
    assert rows["broken"]["reason"] == "needs hardware this machine lacks"
    assert not rows["ghost"]["available"] and "ModuleNotFoundError" in rows["ghost"]["reason"]
    assert out["ok"] and out["chosen"] == "rpccopy"
    assert out["broken"].startswith("TransportUnavailable") and "lacks" in out["broken"]


#: what a third party writes to run the conformance suite for its transport
CONFORMANCE = textwrap.dedent('''
    from mooncake.testing.conformance import Conformance, TransportSpec

    SYNC = ("submit() copies synchronously, in the caller: nothing is in flight when a wait "
            "starts, so no transfer can time out")

    class TestRpcCopy(Conformance):
        spec = TransportSpec(
            "rpccopy", refused_by="target", max_size=4 << 20,  # base64 over RPC: slow
            peer_serves=False,  # a stopped peer would block submit() itself, slice by slice
            unsupported={"timeout_isolation": SYNC, "timeout_silence": SYNC})
''')


def test_out_of_tree_transport_runs_the_conformance_suite(plugin_dist):
    """The suite as a third party runs it: its own test file, its own pytest run."""
    (plugin_dist / "test_rpccopy_conformance.py").write_text(CONFORMANCE)
    env = dict(os.environ, PYTHONPATH=f"{plugin_dist}{os.pathsep}"
                                      f"{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "test_rpccopy_conformance.py"], cwd=plugin_dist, env=env,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    summary = out.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, summary
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    # exactly what the spec declares, and the integrity sizes above its max_size
    assert sum("does not apply" in s for s in skipped) == 2, skipped
    assert all("does not apply: submit() copies synchronously" in s or "max_size" in s
               for s in skipped), skipped


def test_cli_lists_plugins(plugin_dist):
    r = _run(plugin_dist, "import sys; from mooncake.cli import main; "
                          "sys.exit(main(['transports', '--json']))")
    assert r.returncode == 0, r.stderr
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert {"tcp", "shm", "rpccopy", "ghost"} <= set(rows)
    assert rows["ghost"]["available"] is False


def test_runtime_registration():
    from mooncake.transport import Transport

    class T(Transport):
        name = "rt-test"

    register_transport("rt-test", T)
    try:
        assert get_transport("rt-test") is T
        with pytest.raises(ValueError, match="already registered"):
            register_transport("rt-test", T)
        register_transport("rt-test", "mooncake.transport:Transport", clobber=True)
        assert get_transport("rt-test").__name__ == "Transport"
        assert any(r.name == "rt-test" and r.distribution == "<runtime>"
                   for r in transport_status())
    finally:
        unregister_transport("rt-test")
    with pytest.raises(TransportUnavailable, match="no transport named"):
        get_transport("rt-test")


def test_import_mooncake_loads_no_plugin():
    r = subprocess.run([sys.executable, "-c", "import sys, mooncake; "
                        "print([m for m in sys.modules if 'transports' in m])"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]"


def test_builtin_transports_install_inside_the_namespace(tmp_path):
    """The first-party transports import as ``mooncake.transports.*``; a folder named
    ``transports`` elsewhere on the path (the current directory) cannot shadow them."""
    (tmp_path / "transports").mkdir()
    (tmp_path / "transports" / "__init__.py").write_text("raise SystemExit('shadowed')\n")
    code = ("import json; from mooncake.registry import transport_status; "
            "print(json.dumps({r.name: r.target for r in transport_status()}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    targets = json.loads(r.stdout)
    assert {"tcp", "shm", "cxl", "rdma"} <= set(targets)
    assert all(targets[n].startswith(f"mooncake.transports.{n}:") for n in ("tcp", "shm", "rdma"))


PLUGIN_OPTS = textwrap.dedent('''
    from mooncake.options import Option
    from mooncake.transport import Transport

    class Knobbed(Transport):
        name = "knobbed"
        options = (Option("MC_KNOBBED_DEPTH", int, 4, range=(1, 64), owner="knobbed",
                          doc="queue depth of the knobbed transport",
                          reads=("mooncake/transport.py",)),
                   Option("MC_SLICE_SIZE", int, 1, owner="knobbed", doc="a clash",
                          reads=("mooncake/transport.py",)))
        forced_by = ""

        @classmethod
        def check_config(cls, v, src, warn):
            if v["MC_KNOBBED_DEPTH"] > 32:
                warn(f"MC_KNOBBED_DEPTH={v['MC_KNOBBED_DEPTH']} is deep")
''')


def test_a_plugin_declares_its_own_options(tmp_path, caplog):
    """The configuration table gathers a transport's rows through the registry: a third-party
    plugin's knob is parsed, range-checked, shown and cross-checked like a built-in one, and a
    row that clashes with an existing one is ignored with a warning."""
    import logging

    from mooncake.config import all_options, load_config, show
    from mooncake.errors import ConfigError

    (tmp_path / "mc_knobbed.py").write_text(PLUGIN_OPTS)
    sys.path.insert(0, str(tmp_path))
    try:
        register_transport("knobbed", "mc_knobbed:Knobbed")
        with caplog.at_level(logging.WARNING, logger="mooncake.config"):
            rows = {o.name: o for o in all_options()}
        assert rows["MC_KNOBBED_DEPTH"].owner == "knobbed"
        assert rows["MC_SLICE_SIZE"].owner == "engine"  # the clash did not replace the row
        assert any("knobbed" in r.getMessage() and "MC_SLICE_SIZE" in r.getMessage()
                   for r in caplog.records)
        cfg = load_config(env={"MC_KNOBBED_DEPTH": "40"})
        assert cfg["MC_KNOBBED_DEPTH"] == 40 and cfg.source("MC_KNOBBED_DEPTH") == \
            "env:MC_KNOBBED_DEPTH"
        assert any("is deep" in n for n in cfg.notes)
        with pytest.raises(ConfigError, match="MC_KNOBBED_DEPTH"):
            load_config(env={"MC_KNOBBED_DEPTH": "65"})
        assert "MC_KNOBBED_DEPTH" in show(env={})
    finally:
        unregister_transport("knobbed")
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mc_knobbed", None)
    assert "MC_KNOBBED_DEPTH" not in {o.name for o in all_options()}


def test_cli_exits_quietly_on_a_closed_pipe():
    """``mooncake config show | head -1``: no traceback, 141 as a C tool killed by SIGPIPE."""
    import fcntl

    p = subprocess.Popen([sys.executable, "-m", "mooncake", "config", "show"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fcntl.fcntl(p.stdout, fcntl.F_SETPIPE_SZ, 4096)  # smaller than the output: the writer waits
    assert os.read(p.stdout.fileno(), 64)  # a little of it, not a buffer's worth
    time.sleep(0.5)  # the command fills the pipe and blocks, still writing
    p.stdout.close()  # the reader goes away while the command is still writing
    err = p.stderr.read()
    assert p.wait(timeout=60) == 141
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err

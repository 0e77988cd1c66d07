"""The verbs kernels build from mooncake's own declarations (mooncake/_core/mc_ibv.h) and open
libibverbs.so.1 at run time: what happens when the library is missing or lacks a function,
that no rdma-core header or link is involved, and that the shipped layouts are rdma-core's.

``MOONCAKE_IBVERBS`` names the library the loader opens instead of ``libibverbs.so.1`` (a soname
or a path); these tests point it at one that does not exist.  The layout check compiles the same
offsetof/sizeof/enum listing against mc_ibv.h and against /usr/include/infiniband/verbs.h and
runs where that header is installed (libibverbs-dev); the rest need only a C compiler.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "mooncake" / "_core"
HEADER = CORE / "mc_ibv.h"
SYSTEM_HEADER = Path("/usr/include/infiniband/verbs.h")
CC = shutil.which("cc") or shutil.which("gcc")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mooncake._core.verbs") is None,
                                reason="the verbs kernels are not built")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler")

ABSENT = "libmooncake-test-absent-ibverbs.so.1"

PROBE = r"""
import errno, json
from mooncake._core import verbs as V
from mooncake._core import verbs_kernel  # imports too: its own table stays empty
out = {"library": V.library(), "error": V.library_error()}
for name, call in (("device_names", V.device_names), ("device", lambda: V.Device("rxe0")),
                   ("wc_status_str", lambda: V.wc_status_str(0))):
    try:
        call()
        out[name] = "ran"
    except OSError as e:
        out[name] = [e.errno, str(e)]
from mooncake.transports.rdma import RdmaTransport
out["probe"] = RdmaTransport.probe()
from mooncake.registry import transport_status
row = next(r for r in transport_status() if r.name == "rdma")
out["row"] = {"available": row.available, "reason": row.reason, "detail": row.detail}
print(json.dumps(out))
"""


def _probe(env: dict[str, str]) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_missing_library_leaves_rdma_unavailable_with_the_reason():
    """No libibverbs: the modules import, every verb raises ELIBACC naming the library and the
    package to install, and the rdma transport reports exactly that (no crash)."""
    out = _probe({"MOONCAKE_IBVERBS": ABSENT})
    err = out["error"]
    assert err and err.startswith(f"{ABSENT} not found") and "libibverbs1" in err, err
    assert out["library"] == {"soname": ABSENT, "path": None, "error": err}
    for verb in ("device_names", "device", "wc_status_str"):
        code, msg = out[verb]
        assert code == 79 and err in msg, (verb, out[verb])  # ELIBACC
    assert out["probe"] == f"unavailable: {err}"
    assert out["row"]["available"] is False and out["row"]["reason"] == f"unavailable: {err}"
    assert "mc_ibv.h" in out["row"]["detail"] and "not loaded" in out["row"]["detail"]


def test_missing_library_is_shown_by_mooncake_transports():
    r = subprocess.run([sys.executable, "-m", "mooncake", "transports"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "MOONCAKE_IBVERBS": ABSENT})
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("rdma "))
    assert f"{ABSENT} not found" in row and "shipped" in row and "not loaded" in row, row


def test_engine_asking_for_rdma_without_the_library_fails_with_the_reason():
    code = ("from mooncake.engine import TransferEngine\n"
            "from mooncake.errors import TransportUnavailable\n"
            "try:\n"
            "    TransferEngine('127.0.0.1', metadata='p2p', protocol='rdma')\n"
            "except TransportUnavailable as e:\n"
            "    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MOONCAKE_IBVERBS": ABSENT})
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and f"{ABSENT} not found" in r.stdout, r.stdout


@needs_cc
def test_library_lacking_a_function_is_refused(tmp_path):
    """A libibverbs.so.1 found first on the loader's search path (no override: the default
    soname is resolved at run time) that lacks a function we call: refused, by name."""
    (tmp_path / "stub.c").write_text("void *ibv_get_device_list(int *n) { return 0; }\n")
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(tmp_path / "libibverbs.so.1"),
                    str(tmp_path / "stub.c")], check=True, timeout=60)
    out = _probe({"LD_LIBRARY_PATH": str(tmp_path), "MOONCAKE_IBVERBS": ""})
    err = out["error"]
    assert err == ("libibverbs.so.1 has no ibv_free_device_list@IBVERBS_1.1: rdma-core v32 or "
                   "newer is needed (the rdma transport uses it)"), err
    assert out["library"]["path"] is None
    assert out["device_names"][0] == 79 and out["row"]["available"] is False


def _needed(so: Path) -> list[str]:
    r = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, timeout=60,
                       check=True)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", r.stdout)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="no readelf (binutils)")
def test_verbs_modules_do_not_link_libibverbs():
    for mod in ("mooncake._core.verbs", "mooncake._core.verbs_kernel"):
        spec = importlib.util.find_spec(mod)
        assert spec is not None and spec.origin, mod
        needed = _needed(Path(spec.origin))
        assert needed and not [n for n in needed if "ibverbs" in n], (mod, needed)


LOADER = r"""
#include "mc_ibv.h"
int main(int argc, char **argv) {
    char err[1024];
    int n = -1;
    struct ibv_device **list;
    if (mc_ibv_load(argc > 1 ? argv[1] : NULL, err, sizeof(err)) != 0) {
        printf("error %s\n", err);
        return 0;
    }
    list = mc_ibv_get_device_list(&n);
    if (list != NULL)
        mc_ibv_free_device_list(list);
    printf("loaded %s %d\n", mc_ibv_loaded_path(), list != NULL ? n : 0);
    return 0;
}
"""


@needs_cc
def test_header_alone_builds_a_program_that_finds_what_the_module_finds(tmp_path):
    """mc_ibv.h pulls in no rdma-core header (the compiler's include trace has no
    infiniband/), and a C program built on it alone sees what the verbs module sees."""
    src = tmp_path / "loader.c"
    src.write_text(LOADER)
    exe = tmp_path / "loader"
    r = subprocess.run([CC, "-H", "-std=gnu11", "-D_GNU_SOURCE", f"-I{CORE}", str(src), "-o",
                        str(exe), "-ldl"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    trace = [line for line in r.stderr.splitlines() if line.startswith(".")]
    assert any(line.endswith("mc_ibv.h") for line in trace), trace
    assert not [line for line in trace if "infiniband" in line or "rdma/" in line], trace
    from mooncake._core import verbs as V

    lib = V.library()
    got = subprocess.run([str(exe), lib["soname"]], capture_output=True, text=True,
                         timeout=60).stdout.split()
    if lib["error"]:
        assert got[0] == "error" and " ".join(got[1:]) == lib["error"]
    else:
        assert got == ["loaded", lib["path"], str(len(V.device_names()))]
    absent = subprocess.run([str(exe), ABSENT], capture_output=True, text=True, timeout=60)
    assert absent.stdout.startswith(f"error {ABSENT} not found"), absent.stdout


# ---- the shipped layouts against rdma-core's header ------------------------------------------


def _members(body: str) -> list[str]:
    """Member designators of a struct body: nested named members as ``a.b``, members of an
    anonymous union hoisted; the ``_slot*`` placeholders of ibv_context_ops skipped."""
    stack: list[list[str]] = [[]]
    for raw in body.splitlines():
        line = re.sub(r"/\*.*?\*/", "", raw).strip()
        if not line:
            continue
        if re.fullmatch(r"(struct|union)\s*\{", line):
            stack.append([])
        elif m := re.fullmatch(r"\}\s*(\w*)\s*;", line):
            inner = stack.pop()
            if m.group(1):
                stack[-1] += [m.group(1)] + [f"{m.group(1)}.{p}" for p in inner]
            else:
                stack[-1] += inner
        elif line.endswith(";"):
            fn = re.search(r"\(\*(\w+)\)", line)
            name = fn.group(1) if fn else re.search(r"(\w+)\s*(\[[^\]]*\])?\s*;$", line).group(1)
            if not name.startswith("_slot"):
                stack[-1].append(name)
    assert len(stack) == 1, body
    return stack[0]


def _declared() -> tuple[dict[str, list[str]], list[str]]:
    text = HEADER.read_text()
    types = {f"{kind} {name}": _members(body) for kind, name, body in re.findall(
        r"^(struct|union) (ibv_\w+) \{\n(.*?)^\};", text, re.M | re.S)}
    enums = [c for block in re.findall(r"\benum\b[^{;]*\{([^}]*)\}", text)
             for c in re.findall(r"\b(IBV_\w+)\b\s*(?:=[^,]*)?(?:,|$)", block)]
    return types, enums


def _listing(types: dict[str, list[str]], enums: list[str]) -> str:
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#ifdef SYSTEM",
             "#include <infiniband/verbs.h>", "#else", '#include "mc_ibv.h"', "#endif",
             "int main(void) {"]
    for t, members in types.items():
        lines.append(f'    printf("{t} size=%zu\\n", sizeof({t}));')
        for m in members:
            lines.append(f'    printf("{t} {m}=%zu +%zu\\n", offsetof({t}, {m}), '
                         f"sizeof((({t} *)0)->{m}));")
    lines += [f'    printf("{e}=%lld\\n", (long long){e});' for e in enums]
    return "\n".join(lines + ["    return 0;", "}"]) + "\n"


def _run_listing(tmp_path: Path, src: Path, system: bool) -> dict[str, str]:
    exe = tmp_path / ("sys" if system else "ours")
    subprocess.run([CC, "-std=gnu11", "-D_GNU_SOURCE", *(["-DSYSTEM"] if system else []),
                    f"-I{CORE}", str(src), "-o", str(exe), "-ldl"], check=True, timeout=120)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=60)
    return dict(line.split("=", 1) for line in out.stdout.splitlines())


@needs_cc
@pytest.mark.skipif(not SYSTEM_HEADER.exists(), reason="rdma-core's verbs.h is not installed")
def test_shipped_layouts_match_rdma_core(tmp_path):
    """Every struct member mc_ibv.h declares sits at the offset, with the size, it has in
    rdma-core's verbs.h; every struct has its size (ibv_port_attr may have grown there: the
    port query hands the library a larger buffer); every enum constant has its value."""
    types, enums = _declared()
    assert {"struct ibv_context", "struct ibv_context_ops", "struct ibv_send_wr",
            "struct ibv_wc", "struct ibv_qp_attr", "union ibv_gid"} <= set(types)
    assert {"IBV_WC_SUCCESS", "IBV_QPT_RC", "IBV_ACCESS_RELAXED_ORDERING"} <= set(enums)
    src = tmp_path / "layout.c"
    src.write_text(_listing(types, enums))
    ours, system = _run_listing(tmp_path, src, False), _run_listing(tmp_path, src, True)
    assert ours.keys() == system.keys()
    for key, value in ours.items():
        if key == "struct ibv_port_attr size":
            assert int(value) <= int(system[key]), (key, value, system[key])
        else:
            assert value == system[key], f"{key}: mc_ibv.h {value}, verbs.h {system[key]}"
    assert len(ours) > 200  # members, sizes and constants: the listing really covered them


@needs_cc
@pytest.mark.skipif(not SYSTEM_HEADER.exists(), reason="rdma-core's verbs.h is not installed")
def test_header_refuses_to_mix_with_rdma_core(tmp_path):
    src = tmp_path / "both.c"
    src.write_text('#include <infiniband/verbs.h>\n#include "mc_ibv.h"\nint main(void) '
                   "{ return 0; }\n")
    r = subprocess.run([CC, "-fsyntax-only", f"-I{CORE}", str(src)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "mc_ibv.h replaces <infiniband/verbs.h>" in r.stderr

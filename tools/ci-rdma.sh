#!/usr/bin/env bash
# tools/ci-rdma.sh — the part of CI that needs the VM's Debian kernel: build the verbs kernel on
# the host (from mooncake's own declarations, mooncake/_core/mc_ibv.h: no rdma-core headers), run
# `pytest -m "rdma or netem"` inside the rxe VM (tools/rxe-vm.sh: Soft-RoCE, and the sch_netem
# qdisc this host's kernel lacks), then tests/test_rdma_numa2.py in the two-NIC NUMA VM
# (RXE_VM_TOPO=numa2), and exit with the first failing status.
#
#   tools/ci-rdma.sh [extra pytest args...]
#
# Needs root on a Debian 12 host (apt-get), the project installed (`pip install -e '.[test]'`).
# Env: RXE_VM_TIMEOUT (default 1500 s), RDMA_JUNIT (default rdma-junit.xml), and the
# RXE_VM_* knobs of tools/rxe-vm.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "[ci-rdma $(date +%T)] $*" >&2; }
t0=$(date +%s)

# the runtime library only (no libibverbs-dev, no librdmacm: nothing here uses rdma-cm): the
# guest shares this host's root filesystem, so the libibverbs.so.1 the kernels dlopen there and
# the rxe provider it loads (librxe-rdmav*.so) are these packages' files
need=""
for p in libibverbs1 ibverbs-providers; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
  say "installing$need"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=300 $need >&2
fi

# the verbs modules inline the batch and region headers, so build every kernel in place now (a
# no-op when nothing changed): a stale module would disagree with the others about struct
# layouts.  Where rdma-core's headers are installed anyway, the build runs with them hidden (a
# private mount namespace), which proves it needs none.
build=(python setup.py -q build_ext --inplace)
if [ -d /usr/include/infiniband ] && [ "$(id -u)" = 0 ] && unshare -m true 2>/dev/null; then
  say "building the kernels in place (/usr/include/infiniband hidden)"
  unshare -m sh -c 'mount -t tmpfs none /usr/include/infiniband && exec "$@"' sh "${build[@]}" >&2
else
  say "building the kernels in place"
  "${build[@]}" >&2
fi
python - <<'PY' || { say "the verbs kernels did not build, or cannot load libibverbs"; exit 2; }
import importlib.util, re, subprocess, sys
from mooncake._core import verbs, verbs_kernel  # noqa: F401
for mod in ("mooncake._core.verbs", "mooncake._core.verbs_kernel"):
    so = importlib.util.find_spec(mod).origin
    dyn = subprocess.run(["readelf", "-d", so], capture_output=True, text=True).stdout
    if re.search(r"NEEDED.*ibverbs", dyn):
        sys.exit(f"{so} links libibverbs")
lib = verbs.library()
print(f"verbs declarations: {verbs.DECLARATIONS}; {lib['soname']}: "
      f"{lib['error'] or 'loaded from ' + lib['path']}", file=sys.stderr)
sys.exit(1 if lib["error"] else 0)
PY

set +e
RXE_VM_TIMEOUT=${RXE_VM_TIMEOUT:-1500} bash tools/rxe-vm.sh -- \
  python -m pytest -q -m "rdma or netem" -p no:cacheprovider --junitxml="${RDMA_JUNIT:-rdma-junit.xml}" "$@"
rc=$?
# the two-NIC NUMA VM (RXE_VM_TOPO=numa2): its layout check, then the rails tests that need two
# devices on two nodes (tests/test_rdma_numa2.py)
RXE_VM_TOPO=numa2 RXE_VM_TIMEOUT=${RXE_VM_NUMA2_TIMEOUT:-900} bash tools/rxe-vm.sh -- \
  python -m pytest -q -p no:cacheprovider --junitxml="${RDMA2_JUNIT:-rdma2-junit.xml}" \
  tests/test_rdma_numa2.py
rc2=$?
[ "$rc" = 0 ] && rc=$rc2
set -e
say "rdma and netem tests in the VM: exit status $rc, $(( $(date +%s) - t0 ))s in all"
exit $rc

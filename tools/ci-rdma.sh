#!/usr/bin/env bash
# tools/ci-rdma.sh — the part of CI that needs the VM's Debian kernel: build the verbs kernel on
# the host, run `pytest -m "rdma or netem"` inside the rxe VM (tools/rxe-vm.sh: Soft-RoCE, and the
# sch_netem qdisc this host's kernel lacks), and exit with pytest's status.
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

need=""
for p in libibverbs-dev librdmacm-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
  say "installing$need"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=300 $need >&2
fi

# the verbs modules build only where infiniband/verbs.h exists; they inline the batch and region
# headers, so build every kernel in place now (a no-op when nothing changed): a stale module
# would disagree with the others about struct layouts
say "building the kernels in place"
python setup.py -q build_ext --inplace >&2
python -c "import mooncake._core.verbs_kernel" || { say "verbs kernel did not build"; exit 2; }

set +e
RXE_VM_TIMEOUT=${RXE_VM_TIMEOUT:-1500} bash tools/rxe-vm.sh -- \
  python -m pytest -q -m "rdma or netem" -p no:cacheprovider --junitxml="${RDMA_JUNIT:-rdma-junit.xml}" "$@"
rc=$?
set -e
say "rdma and netem tests in the VM: exit status $rc, $(( $(date +%s) - t0 ))s in all"
exit $rc

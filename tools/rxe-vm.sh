#!/usr/bin/env bash
# tools/rxe-vm.sh — run one command inside a disposable QEMU guest that has real RDMA verbs.
#
# The guest boots Debian's stock kernel (which ships the Soft-RoCE driver rdma_rxe) through
# virtme-ng; the host's root filesystem is shared read-only, so the host's Python, the project
# checkout and its built extensions are used as they are.  In the guest an rxe device "rxe0"
# sits on a dummy netdev (169.254.77.1, MTU 9000 so the RoCE path MTU is 4096), and the
# command runs as root in the caller's directory with
#     IN_RXE_VM=1 RXE_DEV=rxe0 RXE_GID_INDEX=1 RXE_IP=169.254.77.1
# plus the caller's PATH/PYTHONPATH/VIRTUAL_ENV/PYENV_*/HOME/LANG/CI and $RXE_VM_PASS_ENV.
#
#   tools/rxe-vm.sh [--] command [args...]      exit status = the command's
#   tools/rxe-vm.sh --check                     ibv_devinfo + ibv_rc_pingpong in the guest
#
# RXE_VM_TOPO=numa2 (opt-in) boots two NUMA nodes instead (memory halved, vCPUs split) and two
# virtio-net NICs, each behind its own PCIe expander bridge (pxb-pcie) on a different node and
# both on one QEMU hub (a wire between them): 169.254.77.1 on the node-0 NIC carries rxe0,
# 169.254.77.2 on the node-1 NIC carries rxe1.  Policy routing sends traffic between the two
# addresses out one NIC and into the other (not through lo), so rxe0 <-> rxe1 really crosses
# the wire; each device still loops back to itself.  The command also gets
#     RXE_VM_TOPO=numa2 RXE_DEV0=rxe0 RXE_DEV1=rxe1 RXE_IP0 RXE_IP1 RXE_GID_INDEX0/1
#     RXE_NETDEV0/1 RXE_NUMA0/1 (the numa_node the NIC's PCI function reports)
# (RXE_DEV/RXE_IP/RXE_GID_INDEX name rxe0 as in the default mode).  --check then also proves
# node1 exists, each NIC's numa_node, and RC traffic rxe1 -> rxe0 moving both devices'
# hw_counters.  Needs RXE_VM_CPUS >= 2.
#
# Knobs: RXE_VM_DIR (cache; /tmp/mooncake-rxe-vm), RXE_VM_TIMEOUT (s; 1200), RXE_VM_MEM (2G),
# RXE_VM_CPUS (nproc), RXE_VM_RWDIRS (dirs the guest may write; $PWD), RXE_VM_ACCEL
# (auto|tcg|kvm), RXE_VM_TOPO ("" or numa2), RXE_VM_NO_APT=1, RXE_VM_VERBOSE=1, RXE_VM_PASS_ENV.
# Other exit codes: 124 the VM hit RXE_VM_TIMEOUT, 2 host setup failed, 3 rxe setup failed in
# the guest, 255 the VM died.
#
# Facts this relies on (see the project's research notes): /dev/kvm on our machines is PVM and
# hangs a stock kernel, so "auto" uses TCG unless the CPU shows vmx/svm; QEMU reopens the
# stdout/stderr it is given with O_TRUNC, so we hand it FIFOs; rxe's UDP socket lives only in
# the initial network namespace, so every peer shares the one rxe0.
set -uo pipefail

cache=${RXE_VM_DIR:-/tmp/mooncake-rxe-vm}
limit=${RXE_VM_TIMEOUT:-1200}
mem=${RXE_VM_MEM:-2G}
cpus=${RXE_VM_CPUS:-$(nproc)}
rwdirs=${RXE_VM_RWDIRS:-$PWD}
accel=${RXE_VM_ACCEL:-auto}
topo=${RXE_VM_TOPO:-}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
vng_version=1.42
packages="qemu-system-x86 kmod busybox-static file iproute2 udev ibverbs-providers
  ibverbs-utils rdmacm-utils python3-pyverbs perftest"

say() { echo "[rxe-vm $(date +%T)] $*" >&2; }
fail() { say "error: $*"; exit 2; }
started=$(date +%s)

mode=run
case "${1:-}" in
  --) shift ;;
  --check) mode=check; shift ;;
esac
[ "$mode" = check ] || [ $# -gt 0 ] || fail "usage: $0 [--] command [args...] | --check"
case "$topo" in
  "") ;;
  numa2) [ "$cpus" -ge 2 ] 2>/dev/null || fail "RXE_VM_TOPO=numa2 needs RXE_VM_CPUS >= 2" ;;
  *) fail "RXE_VM_TOPO must be empty (one rxe0 on a dummy netdev) or numa2" ;;
esac

install_host_packages() {
  local p need=""
  for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need="$need $p"
  done
  [ -z "$need" ] && return 0
  [ "$(id -u)" = 0 ] || fail "root needed to install:$need"
  say "installing$need"
  export DEBIAN_FRONTEND=noninteractive
  local i
  for i in 1 2 3; do
    timeout 600 apt-get update -qq >&2 && break
    [ "$i" = 3 ] && fail "apt-get update failed"
    sleep 15
  done
  timeout 900 apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 \
    $need >&2 || fail "apt-get install failed"
}

ensure_vng() {
  vng="$cache/venv/bin/vng"
  [ -x "$vng" ] && return 0
  say "setting up virtme-ng $vng_version"
  rm -rf "$cache/venv"
  "${RXE_VM_PYTHON:-python3}" -m venv "$cache/venv" >&2 || fail "python -m venv failed"
  timeout 600 "$cache/venv/bin/pip" install -q "virtme-ng==$vng_version" >&2 \
    || fail "pip install virtme-ng failed"
}

ensure_kernel() {
  local pkg
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$pkg" ] || fail "cannot resolve linux-image-amd64 (apt-get update first)"
  kver=${pkg#linux-image-}
  local root="$cache/kernel-$kver"
  kimage="$root/boot/vmlinuz-$kver"
  if [ ! -e "$root/.complete" ]; then
    say "fetching $pkg"
    rm -rf "$root" "$cache/deb" && mkdir -p "$cache/deb"
    (cd "$cache/deb" && timeout 600 apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2) \
      || fail "apt-get download $pkg failed"
    dpkg-deb -x "$cache"/deb/"$pkg"_*.deb "$root" || fail "dpkg-deb -x failed"
    rm -rf "$cache/deb"
    touch "$root/.complete"
  fi
  ls "$root/lib/modules/$kver/kernel/drivers/infiniband/sw/rxe/"rdma_rxe.ko* >/dev/null 2>&1 \
    || fail "$pkg ships no rdma_rxe"
}

write_guest_script() {   # $1: path; the rest: the command
  local out=$1; shift
  {
    echo '#!/bin/bash'
    local v
    for v in PATH PYTHONPATH VIRTUAL_ENV PYENV_ROOT PYENV_VERSION HOME LANG LC_ALL CI \
             ${RXE_VM_PASS_ENV:-}; do
      [ -n "${!v+set}" ] && printf 'export %s=%q\n' "$v" "${!v}"
    done
    printf 'cd %q || exit 2\n' "$PWD"
    printf 'mode=%q\n' "$mode"
    printf 'topo=%q\n' "$topo"
    printf 'numa2=%q\n' "$here/rxe-vm-numa2.sh"
    printf 'cmd=('; [ $# -gt 0 ] && printf '%q ' "$@"; printf ')\n'
    cat <<'GUEST'
t() { echo "[rxe-vm guest $(cut -d' ' -f1 /proc/uptime)s] $*" >&2; }
[ "$topo" = numa2 ] && { . "$numa2" || exit 3; }
if [ "$topo" != numa2 ]; then
t "up; creating rxe0"
ip link set lo up
for m in rdma_rxe ib_uverbs rdma_ucm; do modprobe "$m" || { t "modprobe $m failed"; exit 3; }; done
ip link add rxenet0 type dummy || exit 3
ip link set rxenet0 mtu 9000 up && ip addr add 169.254.77.1/16 dev rxenet0 || exit 3
rdma link add rxe0 type rxe netdev rxenet0 || { t "rdma link add failed"; exit 3; }
gidfile=/sys/class/infiniband/rxe0/ports/1/gids/1
for _ in $(seq 100); do grep -q ffff:a9fe:4d01 "$gidfile" 2>/dev/null && break; sleep 0.1; done
grep -q ffff:a9fe:4d01 "$gidfile" || { t "rxe0 has no IPv4 GID"; exit 3; }
export IN_RXE_VM=1 RXE_DEV=rxe0 RXE_GID_INDEX=1 RXE_IP=169.254.77.1
t "rxe0 ready"
else
t "up; creating rxe0 and rxe1 (two NUMA nodes, two NICs)"
numa2_setup || exit 3
t "rxe0 ($RXE_NETDEV0, node $RXE_NUMA0, GID $RXE_GID_INDEX0), rxe1 ($RXE_NETDEV1, node $RXE_NUMA1, GID $RXE_GID_INDEX1) ready"
[ "$mode" = check ] && { numa2_check; exit $?; }
fi
if [ "$mode" = check ]; then
  ibv_devinfo -d rxe0 | grep -q PORT_ACTIVE || { echo "check: rxe0 port not active"; exit 1; }
  timeout 60 ibv_rc_pingpong -d rxe0 -g 1 -n 100 >/dev/null 2>&1 & srv=$!
  sleep 1
  timeout 60 ibv_rc_pingpong -d rxe0 -g 1 -n 100 localhost >/dev/null 2>&1 && wait $srv \
    || { echo "check: ibv_rc_pingpong failed"; exit 1; }
  echo "check: rxe0 active, RC traffic ok"
  exit 0
fi
t "running: ${cmd[*]}"
"${cmd[@]}"
rc=$?
t "exit status $rc"
exit $rc
GUEST
  } > "$out"
  chmod +x "$out"
}

[ "${RXE_VM_NO_APT:-0}" = 1 ] || install_host_packages
command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 not installed"
command -v busybox >/dev/null || fail "busybox not installed (virtme-ng needs it)"
mkdir -p "$cache" || fail "cannot create $cache"
ensure_vng
ensure_kernel

work=$(mktemp -d "$cache/run.XXXXXX") || fail "mktemp failed"
write_guest_script "$work/guest.sh" "$@"

if [ "$accel" = auto ]; then
  if [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then accel=kvm; else accel=tcg; fi
fi
case "$accel" in tcg|kvm) ;; *) fail "RXE_VM_ACCEL must be auto, tcg or kvm" ;; esac
args=(-r "$kimage" -m "$mem" --cpus "$cpus" --exec "bash $work/guest.sh")
# TSC as the clocksource (as on real machines): under TCG the kernel's watchdog otherwise moves
# to the HPET, where every clock_gettime is an emulated MMIO read of ~2 us (perftest reads the
# TSC itself, our kernels and Python call clock_gettime: the HPET would charge only us)
args+=(--append "clocksource=tsc tsc=reliable")
[ "$accel" = tcg ] && args+=(--disable-kvm)
if [ "$topo" = numa2 ]; then
  . "$here/rxe-vm-numa2.sh" || fail "cannot read $here/rxe-vm-numa2.sh"
  numa2_vng_args "$mem" "$cpus" || fail "RXE_VM_MEM must be a size in M or G (e.g. 2G)"
  args+=("${numa2_args[@]}")
fi
[ "${RXE_VM_VERBOSE:-0}" = 1 ] && args+=(--verbose)
for d in $rwdirs; do args+=("--rwdir=$d"); done

vm=""; watchdog=""; group=""
stop_vm() {
  [ -n "$watchdog" ] && kill "$watchdog" 2>/dev/null
  if [ -n "$vm" ] && kill -0 "$vm" 2>/dev/null; then
    say "stopping the VM"
    kill -TERM -- "$group" 2>/dev/null; sleep 2; kill -KILL -- "$group" 2>/dev/null
  fi
  rm -rf "$work"
}
trap stop_vm EXIT
trap 'exit 130' INT TERM

say "host setup ${started:+took $(( $(date +%s) - started ))s}; booting $kver ($accel, $cpus vCPU, $mem)"
booted=$(date +%s)
mkfifo "$work/stdout" "$work/stderr" || fail "mkfifo failed"
cat "$work/stdout" & copy_out=$!
cat "$work/stderr" >&2 & copy_err=$!
# setsid: vng, virtme-run and qemu form one process group (id = $vm) that we can kill whole
PATH="$cache/venv/bin:$PATH" setsid "$vng" "${args[@]}" </dev/null \
  >"$work/stdout" 2>"$work/stderr" &
vm=$!
for _ in $(seq 40); do
  [ "$(ps -o pgid= -p "$vm" | tr -d ' ')" = "$vm" ] && break
  sleep 0.05
done
if [ "$(ps -o pgid= -p "$vm" | tr -d ' ')" = "$vm" ]; then group=-$vm; else group=$vm; fi
( trap 'kill $nap 2>/dev/null; exit 0' TERM
  sleep "$limit" & nap=$!; wait $nap
  touch "$work/timed-out"
  kill -TERM -- "$group" 2>/dev/null; sleep 5; kill -KILL -- "$group" 2>/dev/null ) &
watchdog=$!
wait "$vm"; rc=$?
kill "$watchdog" 2>/dev/null; wait "$watchdog" 2>/dev/null; watchdog=""
kill -0 -- "$group" 2>/dev/null && { kill -TERM -- "$group" 2>/dev/null; sleep 1;
                                     kill -KILL -- "$group" 2>/dev/null; }
wait "$copy_out" "$copy_err" 2>/dev/null
[ -e "$work/timed-out" ] && { say "VM timed out after ${limit}s"; rc=124; }
say "VM ran $(( $(date +%s) - booted ))s, exit status $rc"
exit "$rc"

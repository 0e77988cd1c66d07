# tools/rxe-vm-numa2.sh — the RXE_VM_TOPO=numa2 layout of tools/rxe-vm.sh (sourced, not run).
#
# On the host, numa2_vng_args MEM CPUS fills numa2_args with virtme-ng options: two NUMA nodes
# (half the memory each, the vCPUs split) and two virtio-net NICs, NIC i behind its own PCIe
# expander bridge (pxb-pcie numa_node=i, a root port below it) with MAC 52:54:00:77:00:0(i+1),
# both NICs on QEMU hub 77 (a two-port hub is a wire between them; nothing else is attached).
#
# In the guest, numa2_setup gives NIC i the address 169.254.77.(i+1)/16 (MTU 9000), puts rxe<i>
# on it, and routes 169.254.77.1 <-> .2 over the wire: the local table moves behind two rules
# (locally sent packets "from A to B" go out A's NIC, and the reverse), and the NICs accept
# packets whose source is a local address (accept_local, rp_filter off).  Without that the
# kernel delivers them through lo, where rxe finds no device (it looks the device up by the
# skb's netdev) and drops them.  A device talking to itself keeps rxe's own loopback.
# numa2_check proves the layout and the wire (exit 1 with the reason otherwise).

numa2_vng_args() {  # MEM CPUS -> numa2_args
  local mem=$1 cpus=$2 mib half0 half1 c0 i
  case "$mem" in
    *[Gg]) mib=$(( ${mem%[Gg]} * 1024 )) ;;
    *[Mm]) mib=${mem%[Mm]} ;;
    *) return 1 ;;
  esac
  [ "$mib" -ge 256 ] 2>/dev/null || return 1
  half0=$(( mib / 2 )); half1=$(( mib - half0 )); c0=$(( cpus / 2 ))
  numa2_args=(--numa "${half0}M,cpus=0$([ "$c0" -gt 1 ] && echo "-$((c0 - 1))")"
              --numa "${half1}M,cpus=$c0$([ $((cpus - c0)) -gt 1 ] && echo "-$((cpus - 1))")"
              --numa-distance 0,1=20)
  local q=""
  for i in 0 1; do
    q+=" -device pxb-pcie,id=rxepxb$i,bus_nr=$((64 * (i + 1))),numa_node=$i,bus=pcie.0"
    q+=" -device pcie-root-port,id=rxerp$i,bus=rxepxb$i,chassis=$((77 + i)),slot=0"
    q+=" -netdev hubport,id=rxenic$i,hubid=77"
    q+=" -device virtio-net-pci,netdev=rxenic$i,bus=rxerp$i,mac=52:54:00:77:00:0$((i + 1))"
  done
  numa2_args+=("--qemu-opts=${q# }")  # "=": the value starts with a dash
}

_numa2_netdev() {  # MAC -> the netdev that has it
  local d
  for d in /sys/class/net/*; do
    [ "$(cat "$d/address" 2>/dev/null)" = "$1" ] && { echo "${d##*/}"; return 0; }
  done
  return 1
}

_numa2_pci_numa() {  # NETDEV -> numa_node of its PCI function (virtio-net: the device's parent)
  local d
  d=$(readlink -f "/sys/class/net/$1/device") || return 1
  [ -e "$d/numa_node" ] || d=${d%/*}
  cat "$d/numa_node"
}

_numa2_gid() {  # DEV IP -> index of DEV's RoCE v2 GID ::ffff:IP
  local want i p=/sys/class/infiniband/$1/ports/1
  # shellcheck disable=SC2086
  want=$(printf '0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x' ${2//./ })
  for i in $(seq 0 15); do
    [ "$(cat "$p/gids/$i" 2>/dev/null)" = "$want" ] || continue
    [ "$(cat "$p/gid_attrs/types/$i" 2>/dev/null)" = "RoCE v2" ] && { echo "$i"; return 0; }
  done
  return 1
}

numa2_setup() {
  local m i nd ip mac gid
  ip link set lo up
  for m in rdma_rxe ib_uverbs rdma_ucm virtio_net; do
    modprobe "$m" || { t "modprobe $m failed"; return 1; }
  done
  udevadm settle --timeout=10 2>/dev/null
  sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
  for i in 0 1; do
    mac=52:54:00:77:00:0$((i + 1)); ip=169.254.77.$((i + 1)); nd=""
    for _ in $(seq 100); do nd=$(_numa2_netdev "$mac") && break; sleep 0.1; done
    [ -n "$nd" ] || { t "no NIC with MAC $mac"; return 1; }
    sysctl -qw "net.ipv4.conf.$nd.accept_local=1" "net.ipv4.conf.$nd.rp_filter=0"
    ip link set "$nd" mtu 9000 up && ip addr add "$ip/16" dev "$nd" || return 1
    rdma link add "rxe$i" type rxe netdev "$nd" || { t "rdma link add rxe$i failed"; return 1; }
    export "RXE_DEV$i=rxe$i" "RXE_IP$i=$ip" "RXE_NETDEV$i=$nd"
    export "RXE_NUMA$i=$(_numa2_pci_numa "$nd")"
  done
  # locally sent A->B leaves A's NIC and B->A leaves B's; the local table comes after
  ip rule add pref 10 from 169.254.77.1 to 169.254.77.2 iif lo lookup 77 &&
  ip route add 169.254.77.2 dev "$RXE_NETDEV0" src 169.254.77.1 table 77 &&
  ip rule add pref 11 from 169.254.77.2 to 169.254.77.1 iif lo lookup 78 &&
  ip route add 169.254.77.1 dev "$RXE_NETDEV1" src 169.254.77.2 table 78 &&
  ip rule add pref 100 lookup local && ip rule del pref 0 lookup local ||
    { t "policy routing setup failed"; return 1; }
  for i in 0 1; do
    ip=169.254.77.$((i + 1)); gid=""
    for _ in $(seq 100); do gid=$(_numa2_gid "rxe$i" "$ip") && break; sleep 0.1; done
    [ -n "$gid" ] || { t "rxe$i has no RoCE v2 GID for $ip"; return 1; }
    export "RXE_GID_INDEX$i=$gid"
  done
  export IN_RXE_VM=1 RXE_VM_TOPO=numa2 RXE_DEV=rxe0 RXE_IP=169.254.77.1
  export RXE_GID_INDEX=$RXE_GID_INDEX0
}

_numa2_counter() {  # DEV NAME
  cat "/sys/class/infiniband/$1/ports/1/hw_counters/$2"
}

numa2_check() {
  local i n want got s0 r0 s1 r1 tx0 rx1 srv
  [ -d /sys/devices/system/node/node1 ] || { echo "check: no NUMA node1"; return 1; }
  echo "check: NUMA nodes $(cd /sys/devices/system/node && echo node*)," \
       "cpus $(cat /sys/devices/system/node/node0/cpulist) | $(cat /sys/devices/system/node/node1/cpulist)"
  for i in 0 1; do
    n=RXE_NETDEV$i; want=$i; got=RXE_NUMA$i
    ibv_devinfo -d "rxe$i" | grep -q PORT_ACTIVE || { echo "check: rxe$i not active"; return 1; }
    echo "check: rxe$i on ${!n} ($(readlink -f "/sys/class/net/${!n}/device")), numa_node ${!got}"
    [ "${!got}" = "$want" ] || { echo "check: ${!n} reports numa_node ${!got}, want $want"; return 1; }
  done
  echo "check: $(ip rule | tr '\n' ';')"
  s0=$(_numa2_counter rxe0 sent_pkts); r0=$(_numa2_counter rxe0 rcvd_pkts)
  s1=$(_numa2_counter rxe1 sent_pkts); r1=$(_numa2_counter rxe1 rcvd_pkts)
  tx0=$(cat "/sys/class/net/$RXE_NETDEV0/statistics/tx_packets")
  rx1=$(cat "/sys/class/net/$RXE_NETDEV1/statistics/rx_packets")
  timeout 60 ibv_rc_pingpong -d rxe0 -g "$RXE_GID_INDEX0" -n 100 >/dev/null 2>&1 & srv=$!
  sleep 1
  timeout 60 ibv_rc_pingpong -d rxe1 -g "$RXE_GID_INDEX1" -n 100 "$RXE_IP0" >/dev/null 2>&1 &&
    wait $srv || { echo "check: ibv_rc_pingpong rxe1 -> rxe0 failed"; return 1; }
  s0=$(( $(_numa2_counter rxe0 sent_pkts) - s0 )); r0=$(( $(_numa2_counter rxe0 rcvd_pkts) - r0 ))
  s1=$(( $(_numa2_counter rxe1 sent_pkts) - s1 )); r1=$(( $(_numa2_counter rxe1 rcvd_pkts) - r1 ))
  tx0=$(( $(cat "/sys/class/net/$RXE_NETDEV0/statistics/tx_packets") - tx0 ))
  rx1=$(( $(cat "/sys/class/net/$RXE_NETDEV1/statistics/rx_packets") - rx1 ))
  echo "check: rxe0 sent $s0 rcvd $r0, rxe1 sent $s1 rcvd $r1;" \
       "$RXE_NETDEV0 tx $tx0 packets, $RXE_NETDEV1 rx $rx1 packets"
  for n in s0 r0 s1 r1; do
    [ "${!n}" -ge 100 ] || { echo "check: a counter moved less than 100 packets"; return 1; }
  done
  [ "$tx0" -ge 100 ] && [ "$rx1" -ge 100 ] || { echo "check: traffic did not cross the wire"; return 1; }
  echo "check: two NUMA nodes, rxe0 on node 0, rxe1 on node 1, RC traffic rxe1 <-> rxe0 ok"
}

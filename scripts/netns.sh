#!/usr/bin/env bash
# Hosts without machines: N Linux network namespaces, each with its own address, joined by a bridge.
#
#   scripts/netns.sh up N [PREFIX]    # namespaces PREFIX-1 .. PREFIX-N (default PREFIX gt), idempotent
#   scripts/netns.sh down [PREFIX]    # removes them, their veth pairs and the bridge, idempotent
#   scripts/netns.sh addr K [PREFIX]  # prints namespace K's address (0: the bridge, i.e. this host)
#
# Namespace K has loopback up and a veth (eth0, 10.R.0.(K+1)/24) whose peer sits in the bridge
# PREFIX-br (10.R.0.1/24) in the caller's namespace, so every namespace reaches the others and this
# host; R is derived from PREFIX (GEOTRAIN_NETNS_NET=10.R overrides it). Nothing is routed beyond
# the bridge. Needs root and iproute2. `up` that fails half-way removes what it made.
#
# Traffic between two namespaces crosses the bridge, and with br_netfilter loaded (Docker loads it,
# and sets the FORWARD policy to DROP) bridged frames go through iptables' FORWARD chain: without a
# rule they are dropped, so namespaces reach this host but not each other. `up` inserts an ACCEPT
# for traffic in and out of the bridge (when iptables exists); `down` removes it.
set -euo pipefail

cmd=${1:-}
prefix_arg() { echo "${1:-gt}"; }

net_of() {  # 10.R for a prefix: stable, so a second `up` or a `down` finds the same addresses
  if [ -n "${GEOTRAIN_NETNS_NET:-}" ]; then echo "$GEOTRAIN_NETNS_NET"; return; fi
  local sum
  sum=$(printf '%s' "$1" | cksum | cut -d' ' -f1)
  echo "10.$((200 + sum % 50))"
}

addr_of() {  # addr_of PREFIX K
  echo "$(net_of "$1").0.$(($2 + 1))"
}

down() {
  local prefix=$1 ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${prefix}-[0-9]+$" || true); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  local link
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${prefix}-v[0-9]+$" || true); do
    ip link del "$link" 2>/dev/null || true
  done
  ip link del "${prefix}-br" 2>/dev/null || true
  if command -v iptables >/dev/null 2>&1; then
    while iptables -D FORWARD -i "${prefix}-br" -o "${prefix}-br" -j ACCEPT 2>/dev/null; do :; done
  fi
}

allow_forward() {  # bridged namespace-to-namespace traffic past a FORWARD policy of DROP
  local br="${1}-br"
  command -v iptables >/dev/null 2>&1 || return 0
  iptables -C FORWARD -i "$br" -o "$br" -j ACCEPT 2>/dev/null || iptables -I FORWARD 1 -i "$br" -o "$br" -j ACCEPT
}

up() {
  local n=$1 prefix=$2 k ns veth
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || { echo "netns.sh up: N must be 1..200, got '$n'" >&2; exit 2; }
  [ "${#prefix}" -le 8 ] || { echo "netns.sh: PREFIX at most 8 characters (interface names), got '$prefix'" >&2; exit 2; }
  trap 'echo "netns.sh up: failed; removing what was made" >&2; down "$prefix"' ERR
  if ! ip link show "${prefix}-br" >/dev/null 2>&1; then
    ip link add "${prefix}-br" type bridge
    ip addr add "$(addr_of "$prefix" 0)/24" dev "${prefix}-br"
  fi
  ip link set "${prefix}-br" up
  allow_forward "$prefix"
  for k in $(seq 1 "$n"); do
    ns="${prefix}-${k}" veth="${prefix}-v${k}"
    ip netns list | awk '{print $1}' | grep -qx "$ns" || ip netns add "$ns"
    ip netns exec "$ns" ip link set lo up
    if ! ip netns exec "$ns" ip link show eth0 >/dev/null 2>&1; then
      ip link del "$veth" 2>/dev/null || true
      ip link add "$veth" type veth peer name "${veth}p"
      ip link set "${veth}p" netns "$ns"
      ip netns exec "$ns" ip link set "${veth}p" name eth0
      ip netns exec "$ns" ip addr add "$(addr_of "$prefix" "$k")/24" dev eth0
      ip link set "$veth" master "${prefix}-br"
    fi
    ip link set "$veth" up
    ip netns exec "$ns" ip link set eth0 up
  done
  trap - ERR
}

case "$cmd" in
  up) up "${2:?usage: netns.sh up N [PREFIX]}" "$(prefix_arg "${3:-}")" ;;
  down) down "$(prefix_arg "${2:-}")" ;;
  addr) addr_of "$(prefix_arg "${3:-}")" "${2:?usage: netns.sh addr K [PREFIX]}" ;;
  *) echo "usage: netns.sh up N [PREFIX] | down [PREFIX] | addr K [PREFIX]" >&2; exit 2 ;;
esac

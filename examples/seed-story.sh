#!/usr/bin/env bash
# The seed's story (README.md, "The seed's story") in one command, on this
# machine, in a temporary directory: a dev etcd, four daemons node-0..node-3 in
# two racks, the default pool replaced by one pool per rack, five workloads,
# then a relabelled node.
#
#   examples/seed-story.sh          # after the README's install (.venv/bin or PATH)
#
# Nothing is left behind: the daemons and etcd are stopped and the directory
# removed on exit, also on Ctrl-C or an error. No root needed; nothing but
# loopback and unix sockets is used.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
if [ -x "$here/.venv/bin/topoipamd" ]; then
    bin="$here/.venv/bin"
elif command -v topoipamd >/dev/null; then
    bin="$(dirname "$(command -v topoipamd)")"
else
    echo "seed-story: topoipamd not found: install first (README, 'Two commands')" >&2
    exit 1
fi
# The story's own etcd and daemons: ignore any TOPOIPAM_* of the caller's.
while read -r name; do unset "$name"; done < <(compgen -e | grep '^TOPOIPAM_' || true)

# Short names: a unix socket's path must stay under 108 bytes.
work="$(mktemp -d "${TMPDIR:-/tmp}/tpi-story.XXXXXX")"
pids=()
cleanup() {
    status=$?
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
    echo "seed-story: stopped ${#pids[@]} daemon(s) and etcd, removed $work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() { printf '\n### %s\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }
ctl() { "$bin/topoipamctl" "$@"; }

# The plugin exactly as a runtime would find it (docs/operations.md#the-cni-plugin).
mkdir "$work/cni-bin"
"$bin/topoipamctl" install-cni --dest "$work/cni-bin" >/dev/null
plugin="$work/cni-bin/topoipam"

# cni COMMAND NODE CONTAINER POD: exec the plugin the way a runtime does.
cni() {
    local socket="$work/$2/topoipamd.sock"
    CNI_COMMAND="$1" CNI_CONTAINERID="$3" CNI_IFNAME=eth0 CNI_NETNS=/var/run/netns/"$3" \
    CNI_PATH="$work/cni-bin" \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=$4" \
        "$plugin" <<<"{\"cniVersion\": \"1.1.0\", \"name\": \"k8s-pod-network\",
                      \"ipam\": {\"type\": \"topoipam\", \"socket\": \"$socket\"}}"
}

# ready NODE: wait until CNI STATUS says an ADD can succeed on the node (or give up).
ready() {
    local deadline=$((SECONDS + 30)) pid
    until cni STATUS "$1" status status >/dev/null 2>&1; do
        for pid in "${pids[@]}"; do
            if ! kill -0 "$pid" 2>/dev/null; then
                echo "seed-story: a daemon exited; its logs:" >&2
                tail -n 5 "$work"/node-*.log >&2
                exit 1
            fi
        done
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "seed-story: node $1 not ready after 30s:" >&2
            cni STATUS "$1" status status >&2 || true
            exit 1
        fi
        sleep 0.1
    done
}

step "A dev etcd and node-0's daemon (topoipamd --dev), then node-1..node-3's daemons"
mkdir -m 0750 "$work/node-0"
"$bin/topoipamd" --dev --node node-0 --state-dir "$work/node-0" --metrics-address off \
    >"$work/node-0.log" 2>&1 &
pids+=($!)
deadline=$((SECONDS + 30))
until endpoint="$(grep -o 'etcd at [^ ]*' "$work/node-0.log" | cut -d' ' -f3)" \
        && [ -n "$endpoint" ]; do
    if [ "$SECONDS" -ge "$deadline" ] || ! kill -0 "${pids[0]}" 2>/dev/null; then
        echo "seed-story: topoipamd --dev did not start:" >&2
        cat "$work/node-0.log" >&2
        exit 1
    fi
    sleep 0.1
done
export TOPOIPAM_ETCD_ENDPOINTS="$endpoint"
echo "etcd at $endpoint"
for i in 1 2 3; do
    mkdir -m 0750 "$work/node-$i"
    # Each daemon keeps its node-local record of allocations in a state directory
    # of its own (a shared default would carry this run's pods into the next).
    "$bin/topoipamd" --node "node-$i" --socket "$work/node-$i/topoipamd.sock" \
        --state-dir "$work/node-$i" --metrics-address off >"$work/node-$i.log" 2>&1 &
    pids+=($!)
done
for i in 0 1 2 3; do ready "node-$i"; done
echo "4 daemons ready"

step "1. The default pool"
show ctl get ippool -o wide

step "2. Delete the default pool"
show ctl delete ippool default-ipv4-ippool

step "3. Label the nodes"
for i in 0 1 2 3; do show ctl label nodes "node-$i" "rack=$((i / 2))"; done
show ctl get node -o wide

step "4. One pool per rack"
cat >"$work/rack-pools.yaml" <<'YAML'
apiVersion: topoipam/v1
kind: IPPool
metadata: {name: rack-0-ippool}
spec: {cidr: 192.168.0.0/24, nodeSelector: 'rack == "0"'}
---
apiVersion: topoipam/v1
kind: IPPool
metadata: {name: rack-1-ippool}
spec: {cidr: 192.168.1.0/24, nodeSelector: 'rack == "1"'}
YAML
cat "$work/rack-pools.yaml"
show ctl apply -f "$work/rack-pools.yaml"
show ctl get ippool -o wide
show ctl check coverage
# The daemons follow the new pools through their watches: wait until each can allocate.
for i in 0 1 2 3; do ready "node-$i"; done

step "5. Five workloads across the four nodes (the plugin, exec'd as a runtime does)"
nodes=(node-0 node-1 node-2 node-3 node-0)
for n in 0 1 2 3 4; do
    result="$(cni ADD "${nodes[$n]}" "nginx-$n-container" "nginx-$n")"
    address="$(grep -o '"address": *"[^"]*"' <<<"$result" | head -1 | cut -d'"' -f4)"
    echo "nginx-$n on ${nodes[$n]}: $address"
done
show ctl get allocations -o wide
show ctl ipam show --show-blocks
show ctl check routes

step "6. Relabel node-0 into rack 1: its workloads keep their addresses"
show ctl label nodes node-0 rack=1 --overwrite
show ctl check placement
show ctl check routes || echo "(check routes exits $?: node-0's block now breaks rack 1's aggregation)"
ready node-0
result="$(cni ADD node-0 nginx-5-container nginx-5)"
echo "a new workload on node-0 (now rack 1): $(grep -o '"address": *"[^"]*"' <<<"$result" \
    | head -1 | cut -d'"' -f4)"

step "Done"

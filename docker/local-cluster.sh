#!/usr/bin/env bash
# A 3-node Ray cluster on this machine, loopback only (`ray start`: a head and two worker
# nodes with distinct ports), to try a cluster search without a cloud account:
#
#   docker/local-cluster.sh up                  # prints the address to pass as --address
#   export RAY_AUTH_MODE=token                  # the cluster takes only clients with its token
#   autodfp search resnet20-quick --address 127.0.0.1:6390 --num-env-runners 2 \
#       --cpus-per-runner 0.5 --episodes 12
#   docker/local-cluster.sh down                # `ray stop`: every Ray of this user on this machine
#
# Every node runs with Ray's token authentication (the token of ~/.ray/auth_token, made here
# if there is none), as does any client that exports RAY_AUTH_MODE=token.
# Worker nodes offer a `worker` resource (2 each): put `runner_resources: {worker: 1}` in a
# search config to keep env runners off the head. Worker nodes get AUTODFP_SHARED pointing at
# an empty folder: the driver sends them the weights and images through the object store.
set -euo pipefail

PORT=${PORT:-6390}
RAY=${RAY:-ray}
BASE=${BASE:-$((PORT + 100))}   # each worker node gets 10 ports from here on, and a worker range
TEMP=${TEMP:-/tmp/autodfp-local-cluster}
export RAY_AUTH_MODE=token

worker_ports() {  # the ports of worker node $1 (1, 2)
    local p=$((BASE + 10 * ($1 - 1)))
    echo --node-manager-port $p --object-manager-port $((p + 1)) \
         --metrics-export-port $((p + 2)) --dashboard-agent-listen-port $((p + 3)) \
         --dashboard-agent-grpc-port $((p + 4)) --runtime-env-agent-port $((p + 5)) \
         --min-worker-port $((20000 + 1000 * $1)) --max-worker-port $((20000 + 1000 * $1 + 999))
}

case "${1:-}" in
    up)
        mkdir -p "$TEMP/no-shared"
        "$RAY" get-auth-token --generate >/dev/null
        "$RAY" start --head --node-ip-address 127.0.0.1 --port "$PORT" --num-cpus 1 \
            --include-dashboard false --disable-usage-stats >/dev/null
        for i in 1 2; do
            AUTODFP_SHARED="$TEMP/no-shared" AUTODFP_CACHE="$TEMP/cache-$i" \
            "$RAY" start --address "127.0.0.1:$PORT" --node-ip-address 127.0.0.1 --num-cpus 1 \
                --resources '{"worker": 2}' --disable-usage-stats $(worker_ports "$i") >/dev/null
        done
        echo "3-node Ray cluster up: --address 127.0.0.1:$PORT"
        ;;
    down)
        "$RAY" stop --force >/dev/null
        echo "stopped"
        ;;
    *)
        sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac

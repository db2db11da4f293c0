#!/usr/bin/env bash
# Start a multi-node Ray cluster on this machine: one head and N worker nodes (`ray start`),
# token authentication on, everything on 127.0.0.1, ports from a block of its own and one
# temp dir per cluster, so it never meets another Ray on the same machine.
#
#   cluster/local/start.sh [DIR]          DIR: the cluster's folder (default /tmp/raysegment-cluster)
#   source DIR/cluster.env                 RAY_ADDRESS, RAY_API_SERVER_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
#   cluster/local/stop.sh [DIR]
#
# Environment: RAYSEG_PORT_BASE (default 26380; the cluster uses BASE..BASE+100+200*(WORKERS+1)),
# RAYSEG_WORKERS (1, at most 8: see node_ports), RAYSEG_HEAD_CPUS (1), RAYSEG_WORKER_CPUS (2), RAY (the
# ray executable; its folder goes first on the nodes' PATH, so jobs run the python of its venv even when
# that is not activated), RAYSEG_START_TIMEOUT (seconds, 90). Keep DIR short: Ray's socket paths live
# under it (Unix limit 107 bytes).
# Logs: DIR/{head,workerN}.log and DIR/tmp-{head,workerN}/session_latest/logs/.
set -euo pipefail

DIR=${1:-${RAYSEG_CLUSTER_DIR:-/tmp/raysegment-cluster}}
BASE=${RAYSEG_PORT_BASE:-26380}
WORKERS=${RAYSEG_WORKERS:-1}
HEAD_CPUS=${RAYSEG_HEAD_CPUS:-1}
WORKER_CPUS=${RAYSEG_WORKER_CPUS:-2}
RAY=${RAY:-ray}
TIMEOUT=${RAYSEG_START_TIMEOUT:-90}
MAX_WORKERS=8
if ! [[ $WORKERS =~ ^[0-9]+$ ]] || [ "$WORKERS" -gt $MAX_WORKERS ]; then
    echo "RAYSEG_WORKERS=$WORKERS: 0 to $MAX_WORKERS worker nodes (the port layout holds no more); nothing started" >&2
    exit 2
fi
RAY_BIN=$(cd "$(dirname "$(command -v "$RAY")")" && pwd)
PYTHON=$RAY_BIN/python
[ -x "$PYTHON" ] || PYTHON=python3
if [ -f "$RAY_BIN/../pyvenv.cfg" ]; then
    # A job runs `python` from its node's PATH: the venv $RAY belongs to, also when it is not activated.
    # Only a venv's: a system ray's folder (/usr/bin) first would reorder PATH (pyenv, conda behind it).
    export PATH="$RAY_BIN:$PATH"
fi

GCS_PORT=$BASE
DASHBOARD_PORT=$((BASE + 1))
CLIENT_PORT=$((BASE + 2))

if [ -e "$DIR/head.pid" ] && kill -0 "$(cat "$DIR/head.pid")" 2>/dev/null; then
    echo "a cluster is already running from $DIR (head pid $(cat "$DIR/head.pid")); stop it first" >&2
    exit 1
fi
mkdir -p "$DIR"
chmod 700 "$DIR"
DIR=$(cd "$DIR" && pwd)

# One token per cluster, in a file only we can read; Ray reads it through RAY_AUTH_TOKEN_PATH
# (RAY_AUTH_TOKEN would take precedence, so it is unset for the nodes).
umask 077
"$PYTHON" -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' >"$DIR/auth_token"
umask 022
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
unset RAY_AUTH_TOKEN RAY_ADDRESS RAY_API_SERVER_ADDRESS
# On SIGTERM a node first drains for up to this long (for Serve proxies; none here): stop at once.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}

# Node i gets ports BASE+10+10i..+5 and a worker port range BASE+100+200i..+199: the fixed ports of
# nodes 0..8 lie below BASE+100, a ninth worker node's would fall in the head's range (MAX_WORKERS).
node_ports() {
    local i=$1 p=$((BASE + 10 + 10 * $1)) w=$((BASE + 100 + 200 * $1))
    echo "--node-manager-port=$p --object-manager-port=$((p + 1)) --dashboard-agent-listen-port=$((p + 2))" \
        "--dashboard-agent-grpc-port=$((p + 3)) --runtime-env-agent-port=$((p + 4)) --metrics-export-port=$((p + 5))" \
        "--min-worker-port=$w --max-worker-port=$((w + 199))"
}

# `--block` keeps one `ray start` per node in the foreground of its own session (setsid):
# stop.sh signals that process, which shuts its node down, and can fall back to its process group.
# Each node has its own temp dir: nodes sharing one unpack job packages (working_dir) into the
# same runtime_resources folder and delete each other's copy mid-job.
launch() {
    local name=$1
    shift
    setsid nohup "$RAY" start --block --disable-usage-stats --node-ip-address=127.0.0.1 \
        --temp-dir="$DIR/tmp-$name" "$@" >"$DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$DIR/$name.pid"
}

alive_nodes() {
    "$PYTHON" - "$GCS_PORT" <<'PY' 2>/dev/null || echo 0
import sys
from ray.util.state import list_nodes
print(len(list_nodes(address=f"127.0.0.1:{sys.argv[1]}", filters=[("state", "=", "ALIVE")])))
PY
}

# Start one node and wait until the cluster has `want` nodes alive. On a loaded machine a
# node can miss Ray's fixed 30 s registration window and exit: clear its process group, retry.
start_node() {
    local name=$1 want=$2 attempt pid deadline
    shift 2
    for attempt in 1 2 3; do
        launch "$name" "$@"
        pid=$(cat "$DIR/$name.pid")
        deadline=$((SECONDS + TIMEOUT))
        while [ $SECONDS -lt $deadline ] && kill -0 "$pid" 2>/dev/null; do
            [ "$(alive_nodes)" -ge "$want" ] && return 0
            sleep 2
        done
        echo "node $name did not come up (attempt $attempt); see $DIR/$name.log" >&2
        kill -KILL -- "-$pid" 2>/dev/null || true  # gone already if the node exited by itself
        sleep 1
    done
    echo "cluster in $DIR: node $name failed to start; stop it with cluster/local/stop.sh $DIR" >&2
    exit 1
}

# shellcheck disable=SC2046
start_node head 1 --head --port="$GCS_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$CLIENT_PORT" --num-cpus="$HEAD_CPUS" --resources='{"head_node": 1}' $(node_ports 0)
for i in $(seq 1 "$WORKERS"); do
    # shellcheck disable=SC2046
    start_node "worker$i" $((i + 1)) --address="127.0.0.1:$GCS_PORT" --num-cpus="$WORKER_CPUS" \
        --resources='{"worker_node": 1}' $(node_ports "$i")
done

# Values quoted for the shell (printf %q): DIR may hold spaces or quotes.
write_env() {
    {
        printf 'export RAY_ADDRESS=%q\n' "127.0.0.1:$GCS_PORT"
        printf 'export RAY_API_SERVER_ADDRESS=%q\n' "http://127.0.0.1:$DASHBOARD_PORT"
        printf 'export RAY_AUTH_MODE=token\n'
        printf 'export RAY_AUTH_TOKEN_PATH=%q\n' "$DIR/auth_token"
    } >"$DIR/cluster.env"
}
write_env
echo "Ray cluster up: head + $WORKERS worker node(s), token auth on"
echo "  Jobs API / dashboard: http://127.0.0.1:$DASHBOARD_PORT   GCS: 127.0.0.1:$GCS_PORT"
echo "  source $(printf %q "$DIR/cluster.env")   # then: raysegment submit ... or ray job submit ..."

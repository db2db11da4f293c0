#!/usr/bin/env bash
# Stop a cluster started by cluster/local/start.sh: only the processes it started, by PID.
#   cluster/local/stop.sh [DIR]
# Each node's `ray start --block` gets SIGTERM; whatever is left of a node's process group after
# RAYSEG_STOP_TIMEOUT seconds (default 30) is killed. Never `ray stop`, which would take down
# every Ray on the machine.
set -uo pipefail

DIR=${1:-${RAYSEG_CLUSTER_DIR:-/tmp/raysegment-cluster}}
TIMEOUT=${RAYSEG_STOP_TIMEOUT:-30}
shopt -s nullglob
pidfiles=("$DIR"/worker*.pid)
[ -e "$DIR/head.pid" ] && pidfiles+=("$DIR/head.pid")
[ ${#pidfiles[@]} -gt 0 ] || { echo "no cluster in $DIR"; exit 0; }

group_alive() { [ -n "$(pgrep -g "$1" 2>/dev/null)" ]; }
# A pid file could outlive its node and the number be reused: only a group with a process
# running from this cluster's folder is ours.
ours() { [ -n "$(pgrep -g "$1" -f -- "$DIR" 2>/dev/null)" ]; }

# setsid made each node's `ray start --block` its session and process-group leader (pgid == pid),
# so the group is exactly that node's processes. SIGTERM to the leader makes it stop its node's
# processes in order; the group is the fallback.
groups=()
for f in "${pidfiles[@]}"; do
    pid=$(cat "$f")
    if ours "$pid"; then
        groups+=("$pid")
        kill -TERM "$pid" 2>/dev/null
    fi
    rm -f "$f"
done
deadline=$((SECONDS + TIMEOUT))
for pid in "${groups[@]}"; do
    while group_alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 1; done
    if group_alive "$pid"; then
        echo "process group $pid still running after ${TIMEOUT}s: killing it" >&2
        kill -KILL -- "-$pid" 2>/dev/null
    fi
done
echo "Ray cluster in $DIR stopped"

#!/usr/bin/env bash
# Stop a cluster started by cluster/local/start.sh: only the processes it started, by PID.
#   cluster/local/stop.sh [DIR]
# Each node's `ray start --block` gets SIGTERM; whatever is left of a node's process group after
# RAYSEG_STOP_TIMEOUT seconds (default 30) is killed. Never `ray stop`, which would take down
# every Ray on the machine.
set -uo pipefail

DIR=${1:-${RAYSEG_CLUSTER_DIR:-/tmp/raysegment-cluster}}
TIMEOUT=${RAYSEG_STOP_TIMEOUT:-30}
# The absolute path start.sh gave its nodes (--temp-dir=DIR/tmp-NAME), also when DIR is relative here.
[ -d "$DIR" ] && DIR=$(cd "$DIR" && pwd)
shopt -s nullglob
pidfiles=("$DIR"/worker*.pid)
[ -e "$DIR/head.pid" ] && pidfiles+=("$DIR/head.pid")
[ ${#pidfiles[@]} -gt 0 ] || { echo "no cluster in $DIR"; exit 0; }

pid_of() { local pid; pid=$(cat "$1" 2>/dev/null); [[ $pid =~ ^[0-9]+$ ]] && echo "$pid"; }
group_alive() { [ -n "$1" ] && [ -n "$(pgrep -g "$1" 2>/dev/null)" ]; }
# A pid file could outlive its node and the number be reused: only a group with a process
# running from this cluster's folder is ours. The folder is matched as plain text (grep -F):
# a name with [ ] ( ) . * is no pattern.
ours() {
    local procs
    procs=$(pgrep -a -g "$1" 2>/dev/null) && grep -qF -- "$DIR/" <<<"$procs"
}

# setsid made each node's `ray start --block` its session and process-group leader (pgid == pid),
# so the group is exactly that node's processes. SIGTERM to the leader makes it stop its node's
# processes in order; the group is the fallback.
groups=()
for f in "${pidfiles[@]}"; do
    pid=$(pid_of "$f")
    if group_alive "$pid" && ours "$pid"; then
        groups+=("$pid")
        kill -TERM "$pid" 2>/dev/null
    fi
done
deadline=$((SECONDS + TIMEOUT))
for pid in "${groups[@]}"; do
    while group_alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 1; done
    if group_alive "$pid"; then
        echo "process group $pid still running after ${TIMEOUT}s: killing it" >&2
        kill -KILL -- "-$pid" 2>/dev/null
        for _ in 1 2 3 4 5 6 7 8 9 10; do group_alive "$pid" && sleep 0.5; done
    fi
done
# A pid file goes only once its process group is gone: while one runs, the file is the way to it.
left=0
for f in "${pidfiles[@]}"; do
    pid=$(pid_of "$f")
    if ! group_alive "$pid"; then
        rm -f "$f"
    elif ours "$pid"; then
        echo "$f: process group $pid is still running; run this again" >&2
        left=1
    else
        echo "$f: process group $pid runs nothing from $DIR, so it was not signalled and the file is" \
            "kept; if that is not this cluster (its pid reused), delete the file" >&2
        left=1
    fi
done
if [ $left -ne 0 ]; then
    echo "Ray cluster in $DIR: not all of it stopped (above)" >&2
    exit 1
fi
echo "Ray cluster in $DIR stopped"

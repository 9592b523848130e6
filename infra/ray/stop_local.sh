#!/usr/bin/env bash
# Stop the local Ray nodes started by infra/ray/start_local.sh (same -t DIR / RAY_LOCAL_TEMP_DIR):
# worker first, then head. Only the processes of those nodes are signalled, in the order
# `ray stop` uses (raylet, then the agents and monitors, gcs_server last); `ray stop` itself is
# not used because it stops every Ray process of this user on the machine.
#   infra/ray/stop_local.sh [-t TEMP_DIR]
set -euo pipefail
# shellcheck source=../session.sh
source "$(dirname "${BASH_SOURCE[0]}")/../session.sh"

temp_dir="${RAY_LOCAL_TEMP_DIR:-/tmp/recast-ray-$(id -u)}"
while getopts "t:h" opt; do
    case "$opt" in
        t) temp_dir="$OPTARG" ;;
        h) sed -n '2,6p' "$0"; exit 0 ;;
        *) die "usage: $0 [-t TEMP_DIR]" ;;
    esac
done

for node in worker head; do
    pid_file="$temp_dir/recast-$node.pid"
    [[ -f "$pid_file" ]] || continue
    sid="$(cat "$pid_file")"
    if session_runs "$sid" ray; then
        # shellcheck disable=SC2046  # one word per pid
        {
            terminate 10 $(session_pids "$sid" '/raylet ')
            terminate 10 $(session_pids "$sid" . '/gcs_server ')
            terminate 10 $(session_pids "$sid")
        }
        echo "ray $node (session $sid) stopped" >&2
    elif [[ -n "$(session_pids "$sid")" ]]; then
        echo "stale pid file: session $sid is not a Ray node; left alone" >&2
    else
        echo "ray $node (session $sid) was not running" >&2
    fi
    rm -f "$pid_file"
done
rm -f "$temp_dir/ray_current_cluster"

#!/usr/bin/env bash
# Stop the local MLflow server started by infra/mlflow/start_local.sh (same -d DIR / MLFLOW_LOCAL_DIR).
#   infra/mlflow/stop_local.sh [-d DIR]
set -euo pipefail
# shellcheck source=../session.sh
source "$(dirname "${BASH_SOURCE[0]}")/../session.sh"

state_dir="${MLFLOW_LOCAL_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/recast/mlflow}"
while getopts "d:h" opt; do
    case "$opt" in
        d) state_dir="$OPTARG" ;;
        h) sed -n '2,3p' "$0"; exit 0 ;;
        *) die "usage: $0 [-d DIR]" ;;
    esac
done

pid_file="$state_dir/mlflow.pid"
if [[ ! -f "$pid_file" ]]; then
    echo "no pid file at $pid_file: nothing to stop" >&2
    exit 0
fi
sid="$(cat "$pid_file")"
if session_runs "$sid" mlflow; then
    # The server first, so it shuts its uvicorn worker down cleanly; then any leftover.
    terminate 20 "$sid"
    # shellcheck disable=SC2046  # one word per pid
    terminate 10 $(session_pids "$sid")
    echo "mlflow server (pid $sid) stopped" >&2
elif [[ -n "$(session_pids "$sid")" ]]; then
    echo "stale pid file: session $sid is not an MLflow server; left alone" >&2
else
    echo "mlflow server (pid $sid) was not running" >&2
fi
rm -f "$pid_file"

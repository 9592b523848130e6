#!/usr/bin/env bash
# Start a local MLflow tracking server on 127.0.0.1 only (SQLite backend store, proxied local
# artifact store) and print the line that points a shell at it:
#
#   eval "$(infra/mlflow/start_local.sh)"          # exports MLFLOW_TRACKING_URI
#   infra/mlflow/start_local.sh -p 5055 -d /path/to/state
#
# Options (or environment variables):
#   -p PORT   port on 127.0.0.1              (MLFLOW_LOCAL_PORT, default 5055)
#   -d DIR    state dir: mlflow.db, artifacts/, mlflow.log, mlflow.pid
#             (MLFLOW_LOCAL_DIR, default ${XDG_DATA_HOME:-~/.local/share}/recast/mlflow)
#   -t SECS   how long to wait for /health   (MLFLOW_LOCAL_START_TIMEOUT, default 90)
# The server runs with the mlflow of ${PYTHON:-python}. Stop it with infra/mlflow/stop_local.sh -d DIR.
set -euo pipefail
# shellcheck source=../session.sh
source "$(dirname "${BASH_SOURCE[0]}")/../session.sh"

port="${MLFLOW_LOCAL_PORT:-5055}"
state_dir="${MLFLOW_LOCAL_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/recast/mlflow}"
start_timeout="${MLFLOW_LOCAL_START_TIMEOUT:-90}"
python="${PYTHON:-python}"

while getopts "p:d:t:h" opt; do
    case "$opt" in
        p) port="$OPTARG" ;;
        d) state_dir="$OPTARG" ;;
        t) start_timeout="$OPTARG" ;;
        h) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "usage: $0 [-p PORT] [-d DIR] [-t SECS]" ;;
    esac
done
[[ "$port" =~ ^[0-9]+$ ]] || die "port must be an integer, got '$port'"

# Opt out of MLflow's usage telemetry (MLflow >= 3.2 reads both variables).
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
# MLflow >= 3.x also spawns a pool of background job workers (GenAI scorers); the pipeline does
# not use them, so keep the local server to one API process unless asked otherwise.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

"$python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('mlflow') is None)" 2>/dev/null ||
    die "'$python' has no mlflow module; activate the project venv or set PYTHON=.venv/bin/python"

mkdir -p "$state_dir/artifacts"
state_dir="$(cd "$state_dir" && pwd)" # absolute: the sqlite URI needs it
pid_file="$state_dir/mlflow.pid"
log_file="$state_dir/mlflow.log"
url="http://127.0.0.1:$port"

if [[ -f "$pid_file" ]] && session_runs "$(cat "$pid_file")" mlflow; then
    die "an MLflow server from $state_dir is already running (pid $(cat "$pid_file"))"
fi
port_in_use "$port" && die "port $port on 127.0.0.1 is already in use"

setsid "$python" -m mlflow server \
    --host 127.0.0.1 --port "$port" --workers 1 \
    --backend-store-uri "sqlite:///$state_dir/mlflow.db" \
    --artifacts-destination "$state_dir/artifacts" --serve-artifacts \
    </dev/null >"$log_file" 2>&1 &
pid=$!
echo "$pid" >"$pid_file"

healthy() {
    if command -v curl >/dev/null; then
        curl -fsS --max-time 2 "$url/health" >/dev/null 2>&1
    else
        "$python" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
            "$url/health" >/dev/null 2>&1
    fi
}

deadline=$((SECONDS + start_timeout))
until healthy; do
    if ! kill -0 "$pid" 2>/dev/null; then
        tail -n 30 "$log_file" >&2
        # shellcheck disable=SC2046  # one word per pid
        terminate 5 $(session_pids "$pid")
        rm -f "$pid_file"
        die "mlflow server exited during start-up (log: $log_file)"
    fi
    if ((SECONDS >= deadline)); then
        tail -n 30 "$log_file" >&2
        # shellcheck disable=SC2046
        terminate 10 $(session_pids "$pid")
        rm -f "$pid_file"
        die "mlflow server not healthy at $url/health after ${start_timeout}s (log: $log_file)"
    fi
    sleep 0.5
done

echo "mlflow server up: $url (pid $pid, state $state_dir)" >&2
echo "export MLFLOW_TRACKING_URI=$url"

#!/usr/bin/env bash
# Start a local Ray cluster on 127.0.0.1: a head node and, optionally, one worker node, then print
# the export lines that point a shell at it:
#
#   eval "$(infra/ray/start_local.sh -c 1 -w 1)"     # exports RAY_ADDRESS=127.0.0.1:6379
#
# Options (or environment variables):
#   -p PORT   GCS port of the head            (RAY_LOCAL_PORT, default 6379)
#   -c N      CPUs of the head node           (RAY_LOCAL_HEAD_CPUS, default 1)
#   -w N      CPUs of a worker node; 0 = none (RAY_LOCAL_WORKER_CPUS, default 0)
#   -t DIR    Ray temp dir: sessions, logs, pid files; keep it short, Ray puts unix sockets
#             under it (RAY_LOCAL_TEMP_DIR, default /tmp/recast-ray-$UID)
# RAY_LOCAL_CLIENT_PORT sets the Ray Client server port (used only when grpcio is installed).
# Uses the `ray` next to ${PYTHON:-python}. Stop with infra/ray/stop_local.sh -t DIR.
#
# Ray resolves 127.0.0.1 to the host's address and its gRPC ports listen on every interface, so
# with a Ray that supports it (token auth, Ray >= 2.5x) the cluster requires a token of its own,
# DIR/auth_token; the printed RAY_AUTH_* lines let drivers (dvc repro, ray.init) present it.
set -euo pipefail
# shellcheck source=../session.sh
source "$(dirname "${BASH_SOURCE[0]}")/../session.sh"

port="${RAY_LOCAL_PORT:-6379}"
head_cpus="${RAY_LOCAL_HEAD_CPUS:-1}"
worker_cpus="${RAY_LOCAL_WORKER_CPUS:-0}"
temp_dir="${RAY_LOCAL_TEMP_DIR:-/tmp/recast-ray-$(id -u)}"
python="${PYTHON:-python}"

while getopts "p:c:w:t:h" opt; do
    case "$opt" in
        p) port="$OPTARG" ;;
        c) head_cpus="$OPTARG" ;;
        w) worker_cpus="$OPTARG" ;;
        t) temp_dir="$OPTARG" ;;
        h) sed -n '2,18p' "$0"; exit 0 ;;
        *) die "usage: $0 [-p PORT] [-c HEAD_CPUS] [-w WORKER_CPUS] [-t TEMP_DIR]" ;;
    esac
done
for value in "$port" "$head_cpus" "$worker_cpus"; do
    [[ "$value" =~ ^[0-9]+$ ]] || die "port and CPU counts must be integers, got '$value'"
done

export RAY_USAGE_STATS_ENABLED=0

python_path="$(command -v "$python")" || die "python '$python' not found; set PYTHON=.venv/bin/python"
ray_bin="$(dirname "$python_path")/ray"
[[ -x "$ray_bin" ]] || ray_bin="$(command -v ray)" || die "no 'ray' executable next to $python_path or on PATH"

mkdir -p -m 700 "$temp_dir"
temp_dir="$(cd "$temp_dir" && pwd)"
head_pid_file="$temp_dir/recast-head.pid"
worker_pid_file="$temp_dir/recast-worker.pid"
log_file="$temp_dir/recast-start.log"
address="127.0.0.1:$port"

if [[ -f "$head_pid_file" ]] && session_runs "$(cat "$head_pid_file")" ray; then
    die "a Ray head from $temp_dir is already running (session $(cat "$head_pid_file"))"
fi
port_in_use "$port" && die "port $port on 127.0.0.1 is already in use"

common_args=(--node-ip-address=127.0.0.1 --disable-usage-stats --temp-dir="$temp_dir"
    --dashboard-agent-listen-port=0) # 0 = any free port: several nodes share this host
client_args=()
if [[ -n "${RAY_LOCAL_CLIENT_PORT:-}" ]] && "$python" -c "import grpc" 2>/dev/null; then
    client_args=(--ray-client-server-port="$RAY_LOCAL_CLIENT_PORT")
fi

# start_node PID_FILE ARGS...: run `ray start` in a new session, record the session id.
start_node() {
    local pid_file="$1" pid
    shift
    setsid "$ray_bin" start "$@" </dev/null >>"$log_file" 2>&1 &
    pid=$!
    echo "$pid" >"$pid_file"
    if ! wait "$pid"; then
        tail -n 30 "$log_file" >&2
        "$(dirname "${BASH_SOURCE[0]}")/stop_local.sh" -t "$temp_dir" || true
        die "'ray start $*' failed (log: $log_file)"
    fi
}

: >"$log_file"

exports=()
unset RAY_AUTH_TOKEN
if "$python" -c "import ray._private.authentication.authentication_token_setup" 2>/dev/null; then
    token_file="$temp_dir/auth_token"
    [[ -s "$token_file" ]] ||
        (umask 077 && "$python" -c "import secrets; print(secrets.token_hex(32))" >"$token_file")
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token_file"
    exports+=("export RAY_AUTH_MODE=token" "export RAY_AUTH_TOKEN_PATH=$token_file")
fi
start_node "$head_pid_file" --head --port="$port" --num-cpus="$head_cpus" \
    --include-dashboard=false "${client_args[@]}" "${common_args[@]}"
echo "ray head up: $address ($head_cpus CPU, session $(cat "$head_pid_file"))" >&2

if ((worker_cpus > 0)); then
    start_node "$worker_pid_file" --address="$address" --num-cpus="$worker_cpus" "${common_args[@]}"
    echo "ray worker up: $worker_cpus CPU (session $(cat "$worker_pid_file"))" >&2
fi

printf '%s\n' "${exports[@]}" "export RAY_ADDRESS=$address"

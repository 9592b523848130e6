# shellcheck shell=bash
# Helpers shared by the start_local.sh / stop_local.sh scripts (source it, do not run it).
#
# Every local service is started with `setsid`, so it and all its children (uvicorn, raylet,
# gcs_server, ...) share one session whose id is the pid written to the pid file. Stopping
# signals exactly the processes of that session, by pid: never `pkill`, never `ray stop`
# (which would also stop the Ray clusters other people run on the same machine).

die() {
    echo "error: $*" >&2
    exit 1
}

# session_pids SID [INCLUDE_RE] [EXCLUDE_RE]: pids of the live (non-zombie) processes of session
# SID whose command line matches the awk regex INCLUDE_RE and not EXCLUDE_RE, one per line.
session_pids() {
    ps -e -o pid=,sid=,stat=,args= | awk -v sid="$1" -v inc="${2:-.}" -v exc="${3:-^\$}" '
        $2 == sid && $3 !~ /^Z/ {
            args = $0
            sub(/^ *[0-9]+ +[0-9]+ +[^ ]+ +/, "", args)
            if (args ~ inc && args !~ exc) print $1
        }'
}

# session_runs SID TEXT: true when a live process of session SID has TEXT in its command line.
# Dies on a SID that is not a positive integer or that is the caller's own session.
session_runs() {
    local sid="$1" text="$2" own_sid pids args
    # The own-session check comes first: in a container the caller's session id can read as 0.
    own_sid="$(ps -o sid= -p $$ | tr -d ' ')"
    [[ "$sid" != "$own_sid" ]] || die "refusing to touch the caller's own session $sid"
    [[ "$sid" =~ ^[0-9]+$ ]] && ((sid > 1)) || die "invalid session id '$sid'"
    pids="$(session_pids "$sid")"
    [[ -n "$pids" ]] || return 1
    # shellcheck disable=SC2086  # word splitting of the pid list is intended
    args="$(ps -o args= -p "$(echo $pids | tr ' ' ',')" || true)"
    [[ "$args" == *"$text"* ]]
}

# terminate GRACE PID...: SIGTERM the pids, wait up to GRACE s, then SIGKILL the survivors.
terminate() {
    local grace="$1" killed=0 deadline
    shift
    (($#)) || return 0
    kill -TERM "$@" 2>/dev/null || true
    deadline=$((SECONDS + grace))
    while any_alive "$@"; do
        if ((SECONDS >= deadline)); then
            ((!killed)) || die "pids $* survived SIGKILL"
            echo "pids $* still running after ${grace}s, sending SIGKILL" >&2
            kill -KILL "$@" 2>/dev/null || true
            killed=1
            deadline=$((SECONDS + 10))
        fi
        sleep 0.2
    done
}

# any_alive PID...: true when one of the pids is a live (non-zombie) process.
any_alive() {
    local IFS=, states
    states="$(ps -o stat= -p "$*" 2>/dev/null || true)"
    [[ -n "$(grep -v '^Z' <<<"$states" || true)" ]]
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

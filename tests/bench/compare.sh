#!/usr/bin/env bash
# compare.sh: old against new `coupons` binary, interleaved, on 127.0.0.1 only.
#
# Usage:
#   compare.sh OLD_BINARY NEW_BINARY ROUNDS
#   DURATION=3 compare.sh ...        # shorter load runs (a check of the harness, not a measurement)
#
# Environment overrides:
#   DURATION      seconds of load per run (default 8)
#   PERF_WINDOW   seconds of the `perf stat` window in the hot x64 run (default 4, at most
#                 DURATION/2); the window is centred in the load phase of the run
#   OUT_DIR       where the CSV, raw JSON and logs go (default: the current directory)
#   ONLY          which runs, space-separated (default: all of them, listed below)
#   OLD_ENV, NEW_ENV  extra service environment for one side only, e.g. OLD_ENV="CLAIM_WORKERS=80"
#                 (space-separated NAME=VALUE words)
#
# What it runs, per round, for each binary (a fresh service on a fresh private MariaDB each
# time: `coupons serve` with DATABASE_URL unset and COUPONS_DATA_DIR a new temporary directory):
#   hot256       loadtest hot, 256 connections: claims/s, p99
#   hot64        loadtest hot, 64 connections: claims/s, p99, and a `perf stat` window on the
#                service process: context switches and task-clock per claim
#   spread8on    loadtest spread over 1,000 coupons, 8 connections, CLAIM_BATCHING on: claims/s
#   spread8off   the same with CLAIM_BATCHING=off in the service's environment: claims/s
#   spread64     loadtest spread over 1,000 coupons, 64 connections: claims/s, p99
#   memclaim     loadtest hot with 1,000 connections (as the old bench-suite's "memory" run):
#                peak VmRSS of the service, sampled every 0.2 s
#   memidle      1,000 idle keep-alive connections, each having had one GET /healthz:
#                VmRSS and threads of the service
# The load generator is always NEW_BINARY's `loadtest --url ...`, for both sides.
# Pairs of runs alternate their order (old,new, new,old, old,new, ...) to spread drift.
#
# Output: a table of medians over rounds (old, new, new/old), every figure in
# OUT_DIR/results-<timestamp>.csv, every loadtest JSON summary in results-<timestamp>.jsonl and
# the logs in logs-<timestamp>/.
#
# Every service, private MariaDB and helper this script starts is stopped on exit, failure,
# Ctrl-C or SIGTERM (trap cleanup).

set -uo pipefail

if [ $# -ne 3 ]; then
    sed -n '2,12p' "$0" >&2
    exit 2
fi
OLD_BIN=$(readlink -f "$1")
NEW_BIN=$(readlink -f "$2")
ROUNDS=$3
DURATION=${DURATION:-8}
OUT_DIR=${OUT_DIR:-.}
ADMIN_EMAIL=bench-admin@example.com
ADMIN_PASSWORD=bench-admin-password
for b in "$OLD_BIN" "$NEW_BIN"; do
    [ -x "$b" ] || { echo "compare.sh: $b is not an executable" >&2; exit 2; }
done
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: ROUNDS must be a positive whole number" >&2; exit 2; }
for tool in perf curl python3 timeout; do
    command -v "$tool" >/dev/null || { echo "compare.sh: $tool is missing" >&2; exit 2; }
done
# The perf window: PERF_WINDOW seconds (default 4), at most half the run, centred in the load.
PERF_WINDOW=$(python3 -c "import sys; d=float(sys.argv[1]); w=float(sys.argv[2]); print(round(min(w, d/2), 3))" \
    "$DURATION" "${PERF_WINDOW:-4}")
PERF_OFFSET=$(python3 -c "import sys; print(round((float(sys.argv[1]) - float(sys.argv[2])) / 2, 3))" \
    "$DURATION" "$PERF_WINDOW")

# 1,000 client sockets plus the loadtest's own: raise the soft fd limit to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

TS=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT_DIR"
CSV="$OUT_DIR/results-$TS.csv"
JSONL="$OUT_DIR/results-$TS.jsonl"
LOGS="$OUT_DIR/logs-$TS"
mkdir -p "$LOGS"
# Temporary data directories live under a short path: the MariaDB socket path must stay
# under ~100 characters.
TMP=$(mktemp -d "${TMPDIR:-/tmp}/cmpb.XXXXXX")

echo "time_utc,round,seq,side,binary_sha256,run,metric,value" > "$CSV"
OLD_SHA=$(sha256sum "$OLD_BIN" | cut -c1-12)
NEW_SHA=$(sha256sum "$NEW_BIN" | cut -c1-12)
{
    echo "old: $OLD_BIN sha256 $OLD_SHA"
    echo "new: $NEW_BIN sha256 $NEW_SHA"
    echo "load generator: $NEW_BIN loadtest"
    echo "rounds $ROUNDS, duration $DURATION s, perf window $PERF_WINDOW s from $PERF_OFFSET s into the load"
    echo "started $TS on $(hostname), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$LOGS/meta.txt"

# ---------------------------------------------------------------------------------------------
# Process bookkeeping and cleanup.

HELPERS=()      # pids of loadtests, perf, samplers, python helpers still running
SERVICES=()     # "pid:datadir" of services still running

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# Waits up to $2 seconds for pid $1 to exit; returns 1 if it is still alive.
wait_gone() {
    local pid=$1 i=0 limit=$(( $2 * 10 ))
    while kill -0 "$pid" 2>/dev/null; do
        [ $i -ge $limit ] && return 1
        sleep 0.1; i=$((i + 1))
    done
    return 0
}

# TERM, then KILL after $2 seconds (default 5). Only the pid given, never by name.
stop_pid() {
    local pid=$1 grace=${2:-5}
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    wait_gone "$pid" "$grace" || { kill -KILL "$pid" 2>/dev/null; wait_gone "$pid" 5; }
    wait "$pid" 2>/dev/null || true
}

# stop_service PID DIR: stops a service (its drain lasts at most 10 s), then makes sure its
# private MariaDB (pid in DIR/db/server.pid; the service's watchdog stops it when the service
# exits) is gone, then removes DIR (the run's COUPONS_DATA_DIR is DIR/db).
stop_service() {
    local pid=$1 dir=$2 dbpid=""
    [ -f "$dir/db/server.pid" ] && dbpid=$(cat "$dir/db/server.pid" 2>/dev/null)
    stop_pid "$pid" 20
    if [ -n "$dbpid" ] && kill -0 "$dbpid" 2>/dev/null; then
        # Only if it really is that data directory's server (the pid could have been reused).
        if tr '\0' ' ' < "/proc/$dbpid/cmdline" 2>/dev/null | grep -q -- "--datadir=$dir/db/"; then
            wait_gone "$dbpid" 30 || { log "MariaDB $dbpid did not stop: SIGKILL"; kill -KILL "$dbpid" 2>/dev/null; wait_gone "$dbpid" 5; }
        fi
    fi
    rm -rf -- "$dir"
    local keep=() s
    for s in "${SERVICES[@]}"; do [ "$s" != "$pid:$dir" ] && keep+=("$s"); done
    SERVICES=("${keep[@]}")
}

forget_helper() {
    local keep=() p
    for p in "${HELPERS[@]}"; do [ "$p" != "$1" ] && keep+=("$p"); done
    HELPERS=("${keep[@]}")
}

CLEANED=0
cleanup() {
    [ "$CLEANED" = 1 ] && return
    CLEANED=1
    trap '' INT TERM
    local p s
    for p in "${HELPERS[@]}"; do stop_pid "$p" 3; done
    for s in "${SERVICES[@]}"; do stop_service "${s%%:*}" "${s#*:}"; done
    rm -rf -- "$TMP"
}
trap cleanup EXIT
trap 'log "interrupted: cleaning up"; exit 130' INT TERM HUP

# ---------------------------------------------------------------------------------------------
# One service.

SVC_PID=""; SVC_DIR=""; SVC_ADDR=""

# start_service SIDE BIN LOGPREFIX [NAME=VALUE ...]: a fresh `coupons serve` on a fresh private
# MariaDB, an admin registered and promoted. Sets SVC_PID, SVC_DIR, SVC_ADDR.
start_service() {
    local side=$1 bin=$2 logp=$3; shift 3
    local extra=()
    if [ "$side" = old ]; then read -r -a extra <<< "${OLD_ENV:-}"; else read -r -a extra <<< "${NEW_ENV:-}"; fi
    SVC_DIR=$(mktemp -d "$TMP/s.XXXX")
    (
        cd "$SVC_DIR" || exit 1
        unset DATABASE_URL JWT_SECRET
        exec env COUPONS_DATA_DIR="$SVC_DIR/db" BIND_ADDR=127.0.0.1:0 BCRYPT_COST=4 ACCESS_LOG=off \
            LOGIN_FAILS_PER_EMAIL_PER_MIN=0 LOGIN_FAILS_PER_IP_PER_MIN=0 REGISTRATIONS_PER_IP_PER_MIN=0 \
            "${extra[@]}" "$@" "$bin" serve
    ) > "$logp.service.out" 2> "$logp.service.err" &
    SVC_PID=$!
    SERVICES+=("$SVC_PID:$SVC_DIR")
    SVC_ADDR=""
    local i
    for i in $(seq 600); do     # at most 60 s to start
        SVC_ADDR=$(sed -n 's|^coupons: listening on http://||p' "$logp.service.out" 2>/dev/null)
        [ -n "$SVC_ADDR" ] && break
        kill -0 "$SVC_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [ -z "$SVC_ADDR" ]; then
        log "ERROR: $side service did not start (see $logp.service.err)"
        return 1
    fi
    # The admin: register over HTTP, promote with the same binary, data directory and cwd.
    curl -s --max-time 10 -o /dev/null -X POST "http://$SVC_ADDR/register" -H 'Content-Type: application/json' \
        -d "{\"email\":\"$ADMIN_EMAIL\",\"password\":\"$ADMIN_PASSWORD\"}"
    if ! (cd "$SVC_DIR" && unset DATABASE_URL && COUPONS_DATA_DIR="$SVC_DIR/db" BCRYPT_COST=4 \
            timeout -k 5 60 "$bin" admin promote "$ADMIN_EMAIL") >> "$logp.service.out" 2>> "$logp.service.err"; then
        log "ERROR: $side admin promote failed (see $logp.service.err)"
        return 1
    fi
    # /metrics is for admins (since issue 16); older builds ignore the token.
    SVC_TOKEN=$(curl -s --max-time 10 -X POST "http://$SVC_ADDR/login" -H 'Content-Type: application/json' \
        -d "{\"email\":\"$ADMIN_EMAIL\",\"password\":\"$ADMIN_PASSWORD\"}" |
        python3 -c 'import json,sys; print(json.load(sys.stdin).get("token", ""))')
    return 0
}

# VmRSS in MiB and Threads of a pid.
rss_mib() { awk '/^VmRSS:/ {printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null; }
threads_of() { awk '/^Threads:/ {print $2}' "/proc/$1/status" 2>/dev/null; }

# The claims the service counted as successful (coupons_claims_total{outcome="claimed"}) in a
# saved /metrics text.
claimed_in() { awk '/^coupons_claims_total\{outcome="claimed"\}/ {n += $2} END {printf "%d", n}' "$1"; }

# ---------------------------------------------------------------------------------------------
# Recording.

ROUND=0; SEQ=0; SIDE=""; SHA=""; RUN=""
record() {   # record METRIC VALUE
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ),$ROUND,$SEQ,$SIDE,$SHA,$RUN,$1,${2:-NA}" >> "$CSV"
}

# The loadtest's JSON summary (its last stdout line) field $2 of file $1.
jfield() { python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]).get(sys.argv[2], 'NA'))" "$1" "$2" 2>/dev/null || echo NA; }

# Runs NEW_BINARY's loadtest against the current service, in the background; sets LT_PID.
LT_PID=""
start_loadtest() {   # start_loadtest LOGPREFIX ARGS...
    local logp=$1; shift
    timeout -k 5 $(( ${DURATION%.*} + 180 )) "$NEW_BIN" loadtest --url "http://$SVC_ADDR" \
        --admin-email "$ADMIN_EMAIL" --admin-password "$ADMIN_PASSWORD" \
        --duration "$DURATION" --json "$@" > "$logp.loadtest.json" 2> "$logp.loadtest.err" &
    LT_PID=$!
    HELPERS+=("$LT_PID")
}

# Waits for the loadtest, records its figures; returns its exit status.
finish_loadtest() {   # finish_loadtest LOGPREFIX WANT_P99(yes|no)
    local logp=$1 rc=0
    wait "$LT_PID" || rc=$?
    forget_helper "$LT_PID"
    if [ -s "$logp.loadtest.json" ]; then
        python3 - "$logp.loadtest.json" "$ROUND" "$SIDE" "$RUN" "$SHA" >> "$JSONL" <<'EOF'
import json, sys
v = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
v.update(round=int(sys.argv[2]), side=sys.argv[3], run=sys.argv[4], binary_sha256=sys.argv[5])
v.pop("successes_per_sec", None)
print(json.dumps(v))
EOF
    fi
    record claims_per_s "$(jfield "$logp.loadtest.json" claims_per_sec)"
    [ "$2" = yes ] && record p99_ms "$(jfield "$logp.loadtest.json" p99_ms)"
    record errors "$(jfield "$logp.loadtest.json" errors)"
    record invariant_ok "$(jfield "$logp.loadtest.json" invariant_ok)"
    record loadtest_exit "$rc"
    [ "$rc" = 0 ] || log "WARNING: $SIDE $RUN: loadtest exited $rc (see $logp.loadtest.err)"
    return $rc
}

# Waits until the loadtest has finished its set-up and started the load (its stderr line
# "loadtest: <Scenario> on ... with N connections"); at most 120 s.
wait_load_started() {
    local logp=$1 i
    for i in $(seq 1200); do
        grep -q '^loadtest: ' "$logp.loadtest.err" 2>/dev/null && return 0
        kill -0 "$LT_PID" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------------------------------------
# The runs. Each: start a service, measure, stop it (and its MariaDB), remove its data.

# run_claims SCENARIO CONNECTIONS WANT_P99 [SERVICE_ENV...]
run_claims() {
    local scenario=$1 conns=$2 p99=$3; shift 3
    local logp="$LOGS/r$ROUND-$SEQ-$SIDE-$RUN"
    if start_service "$SIDE" "$BIN" "$logp" "$@"; then
        start_loadtest "$logp" --scenario "$scenario" --connections "$conns" --coupons 1000
        finish_loadtest "$logp" "$p99"
    fi
    stop_service "$SVC_PID" "$SVC_DIR"
}

# hot, 64 connections, with `perf stat` on the service over PERF_WINDOW seconds centred in the
# load. Claims in the window: coupons_claims_total{outcome="claimed"} read from /metrics at the
# window's start and end (both reads inside the perf window, a few ms from its edges).
run_hot64_perf() {
    local logp="$LOGS/r$ROUND-$SEQ-$SIDE-$RUN"
    if start_service "$SIDE" "$BIN" "$logp"; then
        start_loadtest "$logp" --scenario hot --connections 64
        if wait_load_started "$logp"; then
            sleep "$PERF_OFFSET"
            perf stat -x, -o "$logp.perf.csv" -e context-switches,task-clock -p "$SVC_PID" -- \
                bash -c 'm() { curl -s --max-time 5 -H "Authorization: Bearer $4" "http://$1/metrics"; }
                         date +%s.%N > "$2.w0"; m "$@" > "$2.m0"
                         sleep "$3"
                         m "$@" > "$2.m1"; date +%s.%N > "$2.w1"' \
                _ "$SVC_ADDR" "$logp" "$PERF_WINDOW" "$SVC_TOKEN" 2>> "$logp.perf.err" &
            local perf_pid=$!
            HELPERS+=("$perf_pid")
            wait "$perf_pid"; forget_helper "$perf_pid"
        fi
        finish_loadtest "$logp" yes
        local claims cs clock secs
        claims=0
        [ -s "$logp.m0" ] && [ -s "$logp.m1" ] && claims=$(( $(claimed_in "$logp.m1") - $(claimed_in "$logp.m0") ))
        cs=$(awk -F, '$3 == "context-switches" {print $1}' "$logp.perf.csv" 2>/dev/null)
        clock=$(awk -F, '$3 == "task-clock" {print $1}' "$logp.perf.csv" 2>/dev/null)   # msec
        secs=$(python3 -c "import sys; print(round(float(open(sys.argv[2]).read()) - float(open(sys.argv[1]).read()), 3))" \
            "$logp.w0" "$logp.w1" 2>/dev/null || echo NA)
        record window_s "$secs"
        record window_claims "$claims"
        record window_context_switches "${cs:-NA}"
        record window_task_clock_ms "${clock:-NA}"
        if [ "$claims" -gt 0 ] && [ -n "$cs" ] && [ -n "$clock" ] && [[ "$cs" =~ ^[0-9]+$ ]]; then
            record cs_per_claim "$(python3 -c "print(round($cs / $claims, 3))")"
            record cpu_us_per_claim "$(python3 -c "print(round($clock * 1000 / $claims, 2))")"
            record window_claims_per_s "$(python3 -c "print(round($claims / $secs, 1))")"
        else
            log "WARNING: $SIDE $RUN: no perf window figures (see $logp.perf.err)"
            record cs_per_claim NA; record cpu_us_per_claim NA
        fi
    fi
    stop_service "$SVC_PID" "$SVC_DIR"
}

# 1,000 connections claiming one hot coupon (the old bench-suite's memory run, driven over
# --url): peak VmRSS and threads of the service, sampled every 0.2 s over the whole run.
run_mem_claiming() {
    local logp="$LOGS/r$ROUND-$SEQ-$SIDE-$RUN"
    if start_service "$SIDE" "$BIN" "$logp"; then
        record rss_at_rest_mib "$(rss_mib "$SVC_PID")"
        record threads_at_rest "$(threads_of "$SVC_PID")"
        start_loadtest "$logp" --scenario hot --connections 1000
        local max_rss=0 max_thr=0 r t
        while kill -0 "$LT_PID" 2>/dev/null; do
            r=$(awk '/^VmRSS:/ {print $2}' "/proc/$SVC_PID/status" 2>/dev/null); t=$(threads_of "$SVC_PID")
            [ -n "$r" ] && [ "$r" -gt "$max_rss" ] && max_rss=$r
            [ -n "$t" ] && [ "$t" -gt "$max_thr" ] && max_thr=$t
            sleep 0.2
        done
        finish_loadtest "$logp" yes
        record rss_peak_mib "$(awk -v k="$max_rss" 'BEGIN {printf "%.1f", k/1024}')"
        record threads_peak "$max_thr"
    fi
    stop_service "$SVC_PID" "$SVC_DIR"
}

# 1,000 idle keep-alive connections, each having sent one GET /healthz and read its answer:
# VmRSS and threads of the service one second after the last answer (the service closes a
# connection that sends no request head for 10 s, so the reading is taken well before that).
IDLE_PY=$TMP/idle.py
cat > "$IDLE_PY" <<'EOF'
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
n, hold = int(sys.argv[2]), float(sys.argv[3])
socks, ok = [], 0
for i in range(n):
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: " + sys.argv[1].encode() + b"\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            break
        body += chunk
    if head.startswith(b"HTTP/1.1 200"):
        ok += 1
    socks.append(s)
print("ready", ok, flush=True)
time.sleep(hold)
# Still open? A closed connection reads EOF at once.
alive = 0
for s in socks:
    s.setblocking(False)
    try:
        alive += 0 if s.recv(1) == b"" else 1
    except BlockingIOError:
        alive += 1
    except OSError:
        pass
print("alive", alive, flush=True)
EOF

run_mem_idle() {
    local logp="$LOGS/r$ROUND-$SEQ-$SIDE-$RUN"
    if start_service "$SIDE" "$BIN" "$logp"; then
        record rss_at_rest_mib "$(rss_mib "$SVC_PID")"
        timeout -k 5 120 python3 "$IDLE_PY" "$SVC_ADDR" 1000 2 > "$logp.idle.out" 2> "$logp.idle.err" &
        local py=$! i ok=""
        HELPERS+=("$py")
        for i in $(seq 1200); do
            ok=$(sed -n 's/^ready //p' "$logp.idle.out" 2>/dev/null)
            [ -n "$ok" ] && break
            kill -0 "$py" 2>/dev/null || break
            sleep 0.1
        done
        if [ -n "$ok" ]; then
            sleep 1
            record rss_idle_mib "$(rss_mib "$SVC_PID")"
            record threads_idle "$(threads_of "$SVC_PID")"
            record idle_ok_answers "$ok"
            wait "$py"
            record idle_alive_after_hold "$(sed -n 's/^alive //p' "$logp.idle.out")"
        else
            log "WARNING: $SIDE $RUN: the idle-connection helper failed (see $logp.idle.err)"
            record rss_idle_mib NA
        fi
        stop_pid "$py" 3; forget_helper "$py"
    fi
    stop_service "$SVC_PID" "$SVC_DIR"
}

# One run of one side: sets the recording context and dispatches.
one() {   # one SIDE RUN
    SIDE=$1; RUN=$2
    if [ "$SIDE" = old ]; then BIN=$OLD_BIN; SHA=$OLD_SHA; else BIN=$NEW_BIN; SHA=$NEW_SHA; fi
    SEQ=$((SEQ + 1))
    log "round $ROUND/$ROUNDS, run $SEQ: $SIDE $RUN"
    case $RUN in
        hot256)     run_claims hot 256 yes ;;
        hot64)      run_hot64_perf ;;
        spread8on)  run_claims spread 8 no CLAIM_BATCHING=on ;;
        spread8off) run_claims spread 8 no CLAIM_BATCHING=off ;;
        spread64)   run_claims spread 64 yes ;;
        memclaim)   run_mem_claiming ;;
        memidle)    run_mem_idle ;;
    esac
}

RUNS=(${ONLY:-hot256 hot64 spread8on spread8off spread64 memclaim memidle})
START=$(date +%s)
PAIR=0
for ROUND in $(seq 1 "$ROUNDS"); do
    SEQ=0
    for r in "${RUNS[@]}"; do
        # old,new then new,old then old,new ... over the whole sequence of pairs
        if [ $((PAIR % 2)) -eq 0 ]; then one old "$r"; one new "$r"; else one new "$r"; one old "$r"; fi
        PAIR=$((PAIR + 1))
    done
done
ELAPSED=$(( $(date +%s) - START ))

# ---------------------------------------------------------------------------------------------
# The table: medians over rounds, old and new, new/old. Derived per-round ratios (spread 8
# connections, combining on / off, per binary) are appended to the CSV too.
python3 - "$CSV" "$ELAPSED" <<'EOF'
import csv, statistics, sys
path, elapsed = sys.argv[1], int(sys.argv[2])
rows = list(csv.DictReader(open(path)))
def num(v):
    try:
        return float(v)
    except ValueError:
        return None
vals = {}
for r in rows:
    v = num(r["value"])
    if v is not None:
        vals.setdefault((r["run"], r["metric"], r["side"]), {})[r["round"]] = v
# spread x8: on/off per binary, per round
derived = []
for side in ("old", "new"):
    on, off = vals.get(("spread8on", "claims_per_s", side), {}), vals.get(("spread8off", "claims_per_s", side), {})
    for rnd in sorted(set(on) & set(off), key=int):
        if off[rnd]:
            ratio = round(on[rnd] / off[rnd], 3)
            vals.setdefault(("spread8", "on_off_ratio", side), {})[rnd] = ratio
            derived.append((rnd, side, ratio))
if derived:
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        for rnd, side, ratio in derived:
            w.writerow(["derived", rnd, "", side, "", "spread8", "on_off_ratio", ratio])
shown = [
    ("hot256", "claims_per_s", "hot x256: claims/s"),
    ("hot256", "p99_ms", "hot x256: p99 ms"),
    ("hot64", "claims_per_s", "hot x64: claims/s"),
    ("hot64", "p99_ms", "hot x64: p99 ms"),
    ("hot64", "cs_per_claim", "hot x64: context switches / claim (perf window)"),
    ("hot64", "cpu_us_per_claim", "hot x64: service CPU us / claim (perf window)"),
    ("hot64", "window_claims_per_s", "hot x64: claims/s in the perf window"),
    ("spread8on", "claims_per_s", "spread x8, combining on: claims/s"),
    ("spread8off", "claims_per_s", "spread x8, CLAIM_BATCHING=off: claims/s"),
    ("spread8", "on_off_ratio", "spread x8: on / off (median of per-round ratios)"),
    ("spread64", "claims_per_s", "spread x64: claims/s"),
    ("spread64", "p99_ms", "spread x64: p99 ms"),
    ("memclaim", "rss_peak_mib", "1,000 conns claiming: peak RSS MiB"),
    ("memclaim", "threads_peak", "1,000 conns claiming: peak threads"),
    ("memclaim", "claims_per_s", "1,000 conns claiming: claims/s"),
    ("memidle", "rss_idle_mib", "1,000 idle keep-alive conns: RSS MiB"),
    ("memidle", "threads_idle", "1,000 idle keep-alive conns: threads"),
    ("memidle", "rss_at_rest_mib", "at rest (fresh service): RSS MiB"),
]
def med(d):
    return statistics.median(d.values()) if d else None
def fmt(x):
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:,.2f}" if abs(x) >= 10 else f"{x:.3f}"
rounds = max((int(r["round"]) for r in rows if r["round"].isdigit()), default=0)
print(f"\nMedians over {rounds} round(s); {elapsed} s in all.  Raw figures: {path}\n")
print(f"| {'figure':<52} | {'old':>10} | {'new':>10} | {'new/old':>7} | n |")
print(f"|{'-'*54}|{'-'*12}|{'-'*12}|{'-'*9}|---|")
for run, metric, label in shown:
    o, n = med(vals.get((run, metric, "old"), {})), med(vals.get((run, metric, "new"), {}))
    ratio = f"{n / o:.3f}" if o and n is not None else "n/a"
    cnt = min(len(vals.get((run, metric, "old"), {})), len(vals.get((run, metric, "new"), {})))
    print(f"| {label:<52} | {fmt(o):>10} | {fmt(n):>10} | {ratio:>7} | {cnt} |")
bad = [r for r in rows if (r["metric"] == "errors" and num(r["value"]) not in (0.0,))
       or (r["metric"] == "invariant_ok" and r["value"] != "True")
       or (r["metric"] == "loadtest_exit" and r["value"] != "0")
       or (r["metric"] in ("claims_per_s", "rss_idle_mib", "cs_per_claim") and r["value"] == "NA")]
if bad:
    print("\nRuns with errors, failed checks or missing figures (their figures are still in the medians):")
    for r in bad:
        print(f"  round {r['round']} {r['side']} {r['run']}: {r['metric']} = {r['value']}")
else:
    print("\nEvery run: 0 errors, invariant checks passed, loadtest exit 0.")
EOF
log "done in $ELAPSED s; CSV $CSV, logs $LOGS"

#!/usr/bin/env bash
# A flash sale beside ordinary traffic: one service, 256 connections claiming one hot coupon,
# and meanwhile 8 connections claiming over 200 quiet coupons. Prints, for each CLAIM_LANES
# setting and round, the hot claims/s and the quiet claims' claims/s, p50 and p99.
#
#   cargo build --release && tests/bench/mixed.sh [ROUNDS] [LANES ...]
#
# LANES defaults to "0 2" (a lane per coupon, and two lanes). Everything runs on 127.0.0.1 and
# in a temporary directory that is removed at the end; each load stops by itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${COUPONS:-target/release/coupons}
ROUNDS=${1:-3}
shift || true
LANES=("${@:-0 2}")
read -r -a LANES <<<"${LANES[*]}"
PORT=$((21000 + $$ % 1000))
DIR=$(mktemp -d)
PID=
stop() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    PID=
}
trap 'stop; rm -rf "$DIR"' EXIT

field() { grep -o "\"$1\":[0-9.]*" | head -1 | cut -d: -f2; }

for round in $(seq 1 "$ROUNDS"); do
    for lanes in "${LANES[@]}"; do
        rm -rf "$DIR/db"
        CLAIM_LANES=$lanes BCRYPT_COST=4 ACCESS_LOG=off REGISTRATIONS_PER_IP_PER_MIN=0 \
            LOGIN_FAILS_PER_IP_PER_MIN=0 COUPONS_DATA_DIR="$DIR/db" BIND_ADDR=127.0.0.1:$PORT \
            "$BIN" serve >"$DIR/serve.log" 2>&1 &
        PID=$!
        for _ in $(seq 1 300); do
            curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
            sleep 0.2
        done
        curl -sf -X POST -H 'Content-Type: application/json' \
            -d '{"email":"admin@example.com","password":"mixed-bench-admin"}' \
            "http://127.0.0.1:$PORT/register" >/dev/null
        COUPONS_DATA_DIR="$DIR/db" "$BIN" admin promote admin@example.com >/dev/null
        load=(--url "http://127.0.0.1:$PORT" --admin-email admin@example.com
            --admin-password mixed-bench-admin --json)
        "$BIN" loadtest "${load[@]}" --scenario hot --connections 256 --users 256 \
            --duration 14 >"$DIR/hot.out" 2>&1 &
        HOT=$!
        sleep 4
        "$BIN" loadtest "${load[@]}" --scenario spread --coupons 200 --connections 8 \
            --users 8 --duration 8 >"$DIR/quiet.out" 2>&1
        wait "$HOT"
        stop
        hot=$(tail -1 "$DIR/hot.out")
        quiet=$(tail -1 "$DIR/quiet.out")
        echo "round $round CLAIM_LANES=$lanes: hot $(field claims_per_sec <<<"$hot") claims/s;" \
            "quiet $(field claims_per_sec <<<"$quiet") claims/s," \
            "p50 $(field p50_ms <<<"$quiet") ms, p99 $(field p99_ms <<<"$quiet") ms," \
            "invariant ok: $(grep -o '"invariant_ok":[a-z]*' <<<"$hot$quiet" | cut -d: -f2 | tr '\n' ' ')"
    done
done

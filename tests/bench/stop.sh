#!/usr/bin/env bash
# How long a stop takes under load: a service on a private MariaDB, 256 connections claiming
# without pause (loadtest, 25 s), SIGTERM 8 s in; prints when the service said "stopped" and
# when it exited, counted from the signal. The load goes on until its own end, so a stop that
# waits for the clients to leave shows as about 17 s.
#
#   cargo build --release && tests/bench/stop.sh [BINARY] [hot|hold]
#
# Everything runs on 127.0.0.1 and in a temporary directory that is removed at the end.
set -u
cd "$(dirname "$0")/../.."
bin=$(readlink -f "${1:-target/release/coupons}")
scenario=${2:-hot}
source tests/serve.sh
export BCRYPT_COST=4 ACCESS_LOG=off REGISTRATIONS_PER_IP_PER_MIN=0 LOGIN_FAILS_PER_IP_PER_MIN=0
serve stop-bench
creds='{"email":"admin@example.com","password":"admin-password-1"}'
curl -sf -X POST "http://$addr/register" -H 'Content-Type: application/json' -d "$creds" >/dev/null
"$bin" admin promote admin@example.com >/dev/null
"$bin" loadtest --url "http://$addr" --admin-email admin@example.com \
  --admin-password admin-password-1 --scenario "$scenario" --connections 256 --duration 25 \
  >"$dir/load" 2>&1 &
load=$!
sleep 8
signalled=$(date +%s.%N)
since() { awk "BEGIN { printf \"%.2f\", $(date +%s.%N) - $signalled }"; }
kill -TERM "$pid"
while kill -0 "$pid" 2>/dev/null; do
  if [ -z "${said:-}" ] && grep -q "coupons: stopped" "$dir/out"; then said=$(since); fi
  sleep 0.05
done
exited=$(since)
pid=""
wait "$load"
echo "stop.sh: $scenario x256: \"stopped\" after ${said:-?} s, exited after $exited s"
grep -E '^ +[0-9.]+s ' "$dir/load" | cut -c1-80

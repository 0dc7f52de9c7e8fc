#!/bin/bash
# Claims per second and p99 on a 3-node Galera cluster: through one node, and through three
# service processes on three nodes, on one hot coupon and spread over many. Every figure is
# `coupons loadtest --json` against running services; the three-node figures add up three
# loads run at once. Afterwards the hot coupon's balance on every node is printed.
#
#   cargo build --release && tests/galera/bench.sh [SECONDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-8}
conns=${2:-64}
bin=$PWD/target/release/coupons
dir=$(mktemp -d /tmp/coupons-galera-bench.XXXX)
cluster() { tests/galera/cluster.sh "$1" "$dir" "${@:2}"; }
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    cluster stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT

cluster start 25000 >&2
url() { echo "mysql://root@localhost/coupons?socket=$dir/node$1/mysql.sock&wsrep_sync_wait=1"; }
secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
serve() { # NODE PORT
    DATABASE_URL=$(url "$1") JWT_SECRET=$secret BIND_ADDR=127.0.0.1:$2 BCRYPT_COST=4 \
        ACCESS_LOG=off REGISTRATIONS_PER_IP_PER_MIN=0 LOGIN_FAILS_PER_IP_PER_MIN=0 \
        "$bin" serve >/dev/null 2>"$dir/serve$1.log" &
    pids+=($!)
    until curl -sf "http://127.0.0.1:$2/healthz" >/dev/null; do sleep 0.2; done
}
serve 1 8101
serve 2 8102
serve 3 8103
curl -sf -X POST http://127.0.0.1:8101/register -H 'Content-Type: application/json' \
    -d '{"email":"bench-admin@example.com","password":"bench-password"}' >/dev/null
mariadb --no-defaults --socket="$dir/node1/mysql.sock" -uroot coupons \
    -e "UPDATE users SET role = 'ADMIN' WHERE email = 'bench-admin@example.com'"
admin=(--admin-email bench-admin@example.com --admin-password bench-password)
load() { "$bin" loadtest "${admin[@]}" --duration "$secs" --json "$@" 2>/dev/null | tail -1; }
show() { # LABEL JSON...
    python3 - "$@" <<'EOF'
import json, sys
label, runs = sys.argv[1], [json.loads(r) for r in sys.argv[2:]]
rate = sum(r["claims_per_sec"] for r in runs)
p99 = max(r["p99_ms"] for r in runs)
errors = sum(r["errors"] for r in runs)
print(f"| {label} | {rate:,.0f} | {p99:.1f} | {errors} |")
EOF
}
# /metrics is for admins; $token is the admin's, set below before the first use.
retries() {
    curl -s -H "Authorization: Bearer $token" "http://127.0.0.1:$1/metrics" |
        awk '/^coupons_db_retries_total/ {print $2}'
}

echo "| load | claims/s | p99 ms (worst) | errors |"
echo "|---|---|---|---|"
show "one node, one hot coupon, $conns connections" "$(load --url http://127.0.0.1:8101 --scenario hot --connections "$conns")"
show "one node, spread over 1,000 coupons, $conns connections" \
    "$(load --url http://127.0.0.1:8101 --scenario spread --coupons 1000 --connections "$conns")"

# One hot coupon claimed through all three nodes at once.
token=$(curl -sf -X POST http://127.0.0.1:8101/login -H 'Content-Type: application/json' \
    -d '{"email":"bench-admin@example.com","password":"bench-password"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
hot=$(curl -sf -X POST http://127.0.0.1:8101/admin/coupons -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' -d '{"code":"GALERAHOT","available_count":100000000}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
before=$(( $(retries 8101) + $(retries 8102) + $(retries 8103) ))
each=$((conns / 3))
out=()
loads=()
for port in 8101 8102 8103; do
    load --url "http://127.0.0.1:$port" --scenario hot --coupon "$hot" --connections "$each" >"$dir/hot$port.json" &
    loads+=($!)
done
wait "${loads[@]}" || true  # a load with 503s exits non-zero; its summary says how many
for port in 8101 8102 8103; do out+=("$(cat "$dir/hot$port.json")"); done
show "three nodes, one hot coupon, 3 x $each connections" "${out[@]}"
after=$(( $(retries 8101) + $(retries 8102) + $(retries 8103) ))
out=()
loads=()
for port in 8101 8102 8103; do
    load --url "http://127.0.0.1:$port" --scenario spread --coupons 1000 --connections "$each" >"$dir/spread$port.json" &
    loads+=($!)
done
wait "${loads[@]}" || true  # a load with 503s exits non-zero; its summary says how many
for port in 8101 8102 8103; do out+=("$(cat "$dir/spread$port.json")"); done
show "three nodes, spread over 3 x 1,000 coupons, 3 x $each connections" "${out[@]}"
echo
echo "Transactions retried after a conflict (certification failures included) during the three-node hot load: $((after - before))."
for n in 1 2 3; do
    mariadb --no-defaults --socket="$dir/node$n/mysql.sock" -uroot coupons -N -e "
        SET SESSION wsrep_sync_wait = 1;
        SELECT CONCAT('node $n: hot coupon remaining + claims = ', co.available_count + COUNT(cl.id), ' of ', co.total_count, ' (', COUNT(cl.id), ' claims)')
        FROM coupons co LEFT JOIN claims cl ON cl.coupon_id = co.id AND cl.voided_at IS NULL
        WHERE co.id = $hot GROUP BY co.id"
done

#!/usr/bin/env bash
# Schemathesis (4.x, from PyPI) against a running service, driven by its own GET /openapi.json:
# every check, a fixed seed, a bounded number of examples. Exits non-zero on any failure.
#
# Usage:
#   tests/schemathesis/run.sh [BINARY]        # default target/debug/coupons
#   EXAMPLES=20 tests/schemathesis/run.sh     # examples per operation (default 100)
#   VENV=DIR                              # where Schemathesis is installed (default
#                                         # target/schemathesis-venv, made if missing)
#
# The service runs on a private MariaDB in a temporary directory (DATABASE_URL unset), with
# BCRYPT_COST=4 and the brute-force and keyed-request limits off, so that the fuzzer's
# thousands of requests measure the document, not the limits, and WEBHOOK_ALLOW_PRIVATE=on, so
# that hooks.py can give webhooks a local URL. Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(readlink -f "${1:-target/debug/coupons}")
examples=${EXAMPLES:-100}
venv=${VENV:-target/schemathesis-venv}

if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'schemathesis>=4,<5'
fi

source tests/serve.sh
export BCRYPT_COST=4 ACCESS_LOG=off \
  LOGIN_FAILS_PER_EMAIL_PER_MIN=0 LOGIN_FAILS_PER_IP_PER_MIN=0 \
  REGISTRATIONS_PER_IP_PER_MIN=0 KEYED_CLAIMS_PER_USER_PER_MIN=0 WEBHOOK_ALLOW_PRIVATE=on
serve schemathesis

# An admin, so that the admin routes are fuzzed past their 401 and 403.
creds='{"email":"fuzz-admin@example.com","password":"fuzz-admin-password"}'
post() { curl -sf -X POST "http://$addr$1" -H 'Content-Type: application/json' -d "$creds"; }
post /register >/dev/null
"$bin" admin promote fuzz-admin@example.com >/dev/null
token=$(post /login | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
# Something to find: coupons (one with a per-user limit) and a claim, so that ids 1 and 2 exist.
for body in '{"code":"FUZZ1","available_count":1000}' \
  '{"code":"FUZZ2","available_count":1000,"per_user_limit":1000000}'; do
  curl -sf -X POST "http://$addr/admin/coupons" -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' -d "$body" >/dev/null
done
curl -sf -X POST "http://$addr/coupons/1/claim" -H "Authorization: Bearer $token" >/dev/null

started=$(date +%s)
status=0
# From the temporary directory, so that Schemathesis's and Hypothesis's caches (which replay
# earlier failures first) go with it and every run is the same; the hooks state what JSON
# Schema cannot.
hooks=$(readlink -f tests/schemathesis/hooks.py)
venv=$(readlink -f "$venv")
config=$(readlink -f tests/schemathesis/schemathesis.toml)
(cd "$dir" && SCHEMATHESIS_HOOKS="$hooks" "$venv/bin/schemathesis" --config-file "$config" run "http://$addr/openapi.json" \
  -H "Authorization: Bearer $token" --max-examples "$examples" --seed 1 --workers 1 \
  --no-color) || status=$?
# The service's own account of a failure (a 500 logs its cause).
[ "$status" = 0 ] || sed 's/^/service: /' "$dir/out" >&2
echo "run.sh: $examples examples per operation, $(($(date +%s) - started)) s, exit $status"
exit "$status"

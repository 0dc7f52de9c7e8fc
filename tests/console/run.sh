#!/usr/bin/env bash
# The pages for people in a real browser: Debian's headless Chromium driven by Selenium (from
# PyPI, in a venv) through Debian's chromedriver, as a person would use them. /docs (Swagger
# UI): every operation rendered, Authorize with a token, try GET /users/me/history, 200. Then
# /console: an admin logs in, creates a coupon, the test claims it through the API, the stock
# bar and the live chart move, a claim is voided, an edit over someone else's change shows the
# 412, then the audit log. Screenshots go to target/console-screenshots/ (CI artefacts). Any
# missed step, and any Content-Security-Policy violation or script error the browser logs,
# fails the run.
#
# Usage:
#   tests/console/run.sh [BINARY]      # default target/debug/coupons
#   VENV=DIR                           # where Selenium is installed (default target/console-venv)
#   SCREENSHOT=FILE                    # also save the live console there (tests/console/console.png
#                                      # is the README's)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(readlink -f "${1:-target/debug/coupons}")
venv=${VENV:-target/console-venv}
shots=$(readlink -f target)/console-screenshots
command -v chromedriver >/dev/null || { echo "run.sh: chromedriver missing (apt-get install chromium-driver)" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import selenium' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'selenium>=4.20,<5'
fi

source tests/serve.sh
export BCRYPT_COST=4 ACCESS_LOG=off
serve console

# An admin, as README "Making an admin" says: register, then `coupons admin promote`.
curl -sf -X POST "http://$addr/register" -H 'Content-Type: application/json' \
  -d '{"email":"console-admin@example.com","password":"console-admin-password"}' >/dev/null
"$bin" admin promote console-admin@example.com >/dev/null

mkdir -p "$shots"
status=0
"$venv/bin/python" tests/console/browser.py "http://$addr" "$shots" || status=$?
[ "$status" = 0 ] || sed 's/^/service: /' "$dir/out" >&2
if [ "$status" = 0 ] && [ -n "${SCREENSHOT:-}" ]; then cp "$shots/console-live.png" "$SCREENSHOT"; fi
echo "run.sh: exit $status; screenshots in $shots"
exit "$status"

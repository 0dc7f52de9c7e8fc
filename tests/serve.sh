# Sourced by the scripts under tests/ that drive a running service. `serve NAME` starts "$bin"
# serve on a private MariaDB in a short /tmp directory (a socket's path must stay under about
# 100 characters), on a free port of 127.0.0.1, with the environment the caller exported, and
# sets `addr`, `pid` and `dir` ("$dir/out" is its output). The service and the directory go
# when the script exits.
serve() {
  dir=$(mktemp -d "/tmp/$1.XXXXXX")
  pid=""
  trap 'if [ -n "$pid" ]; then kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; fi; rm -rf "$dir"' EXIT
  export COUPONS_DATA_DIR="$dir/db"
  unset DATABASE_URL
  BIND_ADDR=127.0.0.1:0 "$bin" serve >"$dir/out" 2>&1 &
  pid=$!
  addr=""
  for _ in $(seq 150); do
    addr=$(sed -n 's|^coupons: listening on http://||p' "$dir/out")
    [ -n "$addr" ] && return 0
    sleep 0.2
  done
  cat "$dir/out"
  echo "$1: the service did not start" >&2
  exit 1
}

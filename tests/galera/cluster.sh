#!/bin/bash
# A 3-node MariaDB Galera cluster on loopback, for the Galera tests and for trying the service
# on a cluster. No Docker, nothing outside 127.0.0.1.
#
#   tests/galera/cluster.sh start DIR [BASE_PORT]   initialise (once) and start 3 nodes, wait for Synced
#   tests/galera/cluster.sh stop DIR                stop every node
#   tests/galera/cluster.sh kill DIR N              kill -9 node N (1 to 3)
#   tests/galera/cluster.sh restart DIR N           start node N again and wait until it is Synced
#   tests/galera/cluster.sh status DIR              each node's state and the cluster size
#
# Node N (1 to 3) listens for clients on 127.0.0.1:BASE+10N and DIR/nodeN/mysql.sock (root, no
# password); Galera uses BASE+10N+1 (group), +2 (IST) and +3 (SST). BASE defaults to 24000.
# The nodes run as the invoking user, in DIR; run as root, they run as the mysql user instead
# (directories chowned to it): a node running as root fails the rsync state transfer that a
# rejoining node needs (the rsync daemon drops to nobody).
set -euo pipefail

as_root=false
if [ "$(id -u)" = 0 ]; then
    as_root=true
    if ! id mysql >/dev/null 2>&1; then
        echo "cluster.sh: run as root, the nodes run as the mysql user, and there is none" >&2
        exit 1
    fi
fi
user_args=()
if $as_root; then user_args=(--user=mysql); fi
cmd=${1:?usage: cluster.sh start|stop|kill|restart|status DIR [N|BASE_PORT]}
dir=${2:?usage: cluster.sh $cmd DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
base_file=$dir/base-port
if [ "$cmd" = start ] && [ -n "${3:-}" ]; then echo "$3" >"$base_file"; fi
base=$(cat "$base_file" 2>/dev/null || echo 24000)
echo "$base" >"$base_file"
provider=/usr/lib/galera/libgalera_smm.so
server=$(command -v mariadbd || echo /usr/sbin/mariadbd)
client=$(command -v mariadb || echo mariadb)

port() { echo $((base + 10 * $1 + $2)); }
members() { echo "127.0.0.1:$(port 1 1),127.0.0.1:$(port 2 1),127.0.0.1:$(port 3 1)"; }
sql() { "$client" --no-defaults --socket="$dir/node$1/mysql.sock" -uroot -N -B -e "$2" 2>/dev/null; }
status_of() { sql "$1" "SHOW STATUS LIKE '$2'" | cut -f2; }

start_node() { # N [--wsrep-new-cluster]
    local n=$1 d=$dir/node$1
    mkdir -p "$d/tmp"
    if $as_root; then
        # The nodes run as mysql: it must reach and own these paths (rsync transfers included).
        chmod 755 "$dir"
        chown -R mysql:mysql "$d"
        chmod 755 "$d"
    fi
    if [ ! -d "$d/data/mysql" ]; then
        mariadb-install-db --no-defaults "${user_args[@]}" --datadir="$d/data" \
            --auth-root-authentication-method=normal >"$d/install.log" 2>&1
    fi
    if $as_root; then chown -R mysql:mysql "$d"; fi
    setsid "$server" --no-defaults "${user_args[@]}" --datadir="$d/data" --tmpdir="$d/tmp" \
        --socket="$d/mysql.sock" --port="$(port "$n" 0)" --bind-address=127.0.0.1 \
        --pid-file="$d/mysqld.pid" --log-error="$d/server.err" \
        --innodb-buffer-pool-size=64M --innodb-log-file-size=48M --max-connections=500 \
        --binlog-format=ROW --innodb-autoinc-lock-mode=2 --default-storage-engine=InnoDB \
        --wsrep-on=ON --wsrep-provider="$provider" --wsrep-cluster-name=coupons-test \
        --wsrep-cluster-address="gcomm://$(members)" \
        --wsrep-node-address=127.0.0.1 --wsrep-node-name="node$n" \
        --wsrep-provider-options="base_port=$(port "$n" 1);gmcast.listen_addr=tcp://127.0.0.1:$(port "$n" 1);ist.recv_addr=127.0.0.1:$(port "$n" 2);gcache.size=64M" \
        --wsrep-sst-method=rsync --wsrep-sst-receive-address="127.0.0.1:$(port "$n" 3)" \
        "${@:2}" </dev/null >/dev/null 2>&1 &
}

wait_synced() { # N SECONDS
    local n=$1 until=$((SECONDS + $2))
    while [ $SECONDS -lt $until ]; do
        if [ "$(status_of "$n" wsrep_local_state_comment)" = Synced ] &&
            [ "$(status_of "$n" wsrep_cluster_size)" = 3 ]; then
            return 0
        fi
        sleep 0.5
    done
    echo "cluster.sh: node $n is not Synced in a cluster of 3 after $2 s; its log:" >&2
    tail -n 30 "$dir/node$n/server.err" >&2 || true
    return 1
}

wait_gone() { # N
    local pidfile=$dir/node$1/mysqld.pid
    for _ in $(seq 1 120); do
        [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -9 "$(cat "$pidfile")" 2>/dev/null || true
}

case $cmd in
start)
    # Node 1 bootstraps: on a restart of a cluster stopped with `stop`, it stopped last.
    start_node 1 --wsrep-new-cluster
    for _ in $(seq 1 120); do [ "$(status_of 1 wsrep_ready)" = ON ] && break; sleep 0.5; done
    start_node 2
    start_node 3
    for n in 1 2 3; do wait_synced "$n" 120; done
    echo "cluster.sh: 3 nodes Synced: client ports $(port 1 0) $(port 2 0) $(port 3 0), sockets $dir/node{1,2,3}/mysql.sock"
    ;;
stop)
    for n in 3 2 1; do
        pidfile=$dir/node$n/mysqld.pid
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
        wait_gone "$n"
    done
    ;;
kill)
    n=${3:?node number}
    kill -9 "$(cat "$dir/node$n/mysqld.pid")"
    ;;
restart)
    n=${3:?node number}
    wait_gone "$n"
    start_node "$n"
    wait_synced "$n" 120
    ;;
status)
    for n in 1 2 3; do
        echo "node$n: $(status_of "$n" wsrep_local_state_comment || echo down), cluster size $(status_of "$n" wsrep_cluster_size || echo -)"
    done
    ;;
*)
    echo "usage: cluster.sh start|stop|kill|restart|status DIR" >&2
    exit 2
    ;;
esac

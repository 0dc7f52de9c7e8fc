//! The service on a 3-node MariaDB Galera cluster (started by `tests/galera/cluster.sh`):
//! three service processes, one per node, claim the same coupons for many users while one node
//! is killed with SIGKILL and rejoins. A test binary of its own, so that the cluster has the
//! machine to itself (cargo runs test binaries one after another). Needs Galera, which comes
//! with mariadb-server. The nodes run as the user running the test (as `mysql` when that is
//! root).

#[allow(dead_code)]
#[path = "it/support.rs"]
mod support;

use coupons::db;
use mysql::prelude::Queryable;
use serde_json::Value;
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::{counter_mismatches, try_request as call, unbalanced, Resp, Service, JSON, SECRET};

/// The cluster, stopped and removed when dropped.
struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = std::env::temp_dir().join(format!("coupons-galera-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cluster = Cluster { dir };
        // Each node takes four ports from here; away from other test runs on this machine and
        // below Linux's ephemeral ports (32768 on).
        let base = 20_000 + (std::process::id() % 300) * 40;
        cluster.run(&["start", &base.to_string()]);
        cluster
    }

    fn run(&self, args: &[&str]) {
        let (cmd, rest) = args.split_first().unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/galera/cluster.sh");
        let status = Command::new("bash")
            .arg(script)
            .arg(cmd)
            .arg(&self.dir)
            .args(rest)
            .status()
            .expect("running tests/galera/cluster.sh");
        assert!(status.success(), "cluster.sh {args:?} failed: see above");
    }

    /// The service's URL for node `n`: reads wait for what the cluster committed.
    fn url(&self, n: usize) -> String {
        format!(
            "mysql://root@localhost/coupons?socket={}/node{n}/mysql.sock&wsrep_sync_wait=1",
            self.dir.display()
        )
    }

    fn conn(&self, n: usize) -> mysql::Conn {
        mysql::Conn::new(db::opts_from_url(&self.url(n)).unwrap()).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/galera/cluster.sh");
        let _ = Command::new("bash")
            .args([script, "stop"])
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn(cluster: &Cluster, n: usize) -> Service {
    let svc = Service::spawn(&[
        ("DATABASE_URL", &cluster.url(n)),
        ("JWT_SECRET", SECRET),
        ("BCRYPT_COST", "4"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while call(&svc.addr, "GET", "/healthz", &[], None).map(|r| r.status) != Some(200) {
        assert!(Instant::now() < deadline, "service on node {n} never ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    svc
}

/// A claim with its idempotency key, retried with the same key while the answer is a 503 or
/// no answer (the node is down or rejoining). Returns the final answer and how many retries.
fn claim(addr: &str, token: &str, coupon: u64, key: &str) -> (Resp, usize) {
    let path = format!("/coupons/{coupon}/claim");
    let auth = format!("Bearer {token}");
    let headers = [("Authorization", auth.as_str()), ("Idempotency-Key", key)];
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut retries = 0;
    loop {
        match call(addr, "POST", &path, &headers, None) {
            Some(r) if r.status != 503 => return (r, retries),
            other => {
                let status = other.map(|r| r.status);
                assert!(
                    Instant::now() < deadline,
                    "claim {key}: still {status:?} after 180 s"
                );
                retries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// On node `n`: remaining + claims not voided == total for every coupon, the per-user counts
/// agree with the claims, and the claims of `coupon` are exactly `ids`.
fn check_node(cluster: &Cluster, n: usize, coupon: u64, ids: &HashSet<u64>) {
    let mut conn = cluster.conn(n);
    let broken = unbalanced(&mut conn);
    assert!(
        broken.is_empty(),
        "node {n}: remaining + claims != stock: {broken:?}"
    );
    let counters = counter_mismatches(&mut conn);
    assert!(
        counters.is_empty(),
        "node {n}: per-user counts: {counters:?}"
    );
    let rows: Vec<u64> = conn
        .exec("SELECT id FROM claims WHERE coupon_id = ?", (coupon,))
        .unwrap();
    let on_node: HashSet<u64> = rows.into_iter().collect();
    assert_eq!(
        &on_node, ids,
        "node {n}: the claims are not the acknowledged ones"
    );
}

#[test]
fn three_services_on_three_galera_nodes_claim_exactly_through_a_node_kill() {
    let cluster = Cluster::start();
    // The first service creates the database and applies the schema; then the others start.
    let first = spawn(&cluster, 1);
    let services = [first, spawn(&cluster, 2), spawn(&cluster, 3)];
    let addrs: Vec<&str> = services.iter().map(|s| s.addr.as_str()).collect();

    let admin = services[0].register("admin@example.com");
    cluster
        .conn(1)
        .query_drop("UPDATE users SET role = 'ADMIN' WHERE email = 'admin@example.com'")
        .unwrap();
    let create = |body: &str| -> u64 {
        let auth = format!("Bearer {admin}");
        let r = call(
            addrs[0],
            "POST",
            "/admin/coupons",
            &[JSON, ("Authorization", &auth)],
            Some(body),
        )
        .expect("no answer");
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["id"].as_u64().unwrap()
    };
    let hot = create(r#"{"code":"GHOT","available_count":300}"#);
    let limited = create(r#"{"code":"GTWO","available_count":1000,"per_user_limit":2}"#);
    let users: Vec<String> = (0..48)
        .map(|i| services[i % 3].register(&format!("g{i}@example.com")))
        .collect();

    // 48 clients, 16 on each service: 12 claims of the hot coupon (576 for 300 units) and 5 of
    // the limited one each. Node 2 is killed once a third of the answers are in; each client
    // waits for the kill after its sixth claim, so the kill always comes mid-load.
    let answered = AtomicUsize::new(0);
    let killed = std::sync::atomic::AtomicBool::new(false);
    let (results, node2_retries) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..48)
            .map(|t| {
                let (addr, token, answered, killed) = (addrs[t % 3], &users[t], &answered, &killed);
                s.spawn(move || {
                    let mut out = Vec::new();
                    let mut retries = 0;
                    for i in 0..17 {
                        while i == 6 && !killed.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        let (coupon, name) = if i < 12 {
                            (hot, "hot")
                        } else {
                            (limited, "two")
                        };
                        let (r, n) = claim(addr, token, coupon, &format!("{name}-{t}-{i}"));
                        retries += n;
                        answered.fetch_add(1, Ordering::Relaxed);
                        out.push((t, coupon, r));
                    }
                    (out, retries)
                })
            })
            .collect();
        while answered.load(Ordering::Relaxed) < 48 * 17 / 3 {
            std::thread::sleep(Duration::from_millis(20));
        }
        cluster.run(&["kill", "2"]);
        killed.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_secs(1));
        cluster.run(&["restart", "2"]);
        let mut results = Vec::new();
        let mut node2_retries = 0;
        for (t, h) in clients.into_iter().enumerate() {
            let (out, retries) = h.join().unwrap();
            results.extend(out);
            if t % 3 == 1 {
                node2_retries += retries;
            }
        }
        (results, node2_retries)
    });
    assert!(
        node2_retries > 0,
        "the kill came after node 2's clients had finished"
    );

    let code = |r: &Resp| r.body["code"].as_str().unwrap_or("").to_owned();
    let hot_won: HashSet<u64> = results
        .iter()
        .filter(|(_, c, r)| *c == hot && r.status == 201)
        .map(|(_, _, r)| r.body["claim"]["id"].as_u64().unwrap())
        .collect();
    let hot_201 = results
        .iter()
        .filter(|(_, c, r)| *c == hot && r.status == 201)
        .count();
    let sold_out = results
        .iter()
        .filter(|(_, c, r)| *c == hot && r.status == 409 && code(r) == "sold_out")
        .count();
    assert_eq!((hot_201, hot_won.len(), sold_out), (300, 300, 276));
    for t in 0..48 {
        let mine: Vec<&Resp> = results
            .iter()
            .filter(|(u, c, _)| *u == t && *c == limited)
            .map(|(_, _, r)| r)
            .collect();
        let won = mine.iter().filter(|r| r.status == 201).count();
        let refused = mine
            .iter()
            .filter(|r| r.status == 409 && code(r) == "limit_reached")
            .count();
        assert_eq!((won, refused), (2, 3), "user {t}");
    }
    let unexpected: Vec<(u16, Value)> = results
        .iter()
        .filter(|(_, _, r)| r.status != 201 && r.status != 409)
        .map(|(_, _, r)| (r.status, r.body.clone()))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    for n in 1..=3 {
        check_node(&cluster, n, hot, &hot_won);
    }

    // Read your writes across nodes: a claim through one node is in the history read at once
    // through the next.
    let ryw = create(r#"{"code":"GRYW","available_count":100}"#);
    for i in 0..30 {
        let token = &users[i];
        let (r, _) = claim(addrs[i % 3], token, ryw, &format!("ryw-{i}"));
        assert_eq!(r.status, 201, "{}", r.body);
        let id = r.body["claim"]["id"].as_u64().unwrap();
        let auth = format!("Bearer {token}");
        let h = call(
            addrs[(i + 1) % 3],
            "GET",
            "/users/me/history",
            &[("Authorization", &auth)],
            None,
        )
        .expect("no answer");
        assert_eq!(h.status, 200, "{}", h.body);
        let seen = h
            .body
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["claim_id"] == id);
        assert!(
            seen,
            "claim {id} missing from the history read through another node"
        );
    }
}

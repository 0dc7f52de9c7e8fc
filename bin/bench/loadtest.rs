//! `coupons loadtest`: a load generator for a running service (`--url`) or for one it starts
//! itself on a throwaway private database (`--embedded`). It sets itself up through the API,
//! drives keep-alive connections, each with its own user's token, and checks the invariant
//! through the API at the end.

use super::stats::{self, Record};
use coupons::auth::set_role;
use coupons::db;
use coupons::embedded::EmbeddedServer;
use coupons::{Email, Role};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

pub const USAGE: &str = "\
coupons loadtest [--url URL | --embedded] [--scenario hot|hold|codes|spread|sellout|list|login]
                 [--connections C] [--duration 10s | --requests N] [--users N] [--coupons N]
                 [--stock K] [--admin-email E --admin-password P] [--json] [--svg FILE]
                 [--coupon ID]   (hot: claim this existing coupon, e.g. one shared by several
                                  loads on several service processes; its balance is not checked)
                 [--webhook ok|slow|dead]   (--embedded: a webhook for every event, to a
                                  receiver here that answers 200 at once, after 9 s, or never)
hold: as hot, but each request holds a unit (hold_seconds 600), then confirms it; a success is
      a confirmed hold, and its latency both requests'.
codes: as hot, on a coupon of unique codes (--stock of them, default 300,000, generated
       before the run), so each claim is also given a code.";

/// How the run's webhook receiver answers each delivery.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Receiver {
    Ok,
    Slow,
    Dead,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Scenario {
    Hot,
    Hold,
    Codes,
    Spread,
    Sellout,
    List,
    Login,
}

struct Options {
    url: String,
    embedded: bool,
    scenario: Scenario,
    connections: usize,
    duration: Duration,
    requests: Option<u64>,
    users: usize,
    coupons: usize,
    stock: u64,
    admin: Option<(String, String)>,
    coupon: Option<u64>,
    json: bool,
    svg: Option<String>,
    webhook: Option<Receiver>,
}

const PASSWORD: &str = "loadtest-password";

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        url: "http://127.0.0.1:8000".into(),
        embedded: false,
        scenario: Scenario::Hot,
        connections: 8,
        duration: Duration::from_secs(10),
        requests: None,
        users: 0,
        coupons: 100,
        stock: 100,
        admin: None,
        coupon: None,
        json: false,
        svg: None,
        webhook: None,
    };
    let (mut email, mut password) = (None, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        let num = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: {v:?} is not a whole number"))
        };
        match flag.as_str() {
            "--url" => o.url = value()?,
            "--embedded" => o.embedded = true,
            "--scenario" => {
                o.scenario = match value()?.as_str() {
                    "hot" => Scenario::Hot,
                    "hold" => Scenario::Hold,
                    "codes" => Scenario::Codes,
                    "spread" => Scenario::Spread,
                    "sellout" => Scenario::Sellout,
                    "list" => Scenario::List,
                    "login" => Scenario::Login,
                    other => return Err(format!("unknown scenario {other:?}")),
                }
            }
            "--connections" => o.connections = num(value()?)?.clamp(1, 10_000) as usize,
            "--duration" => o.duration = super::duration(&value()?)?,
            "--requests" => o.requests = Some(num(value()?)?),
            "--users" => o.users = num(value()?)? as usize,
            "--coupons" => o.coupons = num(value()?)?.max(1) as usize,
            "--stock" => o.stock = num(value()?)?,
            "--coupon" => o.coupon = Some(num(value()?)?),
            "--admin-email" => email = Some(value()?),
            "--admin-password" => password = Some(value()?),
            "--json" => o.json = true,
            "--svg" => o.svg = Some(value()?),
            "--webhook" => {
                o.webhook = Some(match value()?.as_str() {
                    "ok" => Receiver::Ok,
                    "slow" => Receiver::Slow,
                    "dead" => Receiver::Dead,
                    other => return Err(format!("unknown webhook receiver {other:?}")),
                })
            }
            other => return Err(format!("unknown option {other:?}\n{USAGE}")),
        }
    }
    if o.users == 0 {
        o.users = o.connections;
    }
    if o.coupon.is_some() && o.scenario != Scenario::Hot {
        return Err("--coupon goes with --scenario hot".into());
    }
    if o.scenario == Scenario::Codes && !args.iter().any(|a| a == "--stock") {
        o.stock = 300_000;
    }
    if o.scenario == Scenario::Sellout && o.requests.is_none() {
        o.requests = Some(o.stock * 5);
    }
    if o.webhook.is_some() && !o.embedded {
        return Err("--webhook goes with --embedded".into());
    }
    o.admin = email.zip(password);
    Ok(o)
}

/// Runs the load test; `Ok(false)` when a check failed.
pub fn run(args: &[String]) -> Result<bool, String> {
    let o = parse(args)?;
    let target = if o.embedded {
        Target::embedded(o.webhook.is_some())?
    } else {
        Target::remote(&o.url)?
    };
    let addr = target.addr;
    let admin = target.admin_token(&o)?;
    let coupons = setup_coupons(addr, &admin, &o)?;
    let delivered = o
        .webhook
        .map(|mode| receive_webhooks(addr, &admin, mode))
        .transpose()?;
    let tokens = setup_users(addr, &o)?;
    eprintln!(
        "loadtest: {:?} on {} with {} connections, {} users, {} coupons",
        o.scenario,
        addr,
        o.connections,
        tokens.len(),
        coupons.len()
    );

    let server_pid = target.embedded.as_ref().map(|(child, _, _)| child.id());
    let at_rest = server_pid.and_then(memory);
    let peak = std::sync::Mutex::new(at_rest.unwrap_or_default());
    let started = Instant::now();
    let (record, per_coupon) = drive(addr, &o, &tokens, &coupons, started, || {
        if let Some(now) = server_pid.and_then(memory) {
            let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
            *p = (p.0.max(now.0), p.1.max(now.1));
        }
    });
    let elapsed = started.elapsed();
    let attempts = record.latencies_us.len() as u64;
    let mut summary = record.summary(elapsed);
    let checks = check_invariant(addr, &o, &coupons, &per_coupon, attempts, &summary)?;
    let ok = checks.iter().all(|(_, pass)| *pass);
    summary["scenario"] = json!(format!("{:?}", o.scenario).to_lowercase());
    summary["connections"] = json!(o.connections);
    summary["invariant_ok"] = json!(ok);
    if let (Some(mode), Some(delivered)) = (o.webhook, &delivered) {
        summary["webhook"] = json!(format!("{mode:?}").to_lowercase());
        summary["webhook_deliveries_received"] = json!(delivered.load(Relaxed));
    }
    if let Some((rss, threads)) = at_rest {
        let (max_rss, max_threads) = *peak.lock().unwrap_or_else(|e| e.into_inner());
        summary["server_rss_mib_at_start"] = json!((rss as f64 / 1024.0 * 10.0).round() / 10.0);
        summary["server_rss_mib_max"] = json!((max_rss as f64 / 1024.0 * 10.0).round() / 10.0);
        summary["server_threads_at_start"] = json!(threads);
        summary["server_threads_max"] = json!(max_threads);
    }
    summary["checks"] = json!(checks
        .iter()
        .map(|(c, p)| json!({"check": c, "ok": p}))
        .collect::<Vec<_>>());
    stats::print_human(
        &format!("loadtest {:?}, {} connections", o.scenario, o.connections),
        &summary,
    );
    for (check, pass) in &checks {
        eprintln!("   {} {check}", if *pass { "ok  " } else { "FAIL" });
    }
    if let Some(path) = &o.svg {
        let title = format!(
            "coupons loadtest: {:?}, {} connections",
            o.scenario, o.connections
        );
        std::fs::write(path, stats::svg(&title, &summary)).map_err(|e| format!("{path}: {e}"))?;
    }
    if o.json {
        let mut compact = summary.clone();
        compact
            .as_object_mut()
            .map(|m| m.remove("latencies_ms_histogram"));
        println!("{compact}");
    }
    drop(target);
    Ok(ok)
}

/// A service to load: one at a URL, or one this process started on a private database.
struct Target {
    addr: SocketAddr,
    embedded: Option<(Child, EmbeddedServer, String)>,
}

impl Target {
    fn remote(url: &str) -> Result<Target, String> {
        let hostport = url
            .strip_prefix("http://")
            .ok_or("--url must start with http://")?;
        let hostport = hostport.trim_end_matches('/');
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| format!("{url}: {e}"))?
            .next()
            .ok_or(format!("{url}: no address"))?;
        Ok(Target {
            addr,
            embedded: None,
        })
    }

    /// `webhooks`: let the service deliver to this machine (the run's receiver is local).
    fn embedded(webhooks: bool) -> Result<Target, String> {
        let dir = std::env::temp_dir().join(format!("coupons-loadtest-{}", std::process::id()));
        let server = EmbeddedServer::start_ephemeral(&dir).map_err(|e| e.to_string())?;
        let url = server.url("coupons");
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .env("DATABASE_URL", &url)
            .env("BIND_ADDR", "127.0.0.1:0")
            .env("JWT_SECRET", random_hex())
            .env(
                "BCRYPT_COST",
                std::env::var("BCRYPT_COST").unwrap_or_else(|_| "4".into()),
            )
            // All its users register from one address, and the login scenario fails on purpose.
            .env("REGISTRATIONS_PER_IP_PER_MIN", "0")
            .env(
                "ACCESS_LOG",
                std::env::var("ACCESS_LOG").unwrap_or_else(|_| "off".into()),
            )
            .env("LOGIN_FAILS_PER_IP_PER_MIN", "0")
            .env("LOGIN_FAILS_PER_EMAIL_PER_MIN", "0")
            .env("WEBHOOK_ALLOW_PRIVATE", if webhooks { "on" } else { "off" })
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting the service: {e}"))?;
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let addr = loop {
            let line = lines
                .next()
                .ok_or("the service exited before listening")?
                .map_err(|e| e.to_string())?;
            if let Some(a) = line.strip_prefix("coupons: listening on http://") {
                break a.parse::<SocketAddr>().map_err(|e| e.to_string())?;
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Target {
            addr,
            embedded: Some((child, server, url)),
        })
    }

    /// An admin's token: the given admin's, or one this run makes on its own database.
    fn admin_token(&self, o: &Options) -> Result<String, String> {
        if let Some((email, password)) = &o.admin {
            return login(self.addr, email, password);
        }
        let Some((_, _, url)) = &self.embedded else {
            return Err(
                "--url needs --admin-email and --admin-password (or use --embedded)".into(),
            );
        };
        let email = "loadtest-admin@example.com";
        register(self.addr, email)?;
        let pool = db::pool(
            db::opts_from_url(url).map_err(|e| e.to_string())?,
            1,
            db::CHECKOUT_TIMEOUT,
        )
        .map_err(|e| e.to_string())?;
        set_role(
            &pool,
            &Email::parse(email).map_err(|e| e.to_string())?,
            Role::Admin,
        )
        .map_err(|e| e.to_string())?;
        login(self.addr, email, PASSWORD)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some((child, _, _)) = &mut self.embedded {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

fn random_hex() -> String {
    (0..4)
        .map(|_| {
            let h = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            format!("{h:016x}")
        })
        .collect()
}

fn run_tag() -> String {
    format!("{}{}", std::process::id(), &random_hex()[..6])
}

fn register(addr: SocketAddr, email: &str) -> Result<(), String> {
    let body = json!({"email": email, "password": PASSWORD}).to_string();
    let (status, answer) = Client::new(addr)
        .call("POST", "/register", None, Some(&body))
        .map_err(|e| e.to_string())?;
    match status {
        201 | 409 => Ok(()),
        _ => Err(format!(
            "register {email}: {status} {}",
            String::from_utf8_lossy(&answer)
        )),
    }
}

fn login(addr: SocketAddr, email: &str, password: &str) -> Result<String, String> {
    let body = json!({"email": email, "password": password}).to_string();
    let (status, answer) = Client::new(addr)
        .call("POST", "/login", None, Some(&body))
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&answer).unwrap_or_default();
    match (status, v["token"].as_str()) {
        (200, Some(t)) => Ok(t.to_owned()),
        _ => Err(format!("login {email}: {status} {v}")),
    }
}

fn setup_users(addr: SocketAddr, o: &Options) -> Result<Vec<String>, String> {
    let tag = run_tag();
    let emails: Vec<String> = (0..o.users)
        .map(|i| format!("lt{tag}-{i}@example.com"))
        .collect();
    let chunks: Vec<&[String]> = emails.chunks(emails.len().div_ceil(16).max(1)).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|e| register(addr, e).and_then(|_| login(addr, e, PASSWORD)))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut tokens = Vec::new();
        for h in handles {
            tokens.extend(h.join().map_err(|_| "setup thread panicked")??);
        }
        Ok(tokens)
    })
}

fn setup_coupons(addr: SocketAddr, admin: &str, o: &Options) -> Result<Vec<u64>, String> {
    if let Some(id) = o.coupon {
        return Ok(vec![id]);
    }
    let (count, stock) = match o.scenario {
        Scenario::Hot | Scenario::Hold => (1, coupons::Stock::MAX as u64),
        // Its stock comes from its codes, added below.
        Scenario::Codes => (1, 0),
        Scenario::Spread => (o.coupons, coupons::Stock::MAX as u64),
        Scenario::Sellout => (1, o.stock),
        Scenario::List => (20, 1000),
        Scenario::Login => (0, 0),
    };
    let tag = run_tag();
    let mut client = Client::new(addr);
    (0..count)
        .map(|i| {
            let body =
                json!({"code": format!("LT{tag}-{i}"), "available_count": stock}).to_string();
            let (status, answer) = client
                .call("POST", "/admin/coupons", Some(admin), Some(&body))
                .map_err(|e| e.to_string())?;
            let v: Value = serde_json::from_slice(&answer).unwrap_or_default();
            match (status, v["id"].as_u64()) {
                (201, Some(id)) if o.scenario == Scenario::Codes => {
                    add_codes(&mut client, admin, id, o.stock, &tag)?;
                    Ok(id)
                }
                (201, Some(id)) => Ok(id),
                _ => Err(format!("creating a coupon: {status} {v}")),
            }
        })
        .collect()
}

/// Generates `n` codes for the coupon, up to 100,000 a request.
fn add_codes(client: &mut Client, admin: &str, id: u64, n: u64, tag: &str) -> Result<(), String> {
    let (started, mut requests) = (Instant::now(), 0);
    let mut left = n;
    while left > 0 {
        let count = left.min(coupons::codes::MAX_PER_REQUEST as u64);
        let body = json!({"count": count, "pattern": format!("LT{tag}-##########")}).to_string();
        let path = format!("/admin/coupons/{id}/codes");
        let (status, answer) = client
            .call("POST", &path, Some(admin), Some(&body))
            .map_err(|e| e.to_string())?;
        if status != 201 {
            let answer = String::from_utf8_lossy(&answer);
            return Err(format!("adding codes: {status} {answer}"));
        }
        left -= count;
        requests += 1;
    }
    eprintln!(
        "generated {n} codes in {:.2} s, {requests} requests",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Starts a webhook receiver on 127.0.0.1 that answers each delivery as `mode` says, and
/// subscribes it to every event. Returns the count of deliveries it has read.
fn receive_webhooks(
    addr: SocketAddr,
    admin: &str,
    mode: Receiver,
) -> Result<std::sync::Arc<AtomicU64>, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let url = format!(
        "http://{}/hook",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let count = std::sync::Arc::new(AtomicU64::new(0));
    let counted = std::sync::Arc::clone(&count);
    // Threads that end with the process: the run is bounded, and so are the service's
    // deliveries (one at a time per endpoint).
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let counted = std::sync::Arc::clone(&counted);
            std::thread::spawn(move || answer_deliveries(stream, mode, &counted));
        }
    });
    let body = json!({"url": url, "events": ["*"]}).to_string();
    let (status, answer) = Client::new(addr)
        .call("POST", "/admin/webhooks", Some(admin), Some(&body))
        .map_err(|e| e.to_string())?;
    if status != 201 {
        let answer = String::from_utf8_lossy(&answer);
        return Err(format!("creating the webhook: {status} {answer}"));
    }
    Ok(count)
}

/// Reads deliveries on one connection (keep-alive) and answers each: 200 at once, 200 after
/// 9 s (inside the service's 10 s), or never.
fn answer_deliveries(stream: TcpStream, mode: Receiver, count: &AtomicU64) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line.trim_end().is_empty() => break,
                Ok(_) => {
                    if let Some((k, v)) = line.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        count.fetch_add(1, Relaxed);
        match mode {
            Receiver::Ok => {}
            Receiver::Slow => std::thread::sleep(Duration::from_secs(9)),
            // Holds the connection until the service gives up on it.
            Receiver::Dead => {
                let _ = reader.read(&mut [0; 1]);
                return;
            }
        }
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        if reader.get_mut().write_all(ok).is_err() {
            return;
        }
    }
}

/// The server's resident memory (KiB) and thread count, from /proc.
fn memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((field("VmRSS:")?, field("Threads:")?))
}

/// Runs the load: one thread per connection, until the duration or the request budget ends.
/// `sample` is called about every 200 ms while it runs.
fn drive(
    addr: SocketAddr,
    o: &Options,
    tokens: &[String],
    coupons: &[u64],
    started: Instant,
    sample: impl Fn() + Sync,
) -> (Record, HashMap<u64, u64>) {
    let sent = AtomicU64::new(0);
    let (done_requests, done_ok, done_err) =
        (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let finished = AtomicBool::new(false);
    let deadline = started
        + if o.requests.is_some() {
            Duration::from_secs(3600)
        } else {
            o.duration
        };
    std::thread::scope(|s| {
        let progress = s.spawn(|| {
            let terminal = std::io::stderr().is_terminal();
            let mut last = (0u64, Instant::now());
            while !finished.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                sample();
                if last.1.elapsed() < Duration::from_secs(1) && !finished.load(Relaxed) {
                    continue;
                }
                let n = done_requests.load(Relaxed);
                let rate = (n - last.0) as f64 / last.1.elapsed().as_secs_f64();
                last = (n, Instant::now());
                let line = format!(
                    "  {:5.1}s  requests {n}  successes {}  errors {}  {rate:.0} req/s",
                    started.elapsed().as_secs_f64(),
                    done_ok.load(Relaxed),
                    done_err.load(Relaxed)
                );
                if terminal {
                    eprint!("\r{line}   ");
                } else {
                    eprintln!("{line}");
                }
            }
            if terminal {
                eprintln!();
            }
        });
        let workers: Vec<_> = (0..o.connections)
            .map(|i| {
                let (sent, done_requests, done_ok, done_err) =
                    (&sent, &done_requests, &done_ok, &done_err);
                s.spawn(move || {
                    let mut client = Client::new(addr);
                    let token = tokens[i % tokens.len()].as_str();
                    let email_body =
                        json!({"email": "nobody-loadtest@example.com", "password": PASSWORD})
                            .to_string();
                    let mut record = Record::default();
                    let mut mine: HashMap<u64, u64> = HashMap::new();
                    let mut rng = 0x9E37_79B9_7F4A_7C15u64
                        ^ (i as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    loop {
                        if Instant::now() >= deadline
                            || o.requests.is_some_and(|n| sent.fetch_add(1, Relaxed) >= n)
                        {
                            break;
                        }
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let coupon = coupons
                            .get(rng as usize % coupons.len().max(1))
                            .copied()
                            .unwrap_or(0);
                        let path = format!("/coupons/{coupon}/claim");
                        let t = Instant::now();
                        let (result, want) = match o.scenario {
                            Scenario::Hot
                            | Scenario::Codes
                            | Scenario::Spread
                            | Scenario::Sellout => {
                                (client.call("POST", &path, Some(token), None), 201)
                            }
                            Scenario::Hold => (hold_and_confirm(&mut client, &path, token), 201),
                            Scenario::List => (client.call("GET", "/coupons", None, None), 200),
                            // A wrong password for an unknown email: a full bcrypt verify each time.
                            Scenario::Login => {
                                (client.call("POST", "/login", None, Some(&email_body)), 401)
                            }
                        };
                        let status = result.map_or(0, |(s, _)| s);
                        let ok = status == want;
                        if ok && want == 201 {
                            *mine.entry(coupon).or_default() += 1;
                        }
                        record.add(status, ok, t.elapsed(), started.elapsed());
                        done_requests.fetch_add(1, Relaxed);
                        if ok {
                            done_ok.fetch_add(1, Relaxed);
                        }
                        if status == 0 || status >= 500 {
                            done_err.fetch_add(1, Relaxed);
                        }
                    }
                    (record, mine)
                })
            })
            .collect();
        let mut total = Record::default();
        let mut per_coupon: HashMap<u64, u64> = HashMap::new();
        for w in workers {
            let (r, mine) = w.join().unwrap_or_default();
            total = total.merge(r);
            for (c, n) in mine {
                *per_coupon.entry(c).or_default() += n;
            }
        }
        finished.store(true, Relaxed);
        let _ = progress.join();
        (total, per_coupon)
    })
}

/// Through the API: remaining + successes == stock for each coupon of the run, the sell-out
/// count exact, and no 5xx or broken connection.
fn check_invariant(
    addr: SocketAddr,
    o: &Options,
    coupons: &[u64],
    per_coupon: &HashMap<u64, u64>,
    attempts: u64,
    summary: &Value,
) -> Result<Vec<(String, bool)>, String> {
    let mut checks = vec![(
        "no 5xx and no connection errors".to_owned(),
        summary["errors"] == 0,
    )];
    // A shared coupon's balance includes other loads' claims: the caller checks it.
    if matches!(o.scenario, Scenario::List | Scenario::Login) || o.coupon.is_some() {
        return Ok(checks);
    }
    // Every page of the listing: a run's coupons may not fit on one.
    let mut listed: Vec<Value> = Vec::new();
    let mut client = Client::new(addr);
    loop {
        let after = listed.last().and_then(|c| c["id"].as_u64()).unwrap_or(0);
        let (status, body) = client
            .call(
                "GET",
                &format!("/coupons?limit=1000&after={after}"),
                None,
                None,
            )
            .map_err(|e| e.to_string())?;
        let page: Vec<Value> =
            serde_json::from_slice(&body).map_err(|_| format!("GET /coupons: {status}"))?;
        let full = page.len() == 1000;
        listed.extend(page);
        if !full {
            break;
        }
    }
    let mut balanced = true;
    for id in coupons {
        let c = listed.iter().find(|c| c["id"].as_u64() == Some(*id));
        let claimed = per_coupon.get(id).copied().unwrap_or(0);
        balanced &= c.is_some_and(|c| {
            c["available_count"].as_u64().unwrap_or(0) + claimed
                == c["total_count"].as_u64().unwrap_or(u64::MAX)
        });
    }
    checks.push((
        "remaining + successful claims == stock, for every coupon".to_owned(),
        balanced,
    ));
    if o.scenario == Scenario::Sellout {
        let won: u64 = per_coupon.values().sum();
        checks.push((
            format!(
                "sell-out: exactly min(stock {}, attempts {attempts}) = {} successes, got {won}",
                o.stock,
                o.stock.min(attempts)
            ),
            won == o.stock.min(attempts),
        ));
    }
    Ok(checks)
}

/// A keep-alive HTTP/1.1 client, just enough for this service.
struct Client {
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
}

/// Holds a unit with `path`, then confirms the hold: the confirm's status (201 for the pair,
/// to count like a claim), or the hold's when it failed.
fn hold_and_confirm(
    client: &mut Client,
    path: &str,
    token: &str,
) -> std::io::Result<(u16, Vec<u8>)> {
    let (status, answer) =
        client.call("POST", path, Some(token), Some(r#"{"hold_seconds":600}"#))?;
    // Only the id, not a whole `Value`: the load generator shares the machine it measures.
    #[derive(serde::Deserialize)]
    struct Held {
        claim: HeldClaim,
    }
    #[derive(serde::Deserialize)]
    struct HeldClaim {
        id: u64,
    }
    let id = serde_json::from_slice::<Held>(&answer)
        .ok()
        .map(|h| h.claim.id);
    let (Some(id), 201) = (id, status) else {
        return Ok((status, answer));
    };
    let (status, answer) =
        client.call("POST", &format!("/claims/{id}/confirm"), Some(token), None)?;
    Ok((if status == 200 { 201 } else { status }, answer))
}

impl Client {
    fn new(addr: SocketAddr) -> Client {
        Client { addr, stream: None }
    }

    fn call(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let result = self.try_call(method, path, token, body);
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    fn try_call(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            self.stream = Some(BufReader::new(s));
        }
        let reader = self.stream.as_mut().expect("connected above");
        let body = body.unwrap_or("");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        head.push_str("\r\n");
        head.push_str(body);
        reader.get_mut().write_all(head.as_bytes())?;
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no status line"))?;
        let (mut length, mut close) = (0usize, false);
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(bad("connection closed in the headers"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().map_err(|_| bad("bad content-length"))?;
                } else if k.eq_ignore_ascii_case("connection")
                    && v.trim().eq_ignore_ascii_case("close")
                {
                    close = true;
                }
            }
        }
        let mut answer = vec![0; length];
        reader.read_exact(&mut answer)?;
        if close {
            self.stream = None;
        }
        Ok((status, answer))
    }
}

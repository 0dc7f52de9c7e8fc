//! `coupons bench-suite`: every figure of BENCHMARKS.md with one command. It runs `loadtest
//! --embedded` and `bench-db` (this same binary) round by round, interleaved so that both see
//! the same machine, then writes the raw results, Markdown tables of medians and SVG charts.

use super::stats;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub const USAGE: &str =
    "coupons bench-suite [--rounds N] [--duration 8s] [--connections 1,8,64,256] [--out DIR]";

struct Options {
    rounds: usize,
    duration: String,
    connections: Vec<usize>,
    out: PathBuf,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        rounds: 3,
        duration: "8".into(),
        connections: vec![1, 8, 64, 256],
        out: PathBuf::from("."),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = || format!("{flag}: {value:?} is not valid");
        match flag.as_str() {
            "--rounds" => o.rounds = value.parse().map_err(|_| bad())?,
            "--duration" => {
                // Checked here, handed on as written: loadtest and bench-db read it alike.
                super::duration(value)?;
                o.duration = value.clone();
            }
            "--connections" => {
                o.connections = value
                    .split(',')
                    .map(|c| c.trim().parse())
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad())?
            }
            "--out" => o.out = PathBuf::from(value),
            _ => return Err(format!("unknown option {flag:?}\n{USAGE}")),
        }
    }
    Ok(o)
}

/// Runs this binary with `args` (and `env`) and returns the JSON summary on its last line,
/// tagged with what was run.
fn measure(kind: &str, args: &[&str], env: &[(&str, &str)], round: usize) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    eprintln!("bench-suite: round {round}: {kind} {}", args.join(" "));
    let out = Command::new(exe)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut v: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| {
            format!(
                "{kind} {}: no summary\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    v["kind"] = json!(kind);
    let batching = env.iter().find(|(k, _)| *k == "CLAIM_BATCHING");
    v["batching"] = json!(batching.map_or("on", |(_, v)| *v));
    v["round"] = json!(round);
    v["exit_ok"] = json!(out.status.success());
    v["env"] = json!(env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" "));
    Ok(v)
}

/// The claim scenarios, each with claim combining on and off (`CLAIM_BATCHING`).
const SCENARIOS: [&str; 2] = ["hot", "spread"];
const MODES: [&str; 2] = ["on", "off"];

pub fn run(args: &[String]) -> Result<bool, String> {
    let o = parse(args)?;
    std::fs::create_dir_all(&o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
    let d = o.duration.as_str();
    let started = Instant::now();
    let mut rows = Vec::new();
    for round in 1..=o.rounds {
        for (scenario, batching) in SCENARIOS.iter().flat_map(|s| MODES.map(|m| (*s, m))) {
            let env = [("CLAIM_BATCHING", batching)];
            for c in &o.connections {
                let c = c.to_string();
                rows.push(measure(
                    "http",
                    &[
                        "loadtest",
                        "--embedded",
                        "--scenario",
                        scenario,
                        "--connections",
                        &c,
                        "--duration",
                        d,
                        "--coupons",
                        "1000",
                        "--json",
                    ],
                    &env,
                    round,
                )?);
                rows.push(measure(
                    "bench-db",
                    &[
                        "bench-db",
                        "--scenario",
                        scenario,
                        "--threads",
                        &c,
                        "--duration",
                        d,
                        "--coupons",
                        "1000",
                        "--json",
                    ],
                    &env,
                    round,
                )?);
            }
        }
        rows.push(measure(
            "http",
            &[
                "loadtest",
                "--embedded",
                "--scenario",
                "sellout",
                "--connections",
                "64",
                "--stock",
                "2000",
                "--json",
            ],
            &[],
            round,
        )?);
        rows.push(measure(
            "http",
            &[
                "loadtest",
                "--embedded",
                "--scenario",
                "list",
                "--connections",
                "64",
                "--duration",
                d,
                "--json",
            ],
            &[],
            round,
        )?);
        rows.push(measure(
            "http",
            &[
                "loadtest",
                "--embedded",
                "--scenario",
                "login",
                "--connections",
                "8",
                "--duration",
                d,
                "--json",
            ],
            &[("BCRYPT_COST", "12")],
            round,
        )?);
        let mut mem = measure(
            "http",
            &[
                "loadtest",
                "--embedded",
                "--scenario",
                "hot",
                "--connections",
                "1000",
                "--duration",
                d,
                "--json",
            ],
            &[],
            round,
        )?;
        mem["scenario"] = json!("memory");
        rows.push(mem);
    }
    let hash_ms = bcrypt_ms(12);
    let raw: String = rows.iter().map(|r| format!("{r}\n")).collect();
    write(&o.out.join("bench-raw.jsonl"), &raw)?;
    let tables = tables(&rows, &o.connections, hash_ms, started.elapsed().as_secs());
    write(&o.out.join("bench-tables.md"), &tables)?;
    charts(&rows, &o.connections, &o.out)?;
    print!("{tables}");
    Ok(rows
        .iter()
        .all(|r| r["exit_ok"] == true && r["invariant_ok"] == true))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The median of one field over the rounds of one cell. `kind` is `http` or `bench-db`, with
/// `/off` for runs with claim combining off.
fn median(rows: &[Value], kind: &str, scenario: &str, c: Option<usize>, field: &str) -> f64 {
    let (kind, batching) = kind.split_once('/').unwrap_or((kind, "on"));
    let mut v: Vec<f64> = rows
        .iter()
        .filter(|r| r["kind"] == kind && r["scenario"] == scenario && r["batching"] == batching)
        .filter(|r| {
            c.is_none_or(|c| r["connections"].as_u64().or(r["threads"].as_u64()) == Some(c as u64))
        })
        .filter_map(|r| r[field].as_f64())
        .collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One bcrypt hash at `cost`, median of three, in milliseconds.
fn bcrypt_ms(cost: u32) -> f64 {
    let mut t: Vec<f64> = (0..3)
        .map(|_| {
            let s = Instant::now();
            let _ = bcrypt::hash("benchmark-password", cost);
            s.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[1]
}

fn tables(rows: &[Value], conns: &[usize], hash_ms: f64, secs: u64) -> String {
    let rounds = rows
        .iter()
        .filter_map(|r| r["round"].as_u64())
        .max()
        .unwrap_or(0);
    let mut t = format!("Medians of {rounds} rounds ({secs} s in all).\n\n");
    t += "Claim combining (`CLAIM_BATCHING`), over HTTP:\n\n";
    t += "| scenario | connections | claims/s on | claims/s off | on / off | p50 ms on | p50 ms off | p99 ms on | p99 ms off | errors on, off |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for scenario in SCENARIOS {
        for c in conns {
            let m = |kind: &str, f: &str| median(rows, kind, scenario, Some(*c), f);
            let (on, off) = (m("http", "claims_per_sec"), m("http/off", "claims_per_sec"));
            t += &format!(
                "| {scenario} | {c} | {on:.0} | {off:.0} | {:.2}x | {:.2} | {:.2} | {:.2} | {:.2} | {:.0}, {:.0} |\n",
                on / off,
                m("http", "p50_ms"),
                m("http/off", "p50_ms"),
                m("http", "p99_ms"),
                m("http/off", "p99_ms"),
                m("http", "errors"),
                m("http/off", "errors"),
            );
        }
    }
    t += "\nHTTP against the library alone (`bench-db`, same combining setting):\n\n";
    t += "| scenario | connections | combining | HTTP claims/s | bench-db claims/s | HTTP / bench-db | HTTP p99 ms | bench-db p99 ms | HTTP max ms |\n|---|---|---|---|---|---|---|---|---|\n";
    for scenario in SCENARIOS {
        for c in conns {
            for (mode, suffix) in [("on", ""), ("off", "/off")] {
                let m = |kind: &str, f: &str| {
                    median(rows, &format!("{kind}{suffix}"), scenario, Some(*c), f)
                };
                let (http, db) = (m("http", "claims_per_sec"), m("bench-db", "claims_per_sec"));
                t += &format!(
                    "| {scenario} | {c} | {mode} | {http:.0} | {db:.0} | {:.0}% | {:.2} | {:.2} | {:.1} |\n",
                    http / db * 100.0,
                    m("http", "p99_ms"),
                    m("bench-db", "p99_ms"),
                    m("http", "max_ms"),
                );
            }
        }
    }
    let m = |scenario: &str, f: &str| median(rows, "http", scenario, None, f);
    t += "\n| scenario | connections | per second | p50 ms | p99 ms | max ms | errors | checks |\n|---|---|---|---|---|---|---|---|\n";
    for (scenario, c, what) in [
        ("sellout", 64, "claims_per_sec"),
        ("list", 64, "requests_per_sec"),
        ("login", 8, "requests_per_sec"),
    ] {
        let ok = rows
            .iter()
            .filter(|r| r["scenario"] == scenario)
            .all(|r| r["invariant_ok"] == true);
        t += &format!(
            "| {scenario} | {c} | {:.0} | {:.2} | {:.2} | {:.1} | {:.0} | {} |\n",
            m(scenario, what),
            m(scenario, "p50_ms"),
            m(scenario, "p99_ms"),
            m(scenario, "max_ms"),
            m(scenario, "errors"),
            if ok { "all passed" } else { "FAILED" },
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let capacity = cores * 1000.0 / hash_ms;
    t += &format!(
        "\nLogin at bcrypt cost 12: one hash takes {hash_ms:.0} ms here, so {cores:.0} cores can hash {capacity:.1}/s; \
         the service answered {:.1} logins/s, {:.0}% of that.\n",
        m("login", "requests_per_sec"),
        m("login", "requests_per_sec") / capacity * 100.0
    );
    t += &format!(
        "\nServer memory: {:.1} MiB RSS and {:.0} threads at rest; at most {:.1} MiB and {:.0} threads with 1,000 open connections claiming ({:.0} claims/s, p99 {:.1} ms).\n",
        m("memory", "server_rss_mib_at_start"),
        m("memory", "server_threads_at_start"),
        m("memory", "server_rss_mib_max"),
        m("memory", "server_threads_max"),
        m("memory", "claims_per_sec"),
        m("memory", "p99_ms"),
    );
    t
}

fn charts(rows: &[Value], conns: &[usize], out: &Path) -> Result<(), String> {
    for (field, file, title, unit) in [
        (
            "claims_per_sec",
            "bench-claims.svg",
            "Claims per second: HTTP service vs the library alone (bench-db)",
            "claims/s",
        ),
        (
            "p99_ms",
            "bench-p99.svg",
            "p99 latency: HTTP service vs the library alone (bench-db)",
            "ms",
        ),
    ] {
        let groups: Vec<(String, Vec<f64>)> = SCENARIOS
            .iter()
            .flat_map(|s| conns.iter().map(move |c| (*s, *c)))
            .map(|(s, c)| {
                let kinds = ["http", "http/off", "bench-db", "bench-db/off"];
                let cell = kinds.map(|k| median(rows, k, s, Some(c), field));
                (format!("{s} x{c}"), cell.to_vec())
            })
            .collect();
        let svg = stats::grouped_bars(
            title,
            unit,
            &[
                "HTTP, combining on",
                "HTTP, combining off",
                "library alone (bench-db), on",
                "bench-db, off",
            ],
            &groups,
        );
        write(&out.join(file), &svg)?;
    }
    Ok(())
}

//! What the load generator and `bench-db` measure: latencies, statuses, a rate per second, and
//! the summary both print.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// One thread's record of a run; merged at the end.
#[derive(Default)]
pub struct Record {
    /// Latency of every request, in microseconds.
    pub latencies_us: Vec<u32>,
    /// Answers by status (0 for a connection error).
    pub statuses: BTreeMap<u16, u64>,
    /// Successes per whole second since the start.
    pub successes_per_sec: Vec<u64>,
}

impl Record {
    pub fn add(&mut self, status: u16, success: bool, latency: Duration, since_start: Duration) {
        self.latencies_us
            .push(latency.as_micros().min(u32::MAX as u128) as u32);
        *self.statuses.entry(status).or_default() += 1;
        if success {
            let sec = since_start.as_secs() as usize;
            if self.successes_per_sec.len() <= sec {
                self.successes_per_sec.resize(sec + 1, 0);
            }
            self.successes_per_sec[sec] += 1;
        }
    }

    pub fn merge(mut self, other: Record) -> Record {
        self.latencies_us.extend(other.latencies_us);
        for (s, n) in other.statuses {
            *self.statuses.entry(s).or_default() += n;
        }
        if self.successes_per_sec.len() < other.successes_per_sec.len() {
            self.successes_per_sec
                .resize(other.successes_per_sec.len(), 0);
        }
        for (i, n) in other.successes_per_sec.into_iter().enumerate() {
            self.successes_per_sec[i] += n;
        }
        self
    }

    pub fn successes(&self) -> u64 {
        self.successes_per_sec.iter().sum()
    }

    /// The summary as JSON; `invariant_ok` is filled in by the caller.
    pub fn summary(mut self, elapsed: Duration) -> Value {
        self.latencies_us.sort_unstable();
        let pct = |p: f64| -> f64 {
            let l = &self.latencies_us;
            if l.is_empty() {
                return 0.0;
            }
            let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
            f64::from(l[i]) / 1000.0
        };
        let secs = elapsed.as_secs_f64().max(1e-9);
        let requests = self.latencies_us.len() as f64;
        let errors = self.statuses.get(&0).copied().unwrap_or(0)
            + self
                .statuses
                .iter()
                .filter(|(s, _)| **s >= 500)
                .map(|(_, n)| n)
                .sum::<u64>();
        let round = |x: f64| (x * 100.0).round() / 100.0;
        json!({
            "elapsed_s": round(secs),
            "requests": requests as u64,
            "successes": self.successes(),
            "claims_per_sec": round(self.successes() as f64 / secs),
            "requests_per_sec": round(requests / secs),
            "p50_ms": round(pct(0.50)),
            "p90_ms": round(pct(0.90)),
            "p99_ms": round(pct(0.99)),
            "max_ms": round(pct(1.0)),
            "status_counts": self.statuses.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "errors": errors,
            "successes_per_sec": self.successes_per_sec,
            "latencies_ms_histogram": histogram(&self.latencies_us),
        })
    }
}

/// Counts of latencies in buckets that double: [0,0.25), [0.25,0.5), ... ms.
fn histogram(sorted_us: &[u32]) -> Vec<(f64, u64)> {
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    let mut upper_us = 250u64;
    let mut i = 0;
    while i < sorted_us.len() {
        let n = sorted_us[i..]
            .iter()
            .take_while(|l| u64::from(**l) < upper_us)
            .count();
        buckets.push((upper_us as f64 / 1000.0, n as u64));
        i += n;
        upper_us *= 2;
    }
    buckets
}

/// The summary for people, one line per figure.
pub fn print_human(title: &str, s: &Value) {
    eprintln!("== {title}");
    eprintln!(
        "   {} requests in {} s: {} successes/s, {} requests/s",
        s["requests"], s["elapsed_s"], s["claims_per_sec"], s["requests_per_sec"]
    );
    eprintln!(
        "   latency ms: p50 {}  p90 {}  p99 {}  max {}",
        s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"]
    );
    eprintln!(
        "   statuses: {}   errors: {}",
        s["status_counts"], s["errors"]
    );
}

/// A two-panel SVG: successes per second over time, and the latency distribution.
pub fn svg(title: &str, s: &Value) -> String {
    let per_sec: Vec<f64> = s["successes_per_sec"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let hist: Vec<(f64, f64)> = s["latencies_ms_histogram"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| Some((b[0].as_f64()?, b[1].as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="900" height="340" font-family="sans-serif" font-size="12">
<rect width="900" height="340" fill="white"/>
<text x="450" y="20" text-anchor="middle" font-size="15">{}</text>
"#,
        escape(title)
    );
    out += &bars(
        40.0,
        "successful claims per second",
        &per_sec
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("{}", i + 1), *v))
            .collect::<Vec<_>>(),
        "second",
    );
    out += &bars(
        480.0,
        "latency distribution (requests)",
        &hist
            .iter()
            .map(|(ms, n)| (format!("<{ms}"), *n))
            .collect::<Vec<_>>(),
        "ms",
    );
    out + "</svg>\n"
}

/// A bar chart panel 400 x 260 at (x, 40).
pub fn bars(x: f64, title: &str, data: &[(String, f64)], unit: &str) -> String {
    let (w, h, top) = (380.0, 220.0, 60.0);
    let max = data.iter().map(|d| d.1).fold(0.0, f64::max).max(1.0);
    let bw = w / data.len().max(1) as f64;
    let mut out = format!(
        r#"<text x="{cx}" y="45" text-anchor="middle">{t}</text>
<line x1="{x}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<text x="{x}" y="{ty}" font-size="10">max {max:.0}</text>
<text x="{cx}" y="{ly}" text-anchor="middle" font-size="10">{unit}</text>
"#,
        cx = x + w / 2.0,
        t = escape(title),
        b = top + h,
        r = x + w,
        ty = top - 3.0,
        ly = top + h + 28.0,
    );
    let label_every = data.len().div_ceil(10).max(1);
    for (i, (label, v)) in data.iter().enumerate() {
        let bh = v / max * h;
        let bx = x + i as f64 * bw;
        out += &format!(
            "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#4477aa\"><title>{} {}: {v}</title></rect>\n",
            top + h - bh,
            (bw - 1.0).max(0.5),
            escape(label),
            unit,
        );
        if i % label_every == 0 {
            out += &format!(
                "<text x=\"{:.1}\" y=\"{}\" font-size=\"9\" text-anchor=\"middle\">{}</text>\n",
                bx + bw / 2.0,
                top + h + 12.0,
                escape(label)
            );
        }
    }
    out
}

/// A grouped bar chart: one group per label, one bar per series, in a 900 x 360 SVG.
pub fn grouped_bars(
    title: &str,
    unit: &str,
    series: &[&str],
    groups: &[(String, Vec<f64>)],
) -> String {
    const COLORS: [&str; 4] = ["#4477aa", "#ee6677", "#228833", "#ccbb44"];
    let (x0, top, w, h) = (70.0, 50.0, 800.0, 240.0);
    let max = groups
        .iter()
        .flat_map(|g| g.1.iter().copied())
        .fold(0.0, f64::max)
        .max(1e-9);
    let gw = w / groups.len().max(1) as f64;
    let bw = (gw * 0.8) / series.len().max(1) as f64;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="900" height="360" font-family="sans-serif" font-size="12">
<rect width="900" height="360" fill="white"/>
<text x="450" y="22" text-anchor="middle" font-size="15">{}</text>
<line x1="{x0}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<line x1="{x0}" y1="{top}" x2="{x0}" y2="{b}" stroke="black"/>
<text x="{lx}" y="{top}" text-anchor="end" font-size="10">{max:.0}</text>
<text x="{lx}" y="{b}" text-anchor="end" font-size="10">0</text>
<text x="20" y="{my}" font-size="11" transform="rotate(-90 20 {my})" text-anchor="middle">{}</text>
"#,
        escape(title),
        escape(unit),
        b = top + h,
        r = x0 + w,
        lx = x0 - 4.0,
        my = top + h / 2.0,
    );
    for (gi, (label, values)) in groups.iter().enumerate() {
        let gx = x0 + gi as f64 * gw + gw * 0.1;
        for (si, v) in values.iter().enumerate() {
            let bh = v / max * h;
            out += &format!(
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{} {}: {v:.1}</title></rect>\n<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{v:.0}</text>\n",
                gx + si as f64 * bw,
                top + h - bh,
                bw - 2.0,
                COLORS[si % COLORS.len()],
                escape(label),
                escape(series.get(si).copied().unwrap_or("")),
                gx + si as f64 * bw + bw / 2.0,
                top + h - bh - 3.0,
            );
        }
        out += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" font-size=\"11\">{}</text>\n",
            gx + gw * 0.4,
            top + h + 16.0,
            escape(label)
        );
    }
    for (si, name) in series.iter().enumerate() {
        let lx = x0 + 10.0 + si as f64 * 220.0;
        out += &format!(
            "<rect x=\"{lx}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>\n",
            COLORS[si % COLORS.len()],
            lx + 16.0,
            top + h + 46.0,
            escape(name),
            y = top + h + 36.0,
        );
    }
    out + "</svg>\n"
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

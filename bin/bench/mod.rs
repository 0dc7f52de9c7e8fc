//! The benchmark tooling, behind subcommands of the same binary: `loadtest` drives a service
//! over HTTP, `bench-db` calls the library's claim with no HTTP, `bench-suite` runs both for
//! BENCHMARKS.md. They share the measurements in `stats`.

pub mod benchdb;
pub mod loadtest;
mod stats;
pub mod suite;

use std::time::Duration;

/// A `--duration`: a number with a unit, `ms`, `s`, `m` or `h` (`500ms`, `15s`, `2m`, `1.5h`),
/// or a bare number of seconds, as wrk and hey take it. More than zero.
pub fn duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("--duration: {text:?} is not a duration (e.g. 30, 15s, 500ms, 2m, 1h)");
    let text = text.trim();
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    // Digits and one point only: `f64::from_str` also takes `inf`, `NaN`, `1e3` and signs.
    if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    let number: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(bad()),
    };
    match Duration::try_from_secs_f64(seconds) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(text: &str, expected: Option<f64>) {
        let got = duration(text).ok().map(|d| d.as_secs_f64());
        assert_eq!(got, expected, "{text:?}");
    }

    #[test]
    fn durations_take_units_or_seconds() {
        check("15", Some(15.0));
        check("15s", Some(15.0));
        check("2.5", Some(2.5));
        check("500ms", Some(0.5));
        check("2m", Some(120.0));
        check("1.5h", Some(5400.0));
        check(" 3s ", Some(3.0));
        for bad in [
            "", "s", "0", "0s", "-1", "+1", "1e3", "inf", "NaN", "1d", "1 s", "1S", "1.2.3", "2mm",
            "ms5",
        ] {
            check(bad, None);
        }
    }
}

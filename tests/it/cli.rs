//! The command line: every command's `--help`, `--version`, durations with units.

use crate::support::coupons_command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = coupons_command(&[]).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `COMMAND --help` prints that command's usage to stdout and exits 0, without starting
/// anything (no database, no load); an unknown command's is still an error.
#[test]
fn every_command_has_its_help_and_the_binary_its_version() {
    for (args, expected) in [
        (&["serve", "--help"][..], "coupons [serve]"),
        (&["migrate", "--help"], "coupons migrate"),
        (&["admin", "--help"], "admin promote EMAIL"),
        (&["admin", "promote", "-h"], "admin promote EMAIL"),
        (&["loadtest", "--help"], "coupons loadtest"),
        (&["loadtest", "--scenario", "hot", "--help"], "--scenario"),
        (&["bench-db", "--help"], "coupons bench-db"),
        (&["bench-suite", "-h"], "coupons bench-suite"),
    ] {
        let (code, out, err) = run(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.contains(expected), "{args:?}: {out}");
    }
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("coupons {}", env!("CARGO_PKG_VERSION")));
    let (code, out, err) = run(&["frobnicate", "--help"]);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
}

/// A duration with a unit is taken; a bad one is refused before anything starts, naming it.
#[test]
fn durations_take_units_and_a_bad_one_is_named() {
    for bad in ["5x", "0s", "-1", "1e3"] {
        for command in ["loadtest", "bench-db", "bench-suite"] {
            let (code, _, err) = run(&[command, "--duration", bad]);
            assert_eq!(code, 2, "{command} {bad}: {err}");
            assert!(err.contains("--duration") && err.contains(bad), "{err}");
        }
    }
    // Nothing listens on port 1: a good duration gets as far as connecting.
    let (code, _, err) = run(&[
        "loadtest",
        "--url",
        "http://127.0.0.1:1",
        "--duration",
        "1s",
    ]);
    assert_ne!(code, 0);
    assert!(!err.contains("--duration"), "{err}");
}

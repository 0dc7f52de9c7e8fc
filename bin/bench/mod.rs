//! The benchmark tooling, behind subcommands of the same binary: `loadtest` drives a service
//! over HTTP, `bench-db` calls the library's claim with no HTTP, `bench-suite` runs both for
//! BENCHMARKS.md. They share the measurements in `stats`.

pub mod benchdb;
pub mod loadtest;
mod stats;
pub mod suite;

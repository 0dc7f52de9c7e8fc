//! One integration-test binary (see README, "Tests"). Every test gets a fresh database on one
//! private MariaDB started for this binary, or on `TEST_DATABASE_URL` where set.

mod cli;
mod codes;
mod combine;
mod console;
mod embedded;
mod events;
mod faults;
mod http;
mod library;
mod life;
mod openapi;
mod support;

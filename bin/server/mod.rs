//! The HTTP server: the configuration, tiny_http plumbing and threads (`http`), the route table
//! and its handlers (`routes`), the one error-to-HTTP mapping (`error`), brute-force limits,
//! metrics and the OpenAPI document. No SQL: handlers call the library.

pub mod config;
mod error;
pub mod http;
pub mod limits;
pub mod metrics;
mod openapi;
mod routes;

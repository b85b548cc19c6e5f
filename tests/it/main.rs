//! Integration tests against a real PostgreSQL (see README: running the
//! tests). Each test has a database of its own, so they run in parallel.

mod api;
mod client;
mod command;
mod config;
mod engine;
mod features;
mod handover;
mod listener;
mod policies;
mod runway;
mod schema;
mod shutdown;
mod support;
mod waiting;
mod webhook;

//! Handlers that ship with the binary.

pub mod readme;

//! blockd

pub mod config;

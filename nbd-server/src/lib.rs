//! nbd-server (work in progress): pooled buffers first.
pub mod buf;

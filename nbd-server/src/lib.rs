//! nbd-server

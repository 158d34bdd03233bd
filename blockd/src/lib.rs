//! blockd

pub mod storage;

// Shared helpers for integration tests. Each test crate only uses part of them.
#![allow(dead_code)]

pub mod bins;
pub mod frontend;
pub mod hostile;
pub mod pipewire;
pub mod realtime;
pub mod vsound;

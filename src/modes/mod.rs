//! The modes: each a thin loop around the one job lifecycle (`crate::lifecycle`).

pub mod bench;
pub mod collect;
pub mod run;
pub mod serve;
pub mod submit;
pub mod worker;

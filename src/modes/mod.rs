//! The modes: the batch modes (`run`, `worker`, `submit`, `collect`, `serve`) are each a thin
//! loop around the one job lifecycle (`crate::lifecycle`), and `rotate` a batch of them (a
//! rotation's successors); the others (`describe`, `delete`,
//! `reconcile`, `status`, `bench`) read or tidy what the lifecycle made, or measure it.

pub mod bench;
pub mod collect;
pub mod delete;
pub mod describe;
pub mod reconcile;
pub mod rotate;
pub mod run;
pub mod serve;
pub mod status;
pub mod submit;
pub mod worker;

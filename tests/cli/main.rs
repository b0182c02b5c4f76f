//! The `keyfleet` command line and embedded runs (`keyfleet::modes::run` in this process, or the
//! binary in a sandbox folder): batches, crashes, key files, hostile input, damaged state files,
//! and the deployment files.

#[path = "../util/mod.rs"]
mod util;

mod cli;
mod deploy;
mod generated;
mod hostile_input;
mod key_files;
mod rotate;
mod run;
mod run_crash;
mod state_file;

//! The door: the command line, the config file and the one step that resolves them into
//! the library's plain settings. The only place that knows clap.

pub mod app;
pub mod config;

//! The door: the command line, the config file and the one step that resolves them into
//! the library's plain settings. The only place that knows clap.

pub mod app;
pub mod config;
pub mod values;

/// The command line of this process as `T` (`config::Cli` for `keyfleet`, `config::WorkerArgs`
/// for `keyfleet-worker`); on bad flags or `--help`, clap prints and exits here.
pub fn parse<T: clap::Parser>() -> T {
    T::parse()
}

//! The door: the command line, the config file and the one step that resolves them into
//! the library's plain settings. The only place that knows clap.

pub mod app;
pub mod config;
pub mod generate;
pub mod resolve;
pub mod values;

use clap::{CommandFactory, FromArgMatches};

/// The command line of this process as `T` (`config::Cli` for `keyfleet`, `config::WorkerArgs`
/// for `keyfleet-worker`); on bad flags, `--help` or `--version`, clap prints and exits here.
pub fn parse<T: CommandFactory + FromArgMatches>() -> T {
    let matches = command::<T>().get_matches();
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// `T`'s clap definition with this build's `--version` text: the one definition that parsing,
/// shell completions and the man page share.
pub fn command<T: CommandFactory>() -> clap::Command {
    T::command().long_version(long_version())
}

/// What `--version` says beyond the number: the key engine and the SIMD path of this build on
/// this CPU, so a bug report or a benchmark names the code that ran.
fn long_version() -> String {
    use crate::prime::lanes;
    let compiled = cfg!(target_arch = "x86_64");
    let simd = match (compiled, lanes::active()) {
        (_, lanes::Simd::Avx512Ifma) => "avx512ifma (8 lanes per key search, in use)".to_owned(),
        (true, lanes::Simd::Scalar) if lanes::ifma_available() => {
            "scalar (AVX-512 IFMA present but turned off by KEYFLEET_SIMD)".to_owned()
        }
        (true, lanes::Simd::Scalar) => {
            "scalar (the AVX-512 IFMA lanes are built in; this CPU lacks avx512ifma)".to_owned()
        }
        (false, lanes::Simd::Scalar) => "scalar (no vector kernel for this architecture)".into(),
    };
    format!(
        "{version}\n\
         key engine: fast (constant-time prime search and key assembly)\n\
         SIMD path: {simd}\n\
         build: {profile}, {arch}-{os}",
        version = env!("CARGO_PKG_VERSION"),
        profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        arch = std::env::consts::ARCH,
        os = std::env::consts::OS,
    )
}

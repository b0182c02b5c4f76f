//! Shell completions and man pages, generated from the one clap definition
//! ([`super::command`]) so they never drift from the flags (`keyfleet completions`,
//! `keyfleet man`).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap_complete::Shell;

use super::config::Cli;

/// Writes `shell`'s completion script for `keyfleet` to `out`.
pub fn completions(shell: Shell, out: &mut dyn Write) {
    let mut cmd = super::command::<Cli>();
    clap_complete::generate(shell, &mut cmd, "keyfleet", out);
}

/// Writes the man page of `keyfleet` to `out`, or, with `dir`, one page per command there
/// (`keyfleet.1`, `keyfleet-run.1`, …) and lists what it wrote on `out`.
pub fn man(dir: Option<&Path>, out: &mut dyn Write) -> anyhow::Result<()> {
    let cmd = super::command::<Cli>();
    let Some(dir) = dir else {
        clap_mangen::Man::new(cmd).render(out)?;
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut pages = vec![("keyfleet".to_owned(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("keyfleet-{}", sub.get_name());
        let page = sub
            .clone()
            .name(name.clone())
            .version(env!("CARGO_PKG_VERSION"));
        pages.push((name, page));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(page).render(&mut buf)?;
        std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))?;
        writeln!(out, "{}", path.display())?;
    }
    Ok(())
}

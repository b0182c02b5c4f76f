//! What is generated from the one clap definition: shell completions, man pages, and the
//! `--version` that names the code which makes the keys.

use std::process::Command;

use crate::util::{keyfleet, text};

/// Every subcommand a user can type.
const COMMANDS: &[&str] = &[
    "run",
    "describe",
    "delete",
    "bench",
    "submit",
    "collect",
    "status",
    "reconcile",
    "rotate",
    "retire",
    "serve",
    "completions",
    "man",
];

fn stdout_of(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = keyfleet(dir.path()).args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// What bash offers after `keyfleet <words…> <TAB>`, through the generated script.
fn bash_complete(script: &str, words: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyfleet.bash");
    std::fs::write(&path, script).unwrap();
    let line: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    let probe = format!(
        "source {path:?}; COMP_WORDS=(keyfleet {line}); COMP_CWORD={cword}; \
         COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; \
         _keyfleet keyfleet \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        line = line.join(" "),
        cword = words.len(),
    );
    let out = Command::new("bash")
        .args(["--norc", "-c", &probe])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn bash_completion_offers_every_command_and_their_flags() {
    let script = stdout_of(&["completions", "bash"]);
    let offered = bash_complete(&script, &[""]);
    for c in COMMANDS {
        assert!(
            offered.iter().any(|o| o == c),
            "{c} not offered: {offered:?}"
        );
    }
    let offered = bash_complete(&script, &["run", "--up"]);
    for flag in [
        "--upstream-endpoint",
        "--upstream-timeout",
        "--upstream-rps",
    ] {
        assert!(offered.iter().any(|o| o == flag), "{flag}: {offered:?}");
    }
    let offered = bash_complete(&script, &["completions", ""]);
    for shell in ["bash", "zsh", "fish"] {
        assert!(offered.iter().any(|o| o == shell), "{shell}: {offered:?}");
    }
}

#[test]
fn zsh_and_fish_completions_name_every_command() {
    let zsh = stdout_of(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef keyfleet"), "{}", &zsh[..80]);
    let fish = stdout_of(&["completions", "fish"]);
    for c in COMMANDS {
        assert!(zsh.contains(&format!("'{c}:")), "zsh lacks {c}");
        assert!(
            fish.contains(&format!("-a \"{c}\"")),
            "fish lacks {c}: {fish}"
        );
    }
}

#[test]
fn an_unknown_shell_exits_2_naming_the_choices() {
    let dir = tempfile::tempdir().unwrap();
    let out = keyfleet(dir.path())
        .args(["completions", "cmd.exe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("bash, elvish, fish, powershell, zsh"),
        "{}",
        text(&out)
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn man_pages_cover_every_command_and_flag() {
    let page = stdout_of(&["man"]);
    assert!(page.contains(".TH keyfleet 1"), "{}", &page[..200]);
    for c in COMMANDS {
        assert!(
            page.contains(&format!("keyfleet\\-{}", c.replace('-', "\\-"))),
            "{c}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("man1");
    let listed = stdout_of(&["man", "--out", pages.to_str().unwrap()]);
    assert_eq!(listed.lines().count(), COMMANDS.len() + 1, "{listed}");
    for c in COMMANDS {
        let page = std::fs::read_to_string(pages.join(format!("keyfleet-{c}.1"))).unwrap();
        let title = format!(
            ".TH keyfleet-{c} 1  \"keyfleet-{c} {}\"",
            env!("CARGO_PKG_VERSION")
        );
        assert!(page.contains(&title), "{c}: {page}");
    }
    // The run page holds the run flags, as `keyfleet run --help` does.
    let run = std::fs::read_to_string(pages.join("keyfleet-run.1")).unwrap();
    for flag in ["upstream\\-endpoint", "key\\-bits", "threads", "batch\\-id"] {
        assert!(run.contains(&format!("\\fB\\-\\-{flag}\\fR")), "{flag}");
    }
}

#[test]
fn version_names_the_simd_path_this_cpu_takes() {
    let short = stdout_of(&["-V"]);
    assert_eq!(
        short.trim(),
        format!("keyfleet {}", env!("CARGO_PKG_VERSION"))
    );

    let long = stdout_of(&["--version"]);
    assert!(long.contains("key engine: fast"), "{long}");
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let ifma = cpu.contains(" avx512ifma") && cpu.contains(" avx512f");
    let simd = long
        .lines()
        .find_map(|l| l.strip_prefix("SIMD path: "))
        .unwrap_or_else(|| panic!("no SIMD line: {long}"));
    if ifma && cfg!(target_arch = "x86_64") {
        assert!(simd.starts_with("avx512ifma"), "{simd}");
    } else {
        assert!(simd.starts_with("scalar"), "{simd}");
    }

    let dir = tempfile::tempdir().unwrap();
    let off = keyfleet(dir.path())
        .env("KEYFLEET_SIMD", "off")
        .arg("--version")
        .output()
        .unwrap();
    let off = String::from_utf8(off.stdout).unwrap();
    assert!(off.contains("SIMD path: scalar"), "{off}");
}

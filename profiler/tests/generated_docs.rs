//! The CLI reference (`docs/reference/cli.md`), the man pages (`docs/man/`) and the shell
//! completions (`docs/completions/`) are generated from the command line's clap definitions,
//! the attribution's vocabulary (`docs/reference/vocabulary.md`) from its TOML.
//! This test fails when a committed one is not what they generate now; `cargo xtask docs`
//! (this test with `REDIS_STALLPROF_WRITE_DOCS=1`) writes them.
use std::{
    fs,
    path::{Path, PathBuf},
};

use clap::CommandFactory as _;
use clap_complete::Shell;
use redis_stallprof::{attribute::vocabulary::Vocabulary, cli::Cli};

const BINARY: &str = "redis-stallprof";

/// Every generated file: its path under `docs/` and its bytes.
fn generated() -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let reference = format!(
        "<!-- Generated from the clap definitions by `cargo xtask docs`; do not edit. -->\n\n{}",
        clap_markdown::help_markdown::<Cli>()
    );
    files.push((PathBuf::from("reference/cli.md"), reference.into_bytes()));
    files.push((
        PathBuf::from("reference/vocabulary.md"),
        Vocabulary::builtin().markdown().into_bytes(),
    ));

    let command = Cli::command();
    let mut pages = vec![(BINARY.to_owned(), command.clone())];
    for subcommand in command.get_subcommands() {
        // clap names a command with a `&'static str`; a test may leak a few.
        let name: &'static str = format!("{BINARY}-{}", subcommand.get_name()).leak();
        pages.push((name.to_owned(), subcommand.clone().name(name)));
    }
    for (name, page) in pages {
        let mut roff = Vec::new();
        clap_mangen::Man::new(page)
            .render(&mut roff)
            .expect("rendering to memory");
        files.push((PathBuf::from(format!("man/{name}.1")), roff));
    }

    for (shell, file) in [
        (Shell::Bash, format!("{BINARY}.bash")),
        (Shell::Zsh, format!("_{BINARY}")),
        (Shell::Fish, format!("{BINARY}.fish")),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command.clone(), BINARY, &mut script);
        files.push((PathBuf::from("completions").join(file), script));
    }
    files
}

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

#[test]
fn the_generated_docs_are_what_the_command_line_generates() {
    let write = std::env::var_os("REDIS_STALLPROF_WRITE_DOCS").is_some();
    let mut stale = Vec::new();
    for (path, bytes) in generated() {
        let full = docs().join(&path);
        if write {
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            fs::write(&full, &bytes).unwrap();
        } else if fs::read(&full).ok().as_deref() != Some(bytes.as_slice()) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "out of date (run `cargo xtask docs` and commit them): {}",
        stale.join(", ")
    );
}

#[test]
fn every_flag_of_every_subcommand_is_in_the_reference() {
    let reference = String::from_utf8(generated().remove(0).1).unwrap();
    let command = Cli::command();
    let mut checked = 0;
    for subcommand in command.get_subcommands() {
        let section = format!("## `{BINARY} {}`", subcommand.get_name());
        let start = reference
            .find(&section)
            .unwrap_or_else(|| panic!("no section {section}"));
        for argument in subcommand.get_arguments() {
            if let Some(long) = argument.get_long() {
                let flag = format!("`--{long}");
                assert!(
                    reference[start..].contains(&flag),
                    "{} lacks {flag}",
                    subcommand.get_name()
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 30, "only {checked} flags");
}

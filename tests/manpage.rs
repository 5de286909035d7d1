//! The man page (`docs/vhost-user-net.1`) is generated from the clap
//! definition, and README's options table names exactly the options the
//! program has. No root needed.
//!
//! After changing an option: `VUN_UPDATE_MAN=1 cargo test --test manpage`
//! rewrites the page; install it with
//! `install -Dm644 docs/vhost-user-net.1 /usr/local/share/man/man1/vhost-user-net.1`.

use std::path::Path;

use clap::CommandFactory;
use vhost_user_net::control::config::Args;

fn render() -> String {
    let mut out = Vec::new();
    clap_mangen::Man::new(Args::command())
        .render(&mut out)
        .expect("render the man page");
    String::from_utf8(out).expect("utf-8")
}

#[test]
fn man_page_is_generated_from_the_current_command_line() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/vhost-user-net.1");
    let page = render();
    if std::env::var_os("VUN_UPDATE_MAN").is_some() {
        std::fs::write(&path, &page).expect("write the man page");
    }
    let shipped = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        shipped == page,
        "docs/vhost-user-net.1 is out of date: run VUN_UPDATE_MAN=1 cargo test --test manpage"
    );
}

#[test]
fn readme_options_table_names_every_option_and_no_other() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let table: Vec<&str> = readme
        .split("## Options")
        .nth(1)
        .expect("an Options section")
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect();
    // Options named in the table's first column, e.g. `--user USER`, `--group GROUP`.
    let mut documented: Vec<String> = table
        .iter()
        .filter_map(|l| l.split('|').nth(1))
        .flat_map(|cell| cell.split('`').skip(1).step_by(2))
        .filter_map(|code| code.split_whitespace().next())
        .filter(|flag| flag.starts_with("--"))
        .map(|flag| flag.trim_start_matches("--").to_owned())
        .collect();
    documented.sort();
    documented.dedup();
    let mut options: Vec<String> = Args::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .filter(|l| l != "help" && l != "version")
        .collect();
    options.sort();
    assert_eq!(documented, options, "README options table vs the program");
}

#[test]
fn version_flag_prints_the_crate_version() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-user-net"))
        .arg("--version")
        .output()
        .expect("run");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("vhost-user-net {}", env!("CARGO_PKG_VERSION"))
    );
}

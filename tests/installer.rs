//! The installer (`.ci/install-deps.sh`) keeps using the Debian mirror the
//! machine's apt sources name, so a machine behind a local mirror or proxy
//! works: its `bookworm_mirror` (in `.ci/apt-sources.sh`) is run here on
//! sample apt configurations. No root needed.

use std::path::Path;
use std::process::Command;

/// `bookworm_mirror` run on an apt configuration directory holding `files`.
fn mirror_of(files: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("sources.list.d")).expect("mkdir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/apt-sources.sh");
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"source "$1" && bookworm_mirror "$2""#)
        .arg("bash")
        .arg(&lib)
        .arg(dir.path())
        .output()
        .expect("bash");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

#[test]
fn one_line_sources_with_options_give_their_mirror() {
    let m = mirror_of(&[(
        "sources.list",
        "# local mirror\ndeb [signed-by=/k.gpg arch=amd64] http://mirror.example/debian bookworm main\n",
    )]);
    assert_eq!(m, "http://mirror.example/debian");
}

#[test]
fn deb822_sources_give_the_stanza_that_serves_bookworm_not_security() {
    let m = mirror_of(&[(
        "sources.list.d/debian.sources",
        "Types: deb\nURIs: http://proxy.example:3142/debian-security\nSuites: bookworm-security\n\
         Components: main\n\nTypes: deb\nURIs: http://proxy.example:3142/debian\n\
         Suites: bookworm bookworm-updates\nComponents: main\n",
    )]);
    assert_eq!(m, "http://proxy.example:3142/debian");
}

#[test]
fn no_bookworm_source_gives_nothing() {
    let m = mirror_of(&[(
        "sources.list",
        "deb http://mirror.example/debian trixie main\n",
    )]);
    assert_eq!(m, "");
}

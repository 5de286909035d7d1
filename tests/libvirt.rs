//! The libvirt domain examples in `docs/qemu.md` are valid against libvirt's
//! own schema (`virt-xml-validate`, Debian's `libvirt-clients` with
//! `libxml2-utils`, installed by `.ci/install-deps.sh`), in both modes, and
//! the page shows the socket ownership libvirt's QEMU user needs. No root
//! needed, but the tools are: `#[ignore]`d for a plain `cargo test`.

use std::path::Path;
use std::process::Command;

fn qemu_md() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/qemu.md"))
        .expect("docs/qemu.md")
}

/// The ```xml blocks of `text`.
fn xml_blocks(text: &str) -> Vec<String> {
    text.split("```xml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "needs virt-xml-validate (libvirt-clients, libxml2-utils; CI runs it)"]
fn libvirt_examples_validate_against_libvirts_schema_in_client_and_server_mode() {
    let blocks = xml_blocks(&qemu_md());
    let vhostuser: Vec<&String> = blocks
        .iter()
        .filter(|b| b.contains("<interface type='vhostuser'>"))
        .collect();
    assert!(
        vhostuser
            .iter()
            .any(|b| b.contains("mode='client'") && b.contains("<reconnect")),
        "a client-mode example with <reconnect>"
    );
    assert!(
        vhostuser.iter().any(|b| b.contains("mode='server'")),
        "a server-mode example"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, xml) in vhostuser.iter().enumerate() {
        let file = dir.path().join(format!("domain{i}.xml"));
        std::fs::write(&file, xml).expect("write");
        let out = Command::new("virt-xml-validate")
            .arg(&file)
            .arg("domain")
            .output()
            .expect("virt-xml-validate (apt-get install libvirt-clients libxml2-utils)");
        assert!(
            out.status.success(),
            "example {i} is not a valid libvirt domain:\n{xml}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn libvirt_section_shows_the_socket_group_qemu_needs() {
    let md = qemu_md();
    let libvirt = md.split("## libvirt").nth(1).expect("a libvirt section");
    assert!(
        libvirt.contains("--socket-mode 0660 --socket-group kvm"),
        "libvirt's QEMU user must be able to connect"
    );
}

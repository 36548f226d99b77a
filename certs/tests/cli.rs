//! The `certs` binary as a shell sees it: closed pipes, and the CA key kept apart.
//! (Certificates are checked with openssl in `openssl.rs`.)

// Test helpers outside #[test] functions: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};

use common::{Pki, certs, certs_cmd, ok, text};

/// What a process that died of a Rust panic looks like: exit status 101 and
/// "panicked" on stderr.
#[track_caller]
fn assert_no_panic(args: &[&str], out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "{args:?} panicked ({}):\n{stderr}",
        out.status
    );
    assert_ne!(out.status.code(), Some(101), "{args:?}:\n{stderr}");
}

/// Every command, with stdout a pipe nobody reads (`certs ... | true`): each write
/// fails with EPIPE from the first byte on, so this does not depend on timing.
#[test]
fn every_command_exits_quietly_when_stdout_is_closed() {
    let pki = Pki::new(&[]);
    let fresh = pki.dir.with_file_name("fresh");
    let d = pki.d();
    let image = pki.dir.join("image.bin");
    std::fs::write(&image, b"firmware").unwrap();
    let commands: Vec<Vec<&str>> = vec![
        vec!["init", "--dir", fresh.to_str().unwrap()],
        vec!["device", "--dir", d, "dev-a"],
        vec!["device", "--dir", d, "dev-b"],
        vec!["devices", "--dir", d, "--prefix", "sim-", "--count", "3"],
        vec!["renew", "--dir", d, "dev-a"],
        vec!["renew", "--dir", d, "--gateway"],
        vec!["gateway", "--dir", d, "--force"],
        vec!["revoke", "--dir", d, "dev-b"],
        vec!["crl", "--dir", d],
        vec!["list", "--dir", d],
        vec!["list", "--dir", d, "--json"],
        vec!["release-key", "--dir", d],
        vec![
            "sign-firmware",
            "--dir",
            d,
            "--version",
            "1.0",
            image.to_str().unwrap(),
        ],
        vec!["--help"],
    ];
    for args in &commands {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = certs_cmd(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_no_panic(args, &out);
        // The work was done: only its report went nowhere.
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    // A failure with both stdout and stderr closed is still a plain failure.
    let args = ["device", "--dir", d, "dev-a"];
    let (r1, w1) = std::io::pipe().unwrap();
    let (r2, w2) = std::io::pipe().unwrap();
    drop((r1, r2));
    let status = certs_cmd(args).stdout(w1).stderr(w2).status().unwrap();
    assert_eq!(status.code(), Some(1), "exists: a failure, not a panic");
}

/// `certs list --json | head -1`: the reader goes away after the first line, while
/// most of the listing (well over a pipe buffer of 64 KiB) is still to be written.
#[test]
fn list_into_head_does_not_panic() {
    let pki = Pki::new(&[]);
    ok(pki.devices("sim-", 400, &[]));
    for args in [
        vec!["list", "--dir", pki.d(), "--json"],
        vec!["list", "--dir", pki.d()],
    ] {
        let mut child = certs_cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(!first.is_empty());
        // The reader is dropped here: the pipe's reading end is closed.
        let out = child.wait_with_output().unwrap();
        assert_no_panic(&args, &out);
    }
}

/// `init` says what the gateway needs and that `DIR/ca/` can go offline; after it has,
/// reading works, and signing works with `--ca-key`.
#[test]
fn the_ca_key_directory_can_go_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let d = dir.to_str().unwrap();
    let out = ok(certs(["init", "--dir", d]));
    assert!(
        out.contains("The gateway needs only")
            && out.contains("ca.pem, crl.pem, gateway.pem and gateway.key.pem")
            && out.contains(&format!("move {d}/ca/ offline")),
        "{out}"
    );
    ok(certs(["device", "--dir", d, "dev-a"]));
    let offline = tmp.path().join("usb");
    std::fs::rename(dir.join("ca"), &offline).unwrap();

    let list = ok(certs(["list", "--dir", d]));
    assert!(list.contains("dev-a"), "{list}");
    let out = certs(["device", "--dir", d, "dev-b"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds no CA private key") && err.contains("--ca-key"),
        "{err}"
    );
    let key = offline.join("ca.key.pem");
    let key = key.to_str().unwrap();
    ok(certs(["device", "--dir", d, "dev-b", "--ca-key", key]));
    ok(certs(["revoke", "--dir", d, "dev-a", "--ca-key", key]));
    let out = certs_cmd(["crl", "--dir", d])
        .env("CERTS_CA_KEY", key)
        .output()
        .unwrap();
    ok(out);
    let list = ok(certs(["list", "--dir", d]));
    assert!(list.contains("2 device(s), 1 revoked"), "{list}");
    assert!(!dir.join("ca").exists(), "nothing wrote the key back");
}

/// `release-key` then `sign-firmware`: the signature file checks out with the public
/// key a firmware would include, a changed image does not, and the key is never
/// replaced.
#[test]
fn release_key_and_sign_firmware() {
    use device_client::firmware::{FirmwareError, ImageHasher};

    let pki = Pki::new(&[]);
    let d = pki.d();
    ok(certs(["release-key", "--dir", d]));
    let again = certs(["release-key", "--dir", d]);
    assert!(!again.status.success());
    assert!(text(&again).contains("never replaced"), "{}", text(&again));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| std::fs::metadata(pki.p(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("release"), 0o700);
        assert_eq!(mode("release/release.key.pem"), 0o600);
    }
    let public: [u8; 65] = std::fs::read(pki.p("release.pub.bin"))
        .unwrap()
        .try_into()
        .unwrap();

    let image: Vec<u8> = (0..30_000u32).map(|i| (i % 253) as u8).collect();
    let path = pki.dir.join("fw.bin");
    std::fs::write(&path, &image).unwrap();
    let out = ok(certs([
        "sign-firmware",
        "--dir",
        d,
        "--version",
        "1.3.0",
        path.to_str().unwrap(),
    ]));
    assert!(out.contains("as version 1.3.0"), "{out}");
    let sig: certs::Signed =
        serde_json::from_slice(&std::fs::read(pki.p("fw.bin.sig.json")).unwrap()).unwrap();
    let (manifest, signature) = sig.parts().unwrap();
    let check = |bytes: &[u8]| {
        let mut h = ImageHasher::new();
        h.update(bytes);
        manifest.check(&public, &signature, &h.finish())
    };
    assert_eq!(check(&image), Ok(()));
    let mut changed = image.clone();
    changed[0] ^= 0x80;
    assert_eq!(check(&changed), Err(FirmwareError::HashMismatch));

    // Without a key: told how to make one.
    let other = Pki::new(&[]);
    let fail = certs([
        "sign-firmware",
        "--dir",
        other.d(),
        "--version",
        "1",
        path.to_str().unwrap(),
    ]);
    assert!(!fail.status.success());
    assert!(text(&fail).contains("certs release-key"), "{}", text(&fail));
}

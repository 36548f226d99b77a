//! What `cli.rs` and `openssl.rs` share: the `certs` binary and a PKI to run it on.

// Each test crate compiles its own copy of this module and uses only part of it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output};

use tempfile::TempDir;

/// The `certs` binary, not yet run. CERTS_DIR is removed so that a value in the
/// developer's environment cannot stand in for a missing `--dir`.
pub fn certs_cmd<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_certs"));
    cmd.args(args).env_remove("CERTS_DIR");
    cmd
}

pub fn certs<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    certs_cmd(args).output().expect("run the certs binary")
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts success; returns stdout.
#[track_caller]
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "expected success, got {}:\n{}",
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts a non-zero exit; returns stderr.
#[track_caller]
pub fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, got success:\n{}",
        text(&out)
    );
    assert_ne!(out.status.code(), Some(0));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A temporary directory with an initialized PKI in `<tmp>/pki`.
pub struct Pki {
    _tmp: TempDir,
    pub dir: PathBuf,
}

impl Pki {
    /// `certs init` with `extra` arguments after `--dir`.
    pub fn new(extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let mut args = vec!["init", "--dir", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        ok(certs(&args));
        Self { _tmp: tmp, dir }
    }

    pub fn d(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    pub fn p(&self, rel: &str) -> String {
        self.dir.join(rel).to_str().unwrap().to_owned()
    }

    pub fn device(&self, id: &str) {
        ok(certs(["device", "--dir", self.d(), id]));
    }

    /// `certs devices --dir DIR --prefix PREFIX --count COUNT EXTRA...`.
    pub fn devices(&self, prefix: &str, count: u32, extra: &[&str]) -> Output {
        let count = count.to_string();
        let mut args = vec![
            "devices",
            "--dir",
            self.d(),
            "--prefix",
            prefix,
            "--count",
            &count,
        ];
        args.extend_from_slice(extra);
        certs(&args)
    }

    /// `certs list --json`, parsed.
    pub fn list_json(&self) -> serde_json::Value {
        serde_json::from_str(&ok(certs(["list", "--dir", self.d(), "--json"]))).unwrap()
    }
}

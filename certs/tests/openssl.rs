//! The real `certs` binary, checked with the real `openssl` CLI.
//!
//! Needs `openssl` on PATH (CI installs it). Never asks openssl to print a private key:
//! `-noout` on every command that reads one.

// Test helpers outside #[test] functions: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{Pki, certs, fails, ok, text};

fn openssl<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    static FOUND: OnceLock<bool> = OnceLock::new();
    let found = *FOUND.get_or_init(|| Command::new("openssl").arg("version").output().is_ok());
    assert!(
        found,
        "`openssl` is not on PATH. These tests check the certificates with the real OpenSSL \
         CLI: install it (Debian/Ubuntu: apt-get install openssl) and rerun."
    );
    Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl")
}

/// `openssl x509 -noout ARGS -in CERT`, which must succeed; returns stdout.
#[track_caller]
fn x509(cert: &str, args: &[&str]) -> String {
    ok(openssl(
        ["x509", "-noout"].iter().chain(args).chain(&["-in", cert]),
    ))
}

/// `openssl TOOL -inform DER -in KEY ARGS`: the SEC1 DER key, which openssl does not
/// recognise by itself.
fn der_key(tool: &str, key: &str, args: &[&str]) -> Output {
    openssl([tool, "-inform", "DER", "-in", key].iter().chain(args))
}

impl Pki {
    fn serial(&self, id: &str) -> String {
        let out = x509(&self.p(&format!("devices/{id}/cert.pem")), &["-serial"]);
        out.trim().strip_prefix("serial=").unwrap().to_owned()
    }

    /// `openssl crl -noout ARGS -in DIR/crl.pem`.
    fn crl(&self, args: &[&str]) -> Output {
        let crl = self.p("crl.pem");
        openssl(["crl", "-noout"].iter().chain(args).chain(&["-in", &crl]))
    }

    fn crl_text(&self) -> String {
        ok(self.crl(&["-text"]))
    }

    /// `openssl verify [-purpose PURPOSE] -CAfile DIR/ca.pem CERTS...`, with CERTS
    /// relative to DIR.
    fn verify(&self, purpose: Option<&str>, certs: &[&str]) -> Output {
        let mut args = vec!["verify".to_owned()];
        if let Some(purpose) = purpose {
            args.extend(["-purpose".to_owned(), purpose.to_owned()]);
        }
        args.extend(["-CAfile".to_owned(), self.p("ca.pem")]);
        args.extend(certs.iter().map(|cert| self.p(cert)));
        openssl(args)
    }

    fn verify_with_crl(&self, cert: &str) -> Output {
        openssl([
            "verify",
            "-crl_check",
            "-CAfile",
            &self.p("ca.pem"),
            "-CRLfile",
            &self.p("crl.pem"),
            &self.p(cert),
        ])
    }
}

/// Every file under `dir` with its contents, to prove a failed command changed nothing.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.insert(path.clone(), Vec::new());
                walk(&path, out);
            } else {
                out.insert(path.clone(), fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, &mut out);
    out
}

#[cfg(unix)]
fn mode(path: &str) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn crl_number(crl_text: &str) -> u64 {
    let mut lines = crl_text.lines();
    lines.find(|l| l.contains("CRL Number"));
    lines.next().unwrap().trim().parse().unwrap()
}

#[test]
fn openssl_accepts_the_gateway_and_device_certificates_and_keys() {
    let pki = Pki::new(&["--gateway-name", "gw.test", "--gateway-name", "10.1.2.3"]);
    pki.device("sensor-01");
    let dev = |f: &str| pki.p(&format!("devices/sensor-01/{f}"));
    let dev_cert = "devices/sensor-01/cert.pem";

    // Chains.
    let out = ok(pki.verify(None, &["gateway.pem", dev_cert]));
    assert_eq!(out.matches(": OK").count(), 2, "{out}");
    ok(pki.verify(Some("sslserver"), &["gateway.pem"]));
    ok(pki.verify(Some("sslclient"), &[dev_cert]));
    // Purposes are not interchangeable.
    fails(pki.verify(Some("sslserver"), &[dev_cert]));

    // The SEC1 DER key is valid and is the same key as the PKCS#8 PEM and the certificate.
    let check = text(&der_key("ec", &dev("key.der"), &["-check", "-noout"]));
    assert!(check.contains("EC Key valid."), "{check}");
    let public = ok(der_key("pkey", &dev("key.der"), &["-text_pub", "-noout"]));
    assert!(public.contains("prime256v1"), "{public}");
    let from_der = ok(der_key("ec", &dev("key.der"), &["-pubout"]));
    let from_pem = ok(openssl(["pkey", "-in", &dev("key.pem"), "-pubout"]));
    let from_cert = x509(&dev("cert.pem"), &["-pubkey"]);
    assert!(from_der.contains("BEGIN PUBLIC KEY"));
    assert_eq!(from_der, from_pem);
    assert_eq!(from_der, from_cert);

    // cert.der is cert.pem.
    let der_as_pem = ok(openssl(["x509", "-inform", "DER", "-in", &dev("cert.der")]));
    assert_eq!(der_as_pem, fs::read_to_string(dev("cert.pem")).unwrap());

    // Subject CN = id.
    let subject = x509(&dev("cert.pem"), &["-subject", "-nameopt", "RFC2253"]);
    assert_eq!(subject.trim(), "subject=CN=sensor-01");

    // Profile details rustls relies on.
    let ca_ext = x509(
        &pki.p("ca.pem"),
        &["-ext", "basicConstraints,keyUsage,subjectKeyIdentifier"],
    );
    assert!(ca_ext.contains("CA:TRUE"), "{ca_ext}");
    assert!(ca_ext.contains("Certificate Sign, CRL Sign"), "{ca_ext}");
    assert!(ca_ext.contains("Subject Key Identifier"), "{ca_ext}");
    let gw_ext = x509(
        &pki.p("gateway.pem"),
        &["-ext", "subjectAltName,extendedKeyUsage,basicConstraints"],
    );
    for want in [
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "IP Address:0:0:0:0:0:0:0:1",
        "DNS:gw.test",
        "IP Address:10.1.2.3",
        "TLS Web Server Authentication",
        "CA:FALSE",
    ] {
        assert!(gw_ext.contains(want), "{want} missing in {gw_ext}");
    }
    let dev_ext = x509(
        &dev("cert.pem"),
        &[
            "-ext",
            "extendedKeyUsage,authorityKeyIdentifier,basicConstraints",
        ],
    );
    assert!(
        dev_ext.contains("TLS Web Client Authentication"),
        "{dev_ext}"
    );
    assert!(dev_ext.contains("Authority Key Identifier"), "{dev_ext}");
    assert!(dev_ext.contains("CA:FALSE"), "{dev_ext}");
    let version = x509(&dev("cert.pem"), &["-text"]);
    assert!(version.contains("Version: 3 (0x2)"));

    // Private keys are 0600.
    #[cfg(unix)]
    for key in [
        pki.p("ca/ca.key.pem"),
        pki.p("gateway.key.pem"),
        dev("key.pem"),
        dev("key.der"),
    ] {
        assert_eq!(mode(&key), 0o600, "{key}");
    }
    #[cfg(unix)]
    assert_eq!(mode(&pki.p("ca")), 0o700);
}

/// The subject as openssl prints it, e.g. `subject=CN=dev-a`.
fn subject(pki: &Pki, cert: &str) -> String {
    x509(&pki.p(cert), &["-subject"]).trim().to_owned()
}

#[test]
fn renew_issues_a_new_serial_for_the_same_subject() {
    let pki = Pki::new(&["--gateway-name", "gw.example", "--gateway-name", "10.0.0.7"]);
    pki.device("dev-a");
    let old_serial = pki.serial("dev-a");
    let old_subject = subject(&pki, "devices/dev-a/cert.pem");
    let old_key = fs::read(pki.p("devices/dev-a/key.der")).unwrap();
    let old_cert = fs::read(pki.p("devices/dev-a/cert.pem")).unwrap();

    let out = ok(certs(["renew", "--dir", pki.d(), "dev-a", "--days", "30"]));
    let new_serial = pki.serial("dev-a");
    assert_ne!(new_serial, old_serial);
    assert!(out.contains(&new_serial), "{out}");
    // What to do about the old one, which stays valid.
    assert!(
        out.contains(&format!(
            "certs revoke --dir {} --serial {old_serial}",
            pki.d()
        )),
        "{out}"
    );
    assert_eq!(subject(&pki, "devices/dev-a/cert.pem"), old_subject);
    assert_ne!(fs::read(pki.p("devices/dev-a/key.der")).unwrap(), old_key);
    let verified = ok(pki.verify_with_crl("devices/dev-a/cert.pem"));
    assert!(verified.contains(": OK"), "{verified}");
    // The key matches the certificate.
    assert_eq!(
        x509(&pki.p("devices/dev-a/cert.pem"), &["-pubkey"]),
        ok(openssl([
            "pkey",
            "-pubout",
            "-in",
            &pki.p("devices/dev-a/key.pem")
        ]))
    );
    // The old certificate is still good until it is revoked.
    let old_path = pki.dir.parent().unwrap().join("old.pem");
    fs::write(&old_path, &old_cert).unwrap();
    ok(pki.verify_with_crl("../old.pem"));
    ok(certs(["revoke", "--dir", pki.d(), "--serial", &old_serial]));
    let refused = text(&pki.verify_with_crl("../old.pem"));
    assert!(refused.contains("revoked"), "{refused}");
    ok(pki.verify_with_crl("devices/dev-a/cert.pem"));

    // --keep-key: a new certificate for the same key.
    let key = fs::read(pki.p("devices/dev-a/key.der")).unwrap();
    ok(certs(["renew", "--dir", pki.d(), "dev-a", "--keep-key"]));
    assert_eq!(fs::read(pki.p("devices/dev-a/key.der")).unwrap(), key);
    assert_ne!(pki.serial("dev-a"), new_serial);
    ok(pki.verify_with_crl("devices/dev-a/cert.pem"));

    // The gateway: same names, new serial, still a server certificate of this CA.
    let names = |pki: &Pki| x509(&pki.p("gateway.pem"), &["-ext", "subjectAltName"]);
    let gw_serial = |pki: &Pki| x509(&pki.p("gateway.pem"), &["-serial"]);
    let (names_before, subject_before, serial_before) =
        (names(&pki), subject(&pki, "gateway.pem"), gw_serial(&pki));
    ok(certs(["renew", "--dir", pki.d(), "--gateway"]));
    assert_eq!(names(&pki), names_before);
    assert!(names_before.contains("gw.example") && names_before.contains("10.0.0.7"));
    assert_eq!(subject(&pki, "gateway.pem"), subject_before);
    assert_ne!(gw_serial(&pki), serial_before);
    let out = ok(pki.verify(Some("sslserver"), &["gateway.pem"]));
    assert!(out.contains(": OK"), "{out}");

    // Renewing what is not there.
    let err = fails(certs(["renew", "--dir", pki.d(), "nobody"]));
    assert!(
        err.contains("no device") && err.contains("certs list"),
        "{err}"
    );
    fails(certs(["renew", "--dir", pki.d()]));
    fails(certs(["renew", "--dir", pki.d(), "dev-a", "--gateway"]));
}

/// `nextUpdate=...` as openssl prints it, as a number of seconds since the epoch.
fn next_update(pki: &Pki) -> i64 {
    let out = ok(pki.crl(&["-nextupdate", "-dateopt", "iso_8601"]));
    // `2026-12-01 22:33:13Z`: RFC 3339 but for the space.
    let text = out.trim().strip_prefix("nextUpdate=").unwrap();
    rfc3339(&text.replacen(' ', "T", 1))
}

fn rfc3339(text: &str) -> i64 {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .unix_timestamp()
}

#[test]
fn crl_refresh_moves_the_next_update_and_keeps_the_revocations() {
    let pki = Pki::new(&["--crl-days", "2"]);
    pki.device("dev-a");
    pki.device("dev-b");
    let a = pki.serial("dev-a");
    ok(certs([
        "revoke",
        "--dir",
        pki.d(),
        "dev-a",
        "--crl-days",
        "2",
    ]));
    ok(certs([
        "revoke",
        "--dir",
        pki.d(),
        "--serial",
        "0102",
        "--crl-days",
        "2",
    ]));
    let before = next_update(&pki);
    let crl = pki.crl_text();
    let number = crl_number(&crl);
    let dates = |crl: &str| -> Vec<String> {
        crl.lines()
            .filter(|l| l.contains("Revocation Date"))
            .map(str::to_owned)
            .collect()
    };

    let out = ok(certs([
        "crl",
        "--dir",
        pki.d(),
        "--refresh",
        "--days",
        "30",
    ]));
    assert!(out.contains("2 revoked serial(s)"), "{out}");
    let after = next_update(&pki);
    assert!(after - before >= 27 * 86_400, "{before} -> {after}");
    let refreshed = pki.crl_text();
    assert_eq!(crl_number(&refreshed), number + 1);
    assert!(
        refreshed.contains(&format!("Serial Number: {a}")),
        "{refreshed}"
    );
    assert!(refreshed.contains("Serial Number: 0102"), "{refreshed}");
    assert_eq!(dates(&refreshed), dates(&crl), "revocation dates kept");
    let refused = text(&pki.verify_with_crl("devices/dev-a/cert.pem"));
    assert!(refused.contains("revoked"), "{refused}");
    ok(pki.verify_with_crl("devices/dev-b/cert.pem"));

    // The old spelling still works, and so does the default (365 days).
    ok(certs(["crl", "--dir", pki.d(), "--crl-days", "1"]));
    assert!(next_update(&pki) < after);
    ok(certs(["crl", "--dir", pki.d()]));
    assert!(next_update(&pki) - after > 300 * 86_400);

    // `list` shows it, in the table and in JSON.
    let next = next_update(&pki);
    let list = pki.list_json();
    let crl = &list["crl"];
    assert_eq!(crl["number"], number + 3);
    assert_eq!(crl["expired"], false);
    assert_eq!(rfc3339(crl["next_update"].as_str().unwrap()), next);
    let serials: Vec<&str> = crl["revoked_serials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(serials, [a.as_str(), "0102"]);
    let table = ok(certs(["list", "--dir", pki.d()]));
    let line = table.lines().find(|l| l.starts_with("CRL:")).unwrap();
    assert!(
        line.contains("next update") && line.contains(crl["next_update"].as_str().unwrap()),
        "{table}"
    );
}

#[test]
fn revocation_is_seen_by_openssl_and_keeps_earlier_entries() {
    let pki = Pki::new(&[]);
    pki.device("dev-a");
    pki.device("dev-b");
    pki.device("dev-c");
    let (a, b) = (pki.serial("dev-a"), pki.serial("dev-b"));

    // The empty CRL from init is valid and signed by the CA.
    let crl = pki.crl_text();
    assert!(crl.contains("No Revoked Certificates"), "{crl}");
    assert_eq!(crl_number(&crl), 1);
    ok(pki.verify_with_crl("devices/dev-a/cert.pem"));

    let out = ok(certs(["revoke", "--dir", pki.d(), "dev-a"]));
    assert!(out.contains(&a), "{out}");
    let crl = pki.crl_text();
    assert!(crl.contains(&format!("Serial Number: {a}")), "{crl}");
    assert_eq!(crl_number(&crl), 2);
    let verify_crl = text(&pki.crl(&["-CAfile", &pki.p("ca.pem")]));
    assert!(verify_crl.contains("verify OK"), "{verify_crl}");

    let rejected = pki.verify_with_crl("devices/dev-a/cert.pem");
    assert!(
        text(&rejected).contains("certificate revoked"),
        "{}",
        text(&rejected)
    );
    fails(rejected);
    ok(pki.verify_with_crl("devices/dev-b/cert.pem"));

    // A second revocation keeps the first.
    ok(certs(["revoke", "--dir", pki.d(), "dev-b"]));
    let crl = pki.crl_text();
    assert!(crl.contains(&format!("Serial Number: {a}")), "{crl}");
    assert!(crl.contains(&format!("Serial Number: {b}")), "{crl}");
    assert_eq!(crl_number(&crl), 3);
    fails(pki.verify_with_crl("devices/dev-a/cert.pem"));
    fails(pki.verify_with_crl("devices/dev-b/cert.pem"));
    ok(pki.verify_with_crl("devices/dev-c/cert.pem"));

    // Revoking again changes nothing.
    let before = fs::read(pki.p("crl.pem")).unwrap();
    let out = ok(certs(["revoke", "--dir", pki.d(), "dev-a"]));
    assert!(out.contains("already revoked"), "{out}");
    assert_eq!(fs::read(pki.p("crl.pem")).unwrap(), before);

    // Revoking by serial, e.g. a certificate replaced with --force.
    let c = pki.serial("dev-c");
    ok(certs(["device", "--dir", pki.d(), "dev-c", "--force"]));
    ok(pki.verify_with_crl("devices/dev-c/cert.pem"));
    ok(certs([
        "revoke",
        "--dir",
        pki.d(),
        "--serial",
        &c.to_lowercase(),
    ]));
    let crl = pki.crl_text();
    assert!(crl.contains(&format!("Serial Number: {c}")), "{crl}");
    ok(pki.verify_with_crl("devices/dev-c/cert.pem"));

    // Re-signing keeps the entries and bumps the number.
    ok(certs(["crl", "--dir", pki.d()]));
    let crl = pki.crl_text();
    assert_eq!(crl_number(&crl), 5);
    assert_eq!(crl.matches("Serial Number:").count(), 3);

    // `list` agrees.
    let list = pki.list_json();
    let status: Vec<(&str, bool)> = list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["revoked"].as_bool().unwrap()))
        .collect();
    assert_eq!(status, [("dev-a", true), ("dev-b", true), ("dev-c", false)]);
}

#[test]
fn a_thousand_devices_at_once() {
    let pki = Pki::new(&[]);
    ok(pki.devices("sim-", 1000, &[]));
    let mut names: Vec<String> = fs::read_dir(pki.p("devices"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 1000, "no temporary entries left");
    assert_eq!(names.first().unwrap(), "sim-0000");
    assert_eq!(names.last().unwrap(), "sim-0999");

    let out = ok(pki.verify(
        Some("sslclient"),
        &[
            "devices/sim-0000/cert.pem",
            "devices/sim-0500/cert.pem",
            "devices/sim-0999/cert.pem",
        ],
    ));
    assert_eq!(out.matches(": OK").count(), 3, "{out}");

    let list = pki.list_json();
    let rows = list["devices"].as_array().unwrap();
    assert_eq!(rows.len(), 1000);
    let serials: std::collections::HashSet<&str> =
        rows.iter().map(|r| r["serial"].as_str().unwrap()).collect();
    assert_eq!(serials.len(), 1000, "serials are unique");
    assert!(rows.iter().all(|r| r["status"] == "valid"));

    // Asking again refuses and writes nothing; --skip-existing fills the gaps.
    let before = snapshot(&pki.dir);
    let err = fails(pki.devices("sim-", 1002, &[]));
    assert!(err.contains("--skip-existing"), "{err}");
    assert_eq!(snapshot(&pki.dir), before);
    let out = ok(pki.devices("sim-", 1002, &["--skip-existing"]));
    assert!(out.contains("skipped 1000"), "{out}");
    assert!(pki.dir.join("devices/sim-1001/cert.pem").exists());
}

#[test]
fn bad_input_fails_with_a_clear_message_and_writes_nothing() {
    let pki = Pki::new(&[]);
    pki.device("taken");
    let before = snapshot(&pki.dir);

    // Bad ids.
    let long = "x".repeat(65);
    for bad in ["bad id", "..", ".", "a/b", "../escape", &long, "é", ""] {
        let err = fails(certs(["device", "--dir", pki.d(), bad]));
        assert!(err.contains("device id"), "{bad:?}: {err}");
        assert!(
            err.contains("hint: a device id is 1 to 64 characters"),
            "{bad:?}: {err}"
        );
        assert_eq!(snapshot(&pki.dir), before, "{bad:?} left something behind");
    }
    let err = fails(pki.devices("bad prefix ", 3, &[]));
    assert!(err.contains("device id"), "{err}");

    // An existing device.
    let err = fails(certs(["device", "--dir", pki.d(), "taken"]));
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );

    // An existing CA.
    let err = fails(certs(["init", "--dir", pki.d()]));
    assert!(
        err.contains("already holds a CA") && err.contains("--force"),
        "{err}"
    );

    // A bad gateway name.
    let err = fails(certs([
        "gateway",
        "--dir",
        pki.d(),
        "--gateway-name",
        "no_underscores",
        "--force",
    ]));
    assert!(err.contains("invalid gateway name"), "{err}");
    assert_eq!(snapshot(&pki.dir), before);

    // A missing or uninitialized directory.
    let parent = pki.dir.parent().unwrap();
    let missing = parent.join("missing");
    let missing = missing.to_str().unwrap();
    for args in [
        vec!["device", "--dir", missing, "x"],
        vec!["devices", "--dir", missing, "--prefix", "s", "--count", "2"],
        vec!["revoke", "--dir", missing, "x"],
        vec!["list", "--dir", missing],
        vec!["crl", "--dir", missing],
        vec!["gateway", "--dir", missing],
    ] {
        let err = fails(certs(&args));
        assert!(err.contains("does not exist"), "{args:?}: {err}");
        assert!(err.contains("certs init --dir"), "{args:?}: {err}");
        assert!(
            !Path::new(missing).exists(),
            "{args:?} created the directory"
        );
    }
    let empty = parent.join("empty");
    fs::create_dir(&empty).unwrap();
    let err = fails(certs(["device", "--dir", empty.to_str().unwrap(), "x"]));
    assert!(
        err.contains("holds no CA") && err.contains("certs init"),
        "{err}"
    );
    assert_eq!(fs::read_dir(&empty).unwrap().count(), 0);

    // init with a bad gateway name creates nothing.
    let fresh = parent.join("fresh");
    let err = fails(certs([
        "init",
        "--dir",
        fresh.to_str().unwrap(),
        "--gateway-name",
        "a..b",
    ]));
    assert!(err.contains("invalid gateway name"), "{err}");
    assert!(!fresh.exists());

    // Revoking an unknown device.
    let err = fails(certs(["revoke", "--dir", pki.d(), "nobody"]));
    assert!(
        err.contains("no device") && err.contains("certs list"),
        "{err}"
    );

    // Usage errors.
    fails(pki.devices("s", 0, &[]));
    fails(certs(["device", "--dir", pki.d(), "x", "--days", "0"]));
    fails(certs(["revoke", "--dir", pki.d()]));

    assert_eq!(snapshot(&pki.dir), before);
}

#[test]
fn init_force_replaces_the_ca() {
    let pki = Pki::new(&[]);
    pki.device("old");
    let old_ca = fs::read(pki.p("ca.pem")).unwrap();
    let out = certs(["init", "--dir", pki.d(), "--force"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(err.contains("no longer trusted"), "{err}");
    assert_ne!(fs::read(pki.p("ca.pem")).unwrap(), old_ca);
    fails(pki.verify(None, &["devices/old/cert.pem"]));
    ok(pki.verify(None, &["gateway.pem"]));
    let list = ok(certs(["list", "--dir", pki.d()]));
    assert!(list.contains("other-ca"), "{list}");
    ok(certs(["device", "--dir", pki.d(), "old", "--force"]));
    ok(pki.verify(None, &["devices/old/cert.pem"]));
}

#[test]
fn help_has_examples() {
    let help = ok(certs(["--help"]));
    assert!(
        help.contains("Examples:") && help.contains("certs devices"),
        "{help}"
    );
    for sub in [
        "init", "gateway", "device", "devices", "renew", "revoke", "crl", "list",
    ] {
        let help = ok(certs([sub, "--help"]));
        assert!(help.contains("--dir"), "{sub}: {help}");
        assert!(help.contains("Example"), "{sub}: {help}");
    }
}

//! `certs`: makes and maintains the gateway's PKI directory. All logic is in the
//! library (`certs::dir`); this file parses arguments and prints results and hints.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use certs::dir::{
    DEFAULT_CA_DAYS, DEFAULT_CA_NAME, DEFAULT_CRL_DAYS, DEFAULT_LEAF_DAYS, DirError, Existing,
    InitOptions, PkiDir, sequential_ids,
};
use certs::{Error, GATEWAY_DEFAULT_NAMES, Serial, Validity};
use clap::{Args, Parser, Subcommand};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const AFTER_HELP: &str = "\
Layout of DIR:
  ca.pem, ca.key.pem            the CA (key mode 0600: keep it safe)
  gateway.pem, gateway.key.pem  the gateway's TLS server certificate and key
  crl.pem                       revoked device serials, signed by the CA
  devices/ID/cert.pem, cert.der the device's client certificate (CN = ID)
  devices/ID/key.pem            its private key, PKCS#8 PEM (rustls, openssl)
  devices/ID/key.der            the same key, SEC1 DER (embedded-tls)

Examples:
  certs init --dir pki --gateway-name gw.example.com --gateway-name 192.168.1.10
  certs device --dir pki sensor-01
  certs devices --dir pki --prefix sim- --count 1000     # sim-0000 ... sim-0999
  certs revoke --dir pki sensor-01
  certs list --dir pki --json

--dir can also be set with the CERTS_DIR environment variable.";

/// Make the IoT gateway's PKI: a CA, the gateway's TLS certificate, device client
/// certificates (CN = device id) and a CRL. Everything is ECDSA P-256.
#[derive(Parser)]
#[command(name = "certs", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct DirArg {
    /// The PKI directory.
    #[arg(long, value_name = "DIR", env = "CERTS_DIR")]
    dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Create DIR (if needed) with a new CA, the gateway certificate and an empty CRL.
    #[command(after_help = "\
Writes DIR/ca.pem, DIR/ca.key.pem, DIR/gateway.pem, DIR/gateway.key.pem, DIR/crl.pem.
The gateway certificate is always valid for localhost, 127.0.0.1 and ::1; add the names
devices use to reach the gateway with --gateway-name.

Examples:
  certs init --dir pki
  certs init --dir pki --gateway-name gw.example.com --gateway-name 10.0.0.7 --days 365")]
    Init {
        #[command(flatten)]
        dir: DirArg,
        /// Another DNS name or IP address for the gateway certificate (repeatable); the
        /// first one is also its subject CN.
        #[arg(long = "gateway-name", value_name = "NAME")]
        gateway_names: Vec<String>,
        /// Validity of the gateway certificate, in days.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_LEAF_DAYS, value_parser = days_parser())]
        days: u16,
        /// Validity of the CA certificate, in days.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_CA_DAYS, value_parser = days_parser())]
        ca_days: u16,
        /// Time until the CRL's nextUpdate, in days.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_CRL_DAYS, value_parser = days_parser())]
        crl_days: u16,
        /// Subject common name of the CA.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_CA_NAME)]
        ca_name: String,
        /// Replace an existing CA. Every certificate the old CA issued stops working.
        #[arg(long)]
        force: bool,
    },
    /// Issue a new gateway certificate with the existing CA (to renew it or change names).
    #[command(after_help = "\
Example:
  certs gateway --dir pki --gateway-name gw.example.com --force")]
    Gateway {
        #[command(flatten)]
        dir: DirArg,
        /// Another DNS name or IP address (repeatable); the first is also the subject CN.
        #[arg(long = "gateway-name", value_name = "NAME")]
        gateway_names: Vec<String>,
        /// Validity in days (cut to the CA's).
        #[arg(long, value_name = "N", default_value_t = DEFAULT_LEAF_DAYS, value_parser = days_parser())]
        days: u16,
        /// Replace the existing gateway.pem and gateway.key.pem.
        #[arg(long)]
        force: bool,
    },
    /// Issue one device certificate and key into DIR/devices/ID/.
    #[command(after_help = "\
ID is the device's identity (the certificate's subject CN): 1 to 64 characters from
A-Z a-z 0-9 . _ -

Example:
  certs device --dir pki sensor-01 --days 365")]
    Device {
        #[command(flatten)]
        dir: DirArg,
        /// The device id.
        #[arg(value_name = "ID")]
        id: String,
        /// Validity in days (cut to the CA's).
        #[arg(long, value_name = "N", default_value_t = DEFAULT_LEAF_DAYS, value_parser = days_parser())]
        days: u16,
        /// Replace an existing device's key and certificate. The old certificate stays
        /// valid until it expires unless you revoke it (`certs revoke` first, or later
        /// with `certs revoke --serial`).
        #[arg(long)]
        force: bool,
    },
    /// Issue many device certificates at once (e.g. for simulated devices).
    #[command(after_help = "\
Ids are PREFIX followed by a counter from --start, zero-padded to at least 4 digits so
they sort: --prefix sim- --count 1000 makes sim-0000 ... sim-0999; --count 20000 makes
sim-00000 ... sim-19999.

If any of the devices exists, nothing is issued unless you pass --skip-existing (issue
only the missing ones, e.g. to finish an interrupted run) or --force (replace them).

Examples:
  certs devices --dir pki --prefix sim- --count 1000
  certs devices --dir pki --prefix sim- --start 1000 --count 500")]
    Devices {
        #[command(flatten)]
        dir: DirArg,
        /// Id prefix, e.g. `sim-` (may be empty).
        #[arg(long, value_name = "PREFIX")]
        prefix: String,
        /// How many devices (1 to 1,000,000).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        count: u64,
        /// First counter value.
        #[arg(long, value_name = "N", default_value_t = 0)]
        start: u64,
        /// Validity in days (cut to the CA's).
        #[arg(long, value_name = "N", default_value_t = DEFAULT_LEAF_DAYS, value_parser = days_parser())]
        days: u16,
        /// Leave existing devices alone and issue the missing ones.
        #[arg(long, conflicts_with = "force")]
        skip_existing: bool,
        /// Replace existing devices' keys and certificates.
        #[arg(long)]
        force: bool,
    },
    /// Revoke a device's certificate: add its serial to DIR/crl.pem.
    #[command(after_help = "\
Keeps every earlier revocation and increments the CRL number. Revoking an already
revoked certificate changes nothing. The gateway reloads crl.pem without a restart.

Examples:
  certs revoke --dir pki sensor-01
  certs revoke --dir pki --serial 4F3A...   # e.g. a certificate replaced with --force")]
    Revoke {
        #[command(flatten)]
        dir: DirArg,
        /// The device whose current certificate to revoke.
        #[arg(value_name = "ID", required_unless_present = "serial")]
        id: Option<String>,
        /// Revoke this serial number (hex) instead of a device's current certificate.
        #[arg(long, value_name = "HEX", conflicts_with = "id")]
        serial: Option<String>,
        /// Time until the new CRL's nextUpdate, in days.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_CRL_DAYS, value_parser = days_parser())]
        crl_days: u16,
    },
    /// Re-sign DIR/crl.pem with a fresh validity period, keeping its revocations.
    #[command(after_help = "\
OpenSSL refuses a CRL after its nextUpdate; run this before then (every `revoke` also
re-signs it).

Example:
  certs crl --dir pki --crl-days 30")]
    Crl {
        #[command(flatten)]
        dir: DirArg,
        /// Time until the CRL's nextUpdate, in days.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_CRL_DAYS, value_parser = days_parser())]
        crl_days: u16,
    },
    /// List device certificates: id, serial, expiry, status.
    #[command(after_help = "\
Status is `valid`, `revoked`, `expired`, or `other-ca` (signed by a CA this directory no
longer has, e.g. after `init --force`).

Example:
  certs list --dir pki --json")]
    List {
        #[command(flatten)]
        dir: DirArg,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn days_parser() -> clap::builder::RangedI64ValueParser<u16> {
    clap::value_parser!(u16).range(1..)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let hint_for = HintContext::of(&cli.command);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            print_error(&err);
            if let Some(hint) = err
                .downcast_ref::<DirError>()
                .and_then(|e| hint(e, &hint_for))
            {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

fn print_error(err: &anyhow::Error) {
    let mut shown = err.to_string();
    eprintln!("error: {shown}");
    // Our messages usually embed their cause already; print only causes that add something.
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !shown.contains(&text) {
            eprintln!("  caused by: {text}");
            shown.push_str(&text);
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Init {
            dir,
            gateway_names,
            days,
            ca_days,
            crl_days,
            ca_name,
            force,
        } => {
            let pki = PkiDir::new(dir.dir);
            let made = pki.init(&InitOptions {
                ca_common_name: ca_name,
                gateway_names: gateway_names.clone(),
                ca_validity: Validity::days(ca_days),
                gateway_validity: Validity::days(days),
                crl_validity: Validity::days(crl_days),
                force,
            })?;
            let names = display_names(&gateway_names);
            println!(
                "Created CA {:?} in {}, valid until {}",
                made.ca.common_name(),
                pki.root().display(),
                date(made.ca.validity().not_after())
            );
            let rows = [
                (
                    pki.ca_cert_path(),
                    "CA certificate: the trust anchor for the gateway and the devices".to_owned(),
                ),
                (
                    pki.ca_key_path(),
                    "CA private key (mode 0600): keep it safe, ideally offline".to_owned(),
                ),
                (
                    pki.gateway_cert_path(),
                    format!(
                        "gateway certificate for {} (serial {}, valid until {})",
                        names.join(", "),
                        made.gateway_serial,
                        date(made.gateway_validity.not_after())
                    ),
                ),
                (
                    pki.gateway_key_path(),
                    "gateway private key (mode 0600)".to_owned(),
                ),
                (
                    pki.crl_path(),
                    "certificate revocation list, empty".to_owned(),
                ),
            ];
            let width = rows
                .iter()
                .map(|(p, _)| p.display().to_string().len())
                .max()
                .unwrap_or(0);
            for (path, what) in rows {
                println!("  {:width$}  {what}", path.display().to_string());
            }
            if made.stale_devices > 0 {
                eprintln!(
                    "warning: the {} device certificate(s) under {} were issued by the old CA and are no longer trusted; re-issue them with `certs device --force` or `certs devices --force`",
                    made.stale_devices,
                    pki.devices_path().display()
                );
            }
            println!("Next: certs device --dir {} <ID>", shell_path(pki.root()));
        }
        Command::Gateway {
            dir,
            gateway_names,
            days,
            force,
        } => {
            let pki = PkiDir::new(dir.dir);
            let ca = pki.load_ca()?;
            let (serial, validity) =
                pki.issue_gateway(&ca, &gateway_names, Validity::days(days), force)?;
            let names = display_names(&gateway_names);
            println!(
                "Issued gateway certificate for {} (serial {serial}, valid until {}): {}, {}",
                names.join(", "),
                date(validity.not_after()),
                pki.gateway_cert_path().display(),
                pki.gateway_key_path().display()
            );
        }
        Command::Device {
            dir,
            id,
            days,
            force,
        } => {
            let pki = PkiDir::new(dir.dir);
            let ca = pki.load_ca()?;
            let existing = if force {
                Existing::Replace
            } else {
                Existing::Refuse
            };
            let issued = pki
                .issue_device(&ca, &id, Validity::days(days), existing)?
                .context("the device exists")?;
            println!(
                "Issued device {} (serial {}, valid until {}): {}/{{cert.pem,cert.der,key.pem,key.der}}",
                issued.id,
                issued.serial,
                date(issued.validity.not_after()),
                issued.path.display()
            );
            let revoked = revoked_serials(&pki, &ca);
            if let Some(old) = issued.replaced.filter(|old| !revoked.contains(old)) {
                eprintln!(
                    "warning: the replaced certificate (serial {old}) stays valid until it expires; to revoke it: certs revoke --dir {} --serial {old}",
                    shell_path(pki.root())
                );
            }
        }
        Command::Devices {
            dir,
            prefix,
            count,
            start,
            days,
            skip_existing,
            force,
        } => {
            let pki = PkiDir::new(dir.dir);
            let ca = pki.load_ca()?;
            let ids = sequential_ids(&prefix, start, count).map_err(DirError::from)?;
            let existing = match (skip_existing, force) {
                (true, _) => Existing::Skip,
                (_, true) => Existing::Replace,
                _ => Existing::Refuse,
            };
            let step = (ids.len() / 10).max(1);
            let progress = |done: usize, total: usize| {
                if total >= 100 && (done.is_multiple_of(step) || done == total) {
                    eprintln!("issued {done}/{total}");
                }
            };
            let began = Instant::now();
            let report = pki.issue_devices(&ca, &ids, Validity::days(days), existing, &progress)?;
            let (first, last) = (
                ids.first().map_or("", String::as_str),
                ids.last().map_or("", String::as_str),
            );
            println!(
                "Issued {} device certificate(s) ({first} ... {last}) in {:.1} s under {}{}",
                report.issued,
                began.elapsed().as_secs_f64(),
                pki.devices_path().display(),
                if report.skipped > 0 {
                    format!("; skipped {} that already existed", report.skipped)
                } else {
                    String::new()
                }
            );
            let revoked = revoked_serials(&pki, &ca);
            let replaced: Vec<_> = report
                .replaced
                .iter()
                .filter(|(_, old)| !revoked.contains(old))
                .collect();
            if !replaced.is_empty() {
                eprintln!(
                    "warning: {} replaced certificate(s) stay valid until they expire; revoke each with `certs revoke --dir {} --serial HEX`. Old serials:",
                    replaced.len(),
                    shell_path(pki.root())
                );
                for (id, serial) in replaced {
                    eprintln!("  {id} {serial}");
                }
            }
        }
        Command::Revoke {
            dir,
            id,
            serial,
            crl_days,
        } => {
            let pki = PkiDir::new(dir.dir);
            let ca = pki.load_ca()?;
            let crl_validity = Validity::days(crl_days);
            let (what, revocation) = match (id, serial) {
                (_, Some(hex)) => {
                    let serial = Serial::from_hex(&hex)?;
                    (
                        format!("serial {serial}"),
                        pki.revoke_serial(&ca, serial, crl_validity)?,
                    )
                }
                (Some(id), None) => {
                    let r = pki.revoke_device(&ca, &id, crl_validity)?;
                    (format!("device {id} (serial {})", r.serial), r)
                }
                (None, None) => anyhow::bail!("give a device ID or --serial HEX"),
            };
            if revocation.newly_revoked {
                println!(
                    "Revoked {what}: {} now lists {} serial(s), CRL number {}",
                    pki.crl_path().display(),
                    revocation.revoked_count,
                    revocation.crl_number
                );
            } else {
                println!(
                    "{what} was already revoked in {} (CRL number {}); nothing changed",
                    pki.crl_path().display(),
                    revocation.crl_number
                );
            }
        }
        Command::Crl { dir, crl_days } => {
            let pki = PkiDir::new(dir.dir);
            let ca = pki.load_ca()?;
            let crl = pki.refresh_crl(&ca, Validity::days(crl_days))?;
            println!(
                "Re-signed {}: CRL number {}, {} revoked serial(s), next update {}",
                pki.crl_path().display(),
                crl.number,
                crl.revoked.len(),
                crl.next_update.map_or_else(|| "-".to_owned(), date)
            );
        }
        Command::List { dir, json } => {
            let pki = PkiDir::new(dir.dir);
            let records = pki.list_devices()?;
            if json {
                let rows: Vec<JsonRecord<'_>> = records
                    .iter()
                    .map(|r| JsonRecord {
                        id: &r.id,
                        common_name: r.common_name.as_deref(),
                        serial: r.serial.to_hex(),
                        not_before: date(r.validity.not_before()),
                        not_after: date(r.validity.not_after()),
                        revoked: r.revoked,
                        expired: r.expired,
                        signed_by_ca: r.signed_by_ca,
                        status: status(r),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                let width = records.iter().map(|r| r.id.len()).max().unwrap_or(2).max(2);
                println!("{:width$}  {:32}  {:20}  STATUS", "ID", "SERIAL", "EXPIRES");
                for r in &records {
                    let mut status = status(r);
                    if r.common_name.as_deref() != Some(r.id.as_str()) {
                        status.push_str(", CN differs from id");
                    }
                    println!(
                        "{:width$}  {:32}  {:20}  {status}",
                        r.id,
                        r.serial.to_hex(),
                        date(r.validity.not_after())
                    );
                }
                let revoked = records.iter().filter(|r| r.revoked).count();
                println!("{} device(s), {revoked} revoked", records.len());
            }
        }
    }
    Ok(())
}

/// One device in `certs list --json`.
#[derive(serde::Serialize)]
struct JsonRecord<'a> {
    id: &'a str,
    common_name: Option<&'a str>,
    /// Upper-case hex, as `openssl x509 -serial` prints it.
    serial: String,
    /// RFC 3339.
    not_before: String,
    /// RFC 3339.
    not_after: String,
    revoked: bool,
    expired: bool,
    signed_by_ca: bool,
    /// `valid`, `revoked`, `expired`, `revoked, expired` or `other-ca`.
    status: String,
}

fn status(r: &certs::dir::DeviceRecord) -> String {
    if !r.signed_by_ca {
        return "other-ca".to_owned();
    }
    match (r.revoked, r.expired) {
        (true, true) => "revoked, expired",
        (true, false) => "revoked",
        (false, true) => "expired",
        (false, false) => "valid",
    }
    .to_owned()
}

/// The serials `crl.pem` lists (none if it cannot be read: then we warn too often, not
/// too rarely).
fn revoked_serials(pki: &PkiDir, ca: &certs::Ca) -> Vec<Serial> {
    pki.read_crl(ca)
        .ok()
        .flatten()
        .map(|crl| crl.revoked.into_iter().map(|e| e.serial).collect())
        .unwrap_or_default()
}

fn date(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// The gateway certificate's names as the library puts them in the SAN (defaults first,
/// duplicates dropped).
fn display_names(extra: &[String]) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for name in GATEWAY_DEFAULT_NAMES
        .iter()
        .copied()
        .chain(extra.iter().map(String::as_str))
    {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            names.push(name);
        }
    }
    names
}

/// The path as the user would type it back (quoted if it has spaces).
fn shell_path(path: &Path) -> String {
    let s = path.display().to_string();
    if s.contains(char::is_whitespace) {
        format!("'{s}'")
    } else {
        s
    }
}

/// What the hints need to know about the command that failed.
struct HintContext {
    command: &'static str,
    dir: String,
}

impl HintContext {
    fn of(command: &Command) -> Self {
        let (name, dir) = match command {
            Command::Init { dir, .. } => ("init", dir),
            Command::Gateway { dir, .. } => ("gateway", dir),
            Command::Device { dir, .. } => ("device", dir),
            Command::Devices { dir, .. } => ("devices", dir),
            Command::Revoke { dir, .. } => ("revoke", dir),
            Command::Crl { dir, .. } => ("crl", dir),
            Command::List { dir, .. } => ("list", dir),
        };
        Self {
            command: name,
            dir: shell_path(&dir.dir),
        }
    }
}

/// What to do about an error, in the CLI's terms.
fn hint(err: &DirError, ctx: &HintContext) -> Option<String> {
    let dir = &ctx.dir;
    Some(match err {
        DirError::Missing(_) => {
            format!("create it with `certs init --dir {dir}`, or point --dir at the directory holding ca.pem")
        }
        DirError::NoCa { .. } => {
            format!("run `certs init --dir {dir}` first, or point --dir at the directory holding ca.pem")
        }
        DirError::CaExists { .. } => {
            "pass --force to replace the CA; every certificate the old CA issued will stop working"
                .to_owned()
        }
        DirError::Exists(_) if ctx.command == "gateway" => {
            "pass --force to replace the gateway certificate and key".to_owned()
        }
        DirError::Exists(_) => {
            "pass --force to issue a new key and certificate; the old certificate stays valid until it expires unless you revoke it first (`certs revoke`)".to_owned()
        }
        DirError::DevicesExist { .. } => {
            "pass --skip-existing to issue only the missing ones, or --force to replace them".to_owned()
        }
        DirError::Pki(Error::InvalidDeviceId { .. }) => {
            "a device id is 1 to 64 characters from A-Z a-z 0-9 . _ - (and not `.` or `..`)".to_owned()
        }
        DirError::Pki(Error::InvalidName { .. }) => {
            "a gateway name is a DNS name (e.g. gw.example.com) or an IP address (e.g. 10.0.0.7)".to_owned()
        }
        DirError::Pki(Error::InvalidValidity { .. }) => {
            format!("the CA has expired or is about to; make a new one with `certs init --dir {dir} --force`")
        }
        DirError::NoSuchDevice { .. } => format!("`certs list --dir {dir}` shows the devices"),
        DirError::BadFile {
            path,
            source: Error::NotSignedByCa { .. },
        } if path.ends_with(certs::dir::CRL_FILE) => format!(
            "crl.pem was signed by another CA; move it away and run `certs crl --dir {dir}` to start an empty CRL (its revocations no longer matter: the old CA is not trusted)"
        ),
        DirError::BadFile {
            source: Error::NotSignedByCa { .. },
            ..
        } => "that certificate was issued by an earlier CA (before `certs init --force`?), which the gateway no longer trusts; re-issue the device with --force".to_owned(),
        DirError::Partial { .. } => {
            "the devices issued so far are complete; rerun the same command with --skip-existing to issue the rest".to_owned()
        }
        _ => return None,
    })
}

//! `certs`: makes and maintains the gateway's PKI directory. All logic is in the
//! library (`certs::dir`); this file parses arguments and prints results and hints.

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use certs::dir::{
    DEFAULT_CA_DAYS, DEFAULT_CA_NAME, DEFAULT_CRL_DAYS, DEFAULT_LEAF_DAYS, DirError, Existing,
    InitOptions, PkiDir, Renewed, sequential_ids,
};
use certs::{Ca, Crl, Error, GATEWAY_DEFAULT_NAMES, Serial, Validity};
use clap::{Args, Parser, Subcommand};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const AFTER_HELP: &str = "\
Layout of DIR:
  ca.pem                        the CA certificate: the trust anchor
  ca/ca.key.pem                 the CA private key (DIR/ca/ mode 0700, key 0600):
                                only signing needs it; move DIR/ca/ offline
  gateway.pem, gateway.key.pem  the gateway's TLS server certificate and key
  crl.pem                       revoked device serials, signed by the CA
  devices/ID/cert.pem, cert.der the device's client certificate (CN = ID)
  devices/ID/key.pem            its private key, PKCS#8 PEM (rustls, openssl)
  devices/ID/key.der            the same key, SEC1 DER (embedded-tls)
  release/release.key.pem       the firmware release key (release-key; 0700/0600)
  release.pub.pem, .pub.bin     its public key: PEM, and 65 bytes SEC1 for firmware
The gateway reads ca.pem, crl.pem, gateway.pem and gateway.key.pem; a device needs
ca.pem and its devices/ID/. (Directories made before DIR/ca/ existed keep the CA key
at DIR/ca.key.pem; it is still read there.)

Examples:
  certs init --dir pki --gateway-name gw.example.com --gateway-name 192.168.1.10
  certs device --dir pki sensor-01
  certs devices --dir pki --prefix sim- --count 1000     # sim-0000 ... sim-0999
  certs renew --dir pki sensor-01
  certs revoke --dir pki sensor-01
  certs crl --dir pki --refresh
  certs list --dir pki --json
  certs release-key --dir pki                            # the firmware signing key
  certs sign-firmware --dir pki --version 1.3.0 fw.bin   # writes fw.bin.sig.json

--dir can also be set with the CERTS_DIR environment variable, --ca-key with
CERTS_CA_KEY.";

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

#[derive(Args)]
struct CaKeyArg {
    /// The CA private key, if it is not in DIR/ca/ (e.g. kept offline on removable
    /// media).
    #[arg(long, value_name = "PATH", env = "CERTS_CA_KEY")]
    ca_key: Option<PathBuf>,
}

impl CaKeyArg {
    fn load(&self, pki: &PkiDir) -> Result<Ca, DirError> {
        match &self.ca_key {
            Some(path) => pki.load_ca_with_key(path),
            None => pki.load_ca(),
        }
    }

    /// Every signing command needs both, and the key may live outside DIR.
    fn open(&self, dir: DirArg) -> Result<(PkiDir, Ca), DirError> {
        let pki = PkiDir::new(dir.dir);
        let ca = self.load(&pki)?;
        Ok((pki, ca))
    }
}

/// `--days` for the commands that issue a leaf certificate with the existing CA. `init`
/// keeps its own `--days`: there it also names which of its three certificates it sets.
#[derive(Args)]
struct LeafDaysArg {
    /// Validity in days (cut to the CA's).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LEAF_DAYS, value_parser = days_parser())]
    days: u16,
}

impl LeafDaysArg {
    fn validity(&self) -> Validity {
        Validity::days(self.days)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create DIR (if needed) with a new CA, the gateway certificate and an empty CRL.
    #[command(after_help = "\
Writes DIR/ca.pem, DIR/ca/ca.key.pem, DIR/gateway.pem, DIR/gateway.key.pem, DIR/crl.pem.
The gateway needs only ca.pem, crl.pem, gateway.pem and gateway.key.pem; the CA key in
DIR/ca/ is needed only to sign (issue, renew, revoke, re-sign the CRL): move DIR/ca/
offline and bring it back, or name the key with --ca-key, when you sign.

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
        #[command(flatten)]
        days: LeafDaysArg,
        /// Replace the existing gateway.pem and gateway.key.pem.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        ca_key: CaKeyArg,
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
        #[command(flatten)]
        days: LeafDaysArg,
        /// Replace an existing device's key and certificate. The old certificate stays
        /// valid until it expires unless you revoke it (`certs revoke` first, or later
        /// with `certs revoke --serial`). To keep the device and its history, see
        /// `certs renew`.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        ca_key: CaKeyArg,
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
        #[command(flatten)]
        days: LeafDaysArg,
        /// Leave existing devices alone and issue the missing ones.
        #[arg(long, conflicts_with = "force")]
        skip_existing: bool,
        /// Replace existing devices' keys and certificates.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        ca_key: CaKeyArg,
    },
    /// Renew a device's certificate (or the gateway's): same CN, new serial and key.
    #[command(after_help = "\
The new certificate has the same subject (CN = ID; for the gateway, the same names), a
new serial number, a new validity period and, unless --keep-key, a new private key.
The files are replaced in place: DIR/devices/ID/ (all four files at once), or
DIR/gateway.pem and DIR/gateway.key.pem.

The previous certificate is NOT revoked: it stays valid until it expires, so a device
still holding it keeps connecting until it has the new one. Then revoke the old one
with the command this prints (`certs revoke --serial OLD`). The gateway loads a renewed
gateway certificate on SIGHUP.

Examples:
  certs renew --dir pki sensor-01
  certs renew --dir pki sensor-01 --days 365 --keep-key
  certs renew --dir pki --gateway")]
    Renew {
        #[command(flatten)]
        dir: DirArg,
        /// The device to renew.
        #[arg(value_name = "ID", required_unless_present = "gateway")]
        id: Option<String>,
        /// Renew the gateway certificate (same names) instead of a device's.
        #[arg(long, conflicts_with = "id")]
        gateway: bool,
        #[command(flatten)]
        days: LeafDaysArg,
        /// Keep the private key and issue only a new certificate for it (for a device
        /// whose key cannot change, e.g. one generated in its secure element).
        #[arg(long)]
        keep_key: bool,
        #[command(flatten)]
        ca_key: CaKeyArg,
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
        #[command(flatten)]
        ca_key: CaKeyArg,
    },
    /// Re-sign DIR/crl.pem with a new nextUpdate, keeping its revocations.
    #[command(after_help = "\
The CRL keeps every revoked serial (and its revocation date) and gets the next CRL
number, thisUpdate = now and nextUpdate = now + --days. OpenSSL refuses a CRL after its
nextUpdate; run this before then (every `revoke` also re-signs it). `certs list` shows
the current nextUpdate. The gateway reloads crl.pem on SIGHUP.

Example:
  certs crl --dir pki --refresh --days 30")]
    Crl {
        #[command(flatten)]
        dir: DirArg,
        /// Re-sign the CRL. This is what `certs crl` does; the flag only says so.
        #[arg(long)]
        refresh: bool,
        /// Time until the CRL's nextUpdate, in days.
        #[arg(long = "days", visible_alias = "crl-days", value_name = "N", default_value_t = DEFAULT_CRL_DAYS, value_parser = days_parser())]
        crl_days: u16,
        #[command(flatten)]
        ca_key: CaKeyArg,
    },
    /// List device certificates (id, serial, expiry, status) and the CRL's next update.
    #[command(after_help = "\
Status is `valid`, `revoked`, `expired`, or `other-ca` (signed by a CA this directory no
longer has, e.g. after `init --force`). Needs only ca.pem and crl.pem, not the CA key.

--json prints one object:
  {\"crl\": {\"number\", \"this_update\", \"next_update\", \"expired\", \"revoked_serials\"} or null,
   \"devices\": [{\"id\", \"common_name\", \"serial\", \"not_before\", \"not_after\",
                \"revoked\", \"expired\", \"signed_by_ca\", \"status\"}, ...]}
Times are RFC 3339, serials upper-case hex.

Example:
  certs list --dir pki --json")]
    List {
        #[command(flatten)]
        dir: DirArg,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make the firmware release key (ECDSA P-256) that signs firmware images.
    #[command(after_help = "\
Writes DIR/release/release.key.pem (0600, in a 0700 directory: keep it offline like the
CA key), DIR/release.pub.pem (for the gateway) and DIR/release.pub.bin (65 bytes, SEC1
uncompressed: what a firmware includes to check images, see device_client::firmware).
Refuses to replace an existing key: devices in the field trust it.

Example:
  certs release-key --dir pki")]
    ReleaseKey {
        #[command(flatten)]
        dir: DirArg,
    },
    /// Sign a firmware image with the release key: writes IMAGE.sig.json.
    #[command(after_help = "\
The signature is ECDSA P-256 / SHA-256 over the image's manifest: a fixed prefix, the
version, the size and the SHA-256 of the image (device_client::firmware). A device
checks it before it marks the image for its bootloader, so an image changed in any
byte, or offered under another version, is refused. IMAGE.sig.json holds
{\"version\", \"size\", \"sha256\", \"signature\"} (hex).

Example:
  certs sign-firmware --dir pki --version 1.3.0 firmware.bin")]
    SignFirmware {
        #[command(flatten)]
        dir: DirArg,
        /// The image's version (at most 32 bytes; what the device reports once it runs it).
        #[arg(long)]
        version: String,
        /// The release key, if it is not DIR/release/release.key.pem.
        #[arg(long, value_name = "PATH")]
        release_key: Option<PathBuf>,
        /// Where to write the signature (default: IMAGE.sig.json).
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// The image file.
        image: PathBuf,
    },
}

fn days_parser() -> clap::builder::RangedI64ValueParser<u16> {
    clap::value_parser!(u16).range(1..)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let hint_for = HintContext::of(&cli.command);
    let mut out = Stdout::new();
    let result = run(cli.command, &mut out)
        .and_then(|()| out.flush().context("cannot write to standard output"));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            print_error(&err);
            if let Some(hint) = err
                .downcast_ref::<DirError>()
                .and_then(|e| hint(e, &hint_for))
            {
                warn(format_args!("hint: {hint}"));
            }
            ExitCode::FAILURE
        }
    }
}

/// Standard output that may go away: `certs list | head -1` closes the pipe after one
/// line. Then the rest of the report has no reader, which is no failure of the command
/// (its work is done, or its listing was cut short on purpose): writes after a broken
/// pipe are dropped, and the command finishes and exits as it would have. Other write
/// errors (a full disk under `> file`) are errors.
///
/// Rust ignores SIGPIPE, so a closed pipe shows up here as `BrokenPipe`; `println!`
/// would panic on it.
struct Stdout {
    inner: io::StdoutLock<'static>,
    closed: bool,
}

impl Stdout {
    fn new() -> Self {
        Self {
            inner: io::stdout().lock(),
            closed: false,
        }
    }

    fn absorb(&mut self, result: io::Result<()>) -> io::Result<()> {
        match result {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            other => other,
        }
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.closed {
            return Ok(buf.len());
        }
        match self.inner.write(buf) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(buf.len())
            }
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let result = self.inner.flush();
        self.absorb(result)
    }
}

/// One line to standard error. A closed standard error is ignored (`eprintln!` would
/// panic): there is nobody left to tell, and the exit status still says how it went.
fn warn(line: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{line}");
}

fn print_error(err: &anyhow::Error) {
    let mut shown = err.to_string();
    warn(format_args!("error: {shown}"));
    // Our messages usually embed their cause already; print only causes that add something.
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !shown.contains(&text) {
            warn(format_args!("  caused by: {text}"));
            shown.push_str(&text);
        }
    }
}

fn run(command: Command, out: &mut impl Write) -> anyhow::Result<()> {
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
            writeln!(
                out,
                "Created CA {:?} in {}, valid until {}",
                made.ca.common_name(),
                pki.root().display(),
                date(made.ca.validity().not_after())
            )?;
            let rows = [
                (
                    pki.ca_cert_path(),
                    "CA certificate: the trust anchor for the gateway and the devices".to_owned(),
                ),
                (
                    pki.ca_key_path(),
                    "CA private key (mode 0600, in a 0700 directory)".to_owned(),
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
                writeln!(out, "  {:width$}  {what}", path.display().to_string())?;
            }
            if made.stale_devices > 0 {
                warn(format_args!(
                    "warning: the {} device certificate(s) under {} were issued by the old CA and are no longer trusted; re-issue them with `certs device --force` or `certs devices --force`",
                    made.stale_devices,
                    pki.devices_path().display()
                ));
            }
            let root = shell_path(pki.root());
            writeln!(
                out,
                "The gateway needs only {root}/ca.pem, crl.pem, gateway.pem and gateway.key.pem. \
                 Only signing needs the CA key: move {root}/ca/ offline when you are done, and \
                 bring it back (or pass --ca-key PATH) to issue, renew or revoke."
            )?;
            writeln!(out, "Next: certs device --dir {root} <ID>")?;
        }
        Command::Gateway {
            dir,
            gateway_names,
            days,
            force,
            ca_key,
        } => {
            let (pki, ca) = ca_key.open(dir)?;
            let (serial, validity) =
                pki.issue_gateway(&ca, &gateway_names, days.validity(), force)?;
            let names = display_names(&gateway_names);
            writeln!(
                out,
                "Issued gateway certificate for {} (serial {serial}, valid until {}): {}, {}",
                names.join(", "),
                date(validity.not_after()),
                pki.gateway_cert_path().display(),
                pki.gateway_key_path().display()
            )?;
        }
        Command::Device {
            dir,
            id,
            days,
            force,
            ca_key,
        } => {
            let (pki, ca) = ca_key.open(dir)?;
            let existing = if force {
                Existing::Replace
            } else {
                Existing::Refuse
            };
            let issued = pki
                .issue_device(&ca, &id, days.validity(), existing)?
                .context("the device exists")?;
            writeln!(
                out,
                "Issued device {} (serial {}, valid until {}): {}/{{cert.pem,cert.der,key.pem,key.der}}",
                issued.id,
                issued.serial,
                date(issued.validity.not_after()),
                issued.path.display()
            )?;
            let revoked = revoked_serials(&pki, &ca);
            if let Some(old) = issued.replaced.filter(|old| !revoked.contains(old)) {
                warn(format_args!(
                    "warning: the replaced certificate (serial {old}) stays valid until it expires; to revoke it: certs revoke --dir {} --serial {old}",
                    shell_path(pki.root())
                ));
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
            ca_key,
        } => {
            let (pki, ca) = ca_key.open(dir)?;
            let ids = sequential_ids(&prefix, start, count).map_err(DirError::from)?;
            let existing = match (skip_existing, force) {
                (true, _) => Existing::Skip,
                (_, true) => Existing::Replace,
                _ => Existing::Refuse,
            };
            let step = (ids.len() / 10).max(1);
            let progress = |done: usize, total: usize| {
                if total >= 100 && (done.is_multiple_of(step) || done == total) {
                    warn(format_args!("issued {done}/{total}"));
                }
            };
            let began = Instant::now();
            let report = pki.issue_devices(&ca, &ids, days.validity(), existing, &progress)?;
            let (first, last) = (
                ids.first().map_or("", String::as_str),
                ids.last().map_or("", String::as_str),
            );
            writeln!(
                out,
                "Issued {} device certificate(s) ({first} ... {last}) in {:.1} s under {}{}",
                report.issued,
                began.elapsed().as_secs_f64(),
                pki.devices_path().display(),
                if report.skipped > 0 {
                    format!("; skipped {} that already existed", report.skipped)
                } else {
                    String::new()
                }
            )?;
            let revoked = revoked_serials(&pki, &ca);
            let replaced: Vec<_> = report
                .replaced
                .iter()
                .filter(|(_, old)| !revoked.contains(old))
                .collect();
            if !replaced.is_empty() {
                warn(format_args!(
                    "warning: {} replaced certificate(s) stay valid until they expire; revoke each with `certs revoke --dir {} --serial HEX`. Old serials:",
                    replaced.len(),
                    shell_path(pki.root())
                ));
                for (id, serial) in replaced {
                    warn(format_args!("  {id} {serial}"));
                }
            }
        }
        Command::Renew {
            dir,
            id,
            gateway,
            days,
            keep_key,
            ca_key,
        } => {
            let (pki, ca) = ca_key.open(dir)?;
            let validity = days.validity();
            let (what, renewed) = match (gateway, id) {
                (true, _) => (
                    "gateway certificate".to_owned(),
                    pki.renew_gateway(&ca, validity, keep_key)?,
                ),
                (false, Some(id)) => (
                    format!("device {id}"),
                    pki.renew_device(&ca, &id, validity, keep_key)?,
                ),
                (false, None) => anyhow::bail!("give a device ID or --gateway"),
            };
            report_renewal(out, &pki, &what, gateway, &renewed)?;
        }
        Command::Revoke {
            dir,
            id,
            serial,
            crl_days,
            ca_key,
        } => {
            let (pki, ca) = ca_key.open(dir)?;
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
                writeln!(
                    out,
                    "Revoked {what}: {} now lists {} serial(s), CRL number {}",
                    pki.crl_path().display(),
                    revocation.revoked_count,
                    revocation.crl_number
                )?;
            } else {
                writeln!(
                    out,
                    "{what} was already revoked in {} (CRL number {}); nothing changed",
                    pki.crl_path().display(),
                    revocation.crl_number
                )?;
            }
        }
        Command::Crl {
            dir,
            // Re-signing is what this command does, with or without the flag.
            refresh: _,
            crl_days,
            ca_key,
        } => {
            let (pki, ca) = ca_key.open(dir)?;
            let crl = pki.refresh_crl(&ca, Validity::days(crl_days))?;
            writeln!(
                out,
                "Re-signed {}: CRL number {}, {} revoked serial(s), next update {}",
                pki.crl_path().display(),
                crl.number,
                crl.revoked.len(),
                crl.next_update.map_or_else(|| "-".to_owned(), date)
            )?;
        }
        Command::ReleaseKey { dir } => {
            let pki = PkiDir::new(dir.dir);
            pki.create_release_key()?;
            let (pub_pem, pub_bin) = pki.release_public_paths();
            writeln!(
                out,
                "Created the release key {} (keep it offline); public key {} and {}",
                pki.release_key_path().display(),
                pub_pem.display(),
                pub_bin.display()
            )?;
        }
        Command::SignFirmware {
            dir,
            version,
            release_key,
            out: sig_path,
            image,
        } => {
            let pki = PkiDir::new(dir.dir);
            let key = pki.load_release_key(release_key.as_deref())?;
            let bytes = std::fs::read(&image)
                .with_context(|| format!("cannot read the image {}", image.display()))?;
            let signed = key.sign_image(&version, &bytes)?;
            let sig_path = sig_path.unwrap_or_else(|| {
                let mut name = image.clone().into_os_string();
                name.push(".sig.json");
                PathBuf::from(name)
            });
            let text = serde_json::to_string_pretty(&signed)? + "\n";
            std::fs::write(&sig_path, text)
                .with_context(|| format!("cannot write {}", sig_path.display()))?;
            writeln!(
                out,
                "Signed {} ({} bytes, SHA-256 {}) as version {}: {}",
                image.display(),
                signed.size,
                signed.sha256,
                signed.version,
                sig_path.display()
            )?;
        }
        Command::List { dir, json } => {
            let pki = PkiDir::new(dir.dir);
            let listing = pki.list()?;
            let records = &listing.devices;
            let now = OffsetDateTime::now_utc();
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
                let crl = listing.crl.as_ref().map(|crl| JsonCrl {
                    number: crl.number,
                    this_update: date(crl.this_update),
                    next_update: crl.next_update.map(date),
                    expired: crl_expired(crl, now),
                    revoked_serials: crl.revoked.iter().map(|e| e.serial.to_hex()).collect(),
                });
                serde_json::to_writer_pretty(&mut *out, &JsonListing { crl, devices: rows })?;
                writeln!(out)?;
            } else {
                let width = records.iter().map(|r| r.id.len()).max().unwrap_or(2).max(2);
                writeln!(
                    out,
                    "{:width$}  {:32}  {:20}  STATUS",
                    "ID", "SERIAL", "EXPIRES"
                )?;
                for r in records {
                    let mut status = status(r);
                    if r.common_name.as_deref() != Some(r.id.as_str()) {
                        status.push_str(", CN differs from id");
                    }
                    writeln!(
                        out,
                        "{:width$}  {:32}  {:20}  {status}",
                        r.id,
                        r.serial.to_hex(),
                        date(r.validity.not_after())
                    )?;
                }
                let revoked = records.iter().filter(|r| r.revoked).count();
                writeln!(out, "{} device(s), {revoked} revoked", records.len())?;
                writeln!(out, "{}", crl_line(&pki, listing.crl.as_ref(), now))?;
            }
        }
    }
    Ok(())
}

/// What `renew` prints: the new certificate, and what to do about the old one.
fn report_renewal(
    out: &mut impl Write,
    pki: &PkiDir,
    what: &str,
    gateway: bool,
    r: &Renewed,
) -> io::Result<()> {
    writeln!(
        out,
        "Renewed {what} (CN {}): serial {}, valid until {}, {}: {}",
        r.common_name,
        r.serial,
        date(r.validity.not_after()),
        if r.kept_key { "same key" } else { "new key" },
        r.path.display()
    )?;
    if gateway {
        writeln!(
            out,
            "The previous gateway certificate (serial {}) stays valid until {}; send the gateway SIGHUP to use the new one.",
            r.old_serial,
            date(r.old_validity.not_after())
        )
    } else {
        writeln!(
            out,
            "The previous certificate (serial {}) stays valid until {} unless revoked; once the device has the new one: certs revoke --dir {} --serial {}",
            r.old_serial,
            date(r.old_validity.not_after()),
            shell_path(pki.root()),
            r.old_serial
        )
    }
}

/// Whether OpenSSL (and a strict gateway) would refuse the CRL as out of date now.
fn crl_expired(crl: &Crl, now: OffsetDateTime) -> bool {
    crl.next_update.is_some_and(|next| next < now)
}

/// The CRL's state in one line, for `certs list`.
fn crl_line(pki: &PkiDir, crl: Option<&Crl>, now: OffsetDateTime) -> String {
    let dir = shell_path(pki.root());
    let Some(crl) = crl else {
        return format!(
            "CRL: none ({} is missing); `certs crl --dir {dir} --refresh` writes one",
            pki.crl_path().display()
        );
    };
    let head = format!(
        "CRL: number {}, {} revoked serial(s)",
        crl.number,
        crl.revoked.len()
    );
    match crl.next_update {
        None => format!("{head}, no next update"),
        Some(next) if next < now => format!(
            "{head}, next update {} HAS PASSED: re-sign it with `certs crl --dir {dir} --refresh`",
            date(next)
        ),
        Some(next) => format!(
            "{head}, next update {} (in {} days; `certs crl --dir {dir} --refresh` re-signs it)",
            date(next),
            (next - now).whole_days()
        ),
    }
}

/// `certs list --json`.
#[derive(serde::Serialize)]
struct JsonListing<'a> {
    /// `null` if there is no crl.pem.
    crl: Option<JsonCrl>,
    devices: Vec<JsonRecord<'a>>,
}

/// The CRL in `certs list --json`.
#[derive(serde::Serialize)]
struct JsonCrl {
    number: u64,
    /// RFC 3339.
    this_update: String,
    /// RFC 3339; `null` if the CRL has none (ours always do).
    next_update: Option<String>,
    /// The next update has passed: OpenSSL refuses the CRL.
    expired: bool,
    /// Upper-case hex.
    revoked_serials: Vec<String>,
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
            Command::Renew { dir, .. } => ("renew", dir),
            Command::List { dir, .. } => ("list", dir),
            Command::ReleaseKey { dir } => ("release-key", dir),
            Command::SignFirmware { dir, .. } => ("sign-firmware", dir),
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
        DirError::NoCaKey { .. } => format!(
            "only signing needs the CA key: if {dir}/ca/ is offline, bring it back or pass the key with --ca-key PATH (or CERTS_CA_KEY)"
        ),
        DirError::CaExists { .. } => {
            "pass --force to replace the CA; every certificate the old CA issued will stop working"
                .to_owned()
        }
        DirError::Exists(_) if ctx.command == "release-key" => {
            "devices in the field trust this key: it is never replaced; sign with it (`certs sign-firmware`)".to_owned()
        }
        DirError::Io { path, .. }
            if ctx.command == "sign-firmware" && path.ends_with("release.key.pem") =>
        {
            format!("make the release key first with `certs release-key --dir {dir}`, or name it with --release-key")
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
        DirError::Io { path, .. }
            if ctx.command == "renew" && path.ends_with(certs::dir::GATEWAY_CERT_FILE) =>
        {
            format!("there is no gateway certificate to renew: issue one with `certs gateway --dir {dir}`")
        }
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

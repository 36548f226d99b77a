//! A minimal device on a laptop: sends a temperature every 2 s (or every desired
//! `interval_s`, protocol version 2), answers `echo`.
//!
//! ```sh
//! certs init --dir certs && certs device --dir certs demo-1
//! gateway run &
//! cargo run -p device-client --features tokio --example host_device -- 127.0.0.1:7443 certs demo-1
//! ```
use device_client::driver::{App, run, tokio::*};
use device_client::machine::{Client, Config, Millis};
use device_client::proto::{Change, Command, CommandStatus, Desired, Name, Reading, Value};

struct Thermometer {
    next: Millis,
    /// Its one setting: seconds between readings.
    interval_s: u64,
}

impl App for Thermometer {
    fn next_wake(&self) -> Option<Millis> {
        Some(self.next)
    }

    fn on_wake<const R: usize, const O: usize>(&mut self, now: Millis, c: &mut Client<R, O>) {
        let temp = Reading::new(Name::from_static("temp_c"), Value::F32(21.5));
        if let Err(e) = c.send_telemetry(None, &[temp]) {
            eprintln!("not sent: {e}"); // the ring is full while the gateway is away
        }
        self.next = now + self.interval_s * 1_000;
    }

    /// `PUT /api/v1/devices/demo-1/state {"desired": {"interval_s": 10}}` lands here.
    fn on_desired<const R: usize, const O: usize>(
        &mut self,
        _now: Millis,
        c: &mut Client<R, O>,
        desired: &Desired<'_>,
    ) {
        if desired.base == 0 {
            self.interval_s = 2; // the whole document: start from the defaults
        }
        for change in &desired.changes {
            match change {
                Change::Set(r) if r.name.as_str() == "interval_s" => {
                    if let Some(s @ 1..=3600) = r.value.as_u64() {
                        self.interval_s = s;
                    }
                }
                Change::Unset(n) if n.as_str() == "interval_s" => self.interval_s = 2,
                _ => {} // settings this device does not have
            }
        }
        let applied = Reading::new(Name::from_static("interval_s"), Value::U64(self.interval_s));
        let _ = c.report_state(&[applied]);
    }

    fn on_command<const R: usize, const O: usize>(
        &mut self,
        _now: Millis,
        c: &mut Client<R, O>,
        cmd: &Command<'_>,
    ) {
        let status = match cmd.name.as_str() {
            "echo" => CommandStatus::Succeeded,
            _ => CommandStatus::UnknownCommand,
        };
        let _ = c.complete_command(cmd.id, status, &cmd.args);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, dir, id] = &args[..] else {
        return Err("usage: host_device GATEWAY_ADDR CERTS_DIR DEVICE_ID".into());
    };
    let tls = client_config_from_dir(dir.as_ref(), id)?;
    let mut connector = TlsConnector::new(addr.as_str(), "localhost", tls)?;
    let mut client: Client<4096> = Client::new(Config::new(rand_boot_id(), "host-demo-1.0"));
    let (mut rx, mut tx) = ([0u8; 512], [0u8; 512]);
    let mut app = Thermometer {
        next: 0,
        interval_s: 2,
    };
    let clock = TokioClock::new();
    let reason = run(
        &mut client,
        &mut connector,
        &clock,
        &mut app,
        &mut rx,
        &mut tx,
    )
    .await;
    Err(format!("the gateway refused this device for good: {reason:?}").into())
}

fn rand_boot_id() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

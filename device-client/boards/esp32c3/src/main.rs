//! The device client as firmware on an ESP32-C3: mutual TLS with embedded-tls over a
//! TCP socket of embassy-net on the C3's Wi-Fi (esp-radio), firmware updates into the
//! ESP-IDF OTA slot it is not running from.
//!
//! ```text
//!  main ─► esp-hal, heap (Wi-Fi), esp-rtos (scheduler, embassy executor and time)
//!       ─► Wi-Fi station (esp-radio) ─► embassy-net stack (DHCP)
//!            tasks: wifi_task (join, rejoin), net_task (the stack's runner)
//!       ─► TRNG (the radio is its entropy source) ─► boot id, DeviceProvider
//!       ─► DeviceProvider (cert + SoftwareKey from key.der, CA: gateway verification)
//!       ─► TlsConnector over TcpLink (net.rs) ─► TlsConnector::run(client, clock, app,
//!          rx, tx) (device_client::driver::run, unchanged)
//!  app: a reading every `interval` ms; commands `echo`, `reboot`; the desired
//!       `interval_ms`; firmware updates (protocol version 3) through
//!       firmware::Updater into the other OTA slot (ota.rs), checked against the
//!       release key baked in by build.rs, then the bootloader boots it
//! ```
//!
//! It logs over the C3's USB-serial-JTAG (esp-println), which `espflash flash
//! --monitor` shows.
#![no_std]
#![no_main]

mod clock;
mod identity;
mod net;
mod ota;

use core::cell::RefCell;

use device_client::driver::App;
use device_client::driver::embedded_tls::{
    ConnectError, DeviceProvider, SoftwareKey, TlsConnector,
};
use device_client::firmware::{Update, Updater};
use device_client::machine::{
    Client, CompleteError, Config, Event, FirmwareMsg, Millis, SendError,
};
use device_client::proto::{Change, Command, CommandStatus, Desired, Name, Reading, Value};
use embassy_executor::Spawner;
use embassy_net::tcp::TcpSocket;
use embassy_net::{Runner, Stack, StackResources};
use embassy_time::{Duration, Timer};
use esp_hal::clock::CpuClock;
use esp_hal::rng::Trng;
use esp_hal::timer::timg::TimerGroup;
use esp_println::println;
use esp_radio::wifi::sta::StationConfig;
use esp_radio::wifi::{
    AuthenticationMethodConfig, Config as WifiConfig, ControllerConfig, Interface, WifiController,
};
use static_cell::StaticCell;

use clock::EmbassyClock;
use net::{SharedSocket, TcpLink};

// The app descriptor the ESP-IDF bootloader checks, with this firmware's version.
esp_bootloader_esp_idf::esp_app_desc!(
    env!("FIRMWARE_VERSION"),
    env!("CARGO_PKG_NAME"),
    esp_bootloader_esp_idf::BUILD_TIME,
    esp_bootloader_esp_idf::BUILD_DATE,
    esp_bootloader_esp_idf::ESP_IDF_COMPATIBLE_VERSION,
    esp_bootloader_esp_idf::MMU_PAGE_SIZE,
    0,
    u16::MAX,
    esp_bootloader_esp_idf::SECURE_VERSION
);

/// Bytes of unacknowledged telemetry the device keeps (a record here is ~30 bytes).
const RING: usize = 1024;
/// Bytes of pending command results.
const OUTBOX: usize = 256;
/// The protocol's frame buffers: what `Config::new` announces (512).
const FRAME_BUF: usize = 512;
/// The TLS receive buffer: one record of the gateway's `max_fragment_size` = 1024
/// (header included) plus 12 (PROTOCOL.md §6.2). Without that setting: 16,640.
const TLS_RX: usize = 1024 + 12;
/// The TLS send buffer: the device's Certificate message (~450 bytes), and frames.
const TLS_TX: usize = 1024;
/// The TCP socket's buffers (smoltcp's window and retransmission queue).
const TCP_RX: usize = 2048;
const TCP_TX: usize = 2048;
/// The first telemetry interval, and the interval when `interval_ms` is unset.
const DEFAULT_INTERVAL_MS: Millis = 5_000;
/// After a verified update or `reboot`: time for the status to leave before the reset.
const RESTART_GRACE_MS: Millis = 5_000;

#[esp_rtos::main]
async fn main(spawner: Spawner) -> ! {
    let peripherals = esp_hal::init(esp_hal::Config::default().with_cpu_clock(CpuClock::max()));
    // Wi-Fi allocates its buffers: 64 KiB from the RAM the bootloader used, 36 KiB more
    // (esp-radio's recommendation).
    esp_alloc::heap_allocator!(#[esp_hal::ram(reclaimed)] size: 64 * 1024);
    esp_alloc::heap_allocator!(size: 36 * 1024);
    let timg0 = TimerGroup::new(peripherals.TIMG0);
    esp_rtos::start(timg0.timer0, peripherals.FROM_CPU_INTR0);
    println!(
        "firmware: device {} ({}) booting",
        identity::DEVICE_ID,
        identity::FIRMWARE_VERSION
    );

    // Wi-Fi: a station on the baked-in network.
    let auth = if identity::WIFI_PASSWORD.is_empty() {
        AuthenticationMethodConfig::Open
    } else {
        match identity::WIFI_PASSWORD.try_into() {
            Ok(password) => AuthenticationMethodConfig::Wpa2Personal(password),
            Err(_) => fail("WIFI_PASSWORD is not a WPA2 passphrase"),
        }
    };
    let Ok(ssid) = identity::WIFI_SSID.try_into() else {
        fail("WIFI_SSID is not an SSID");
    };
    let station = StationConfig::default()
        .with_ssid(ssid)
        .with_authentication(auth);
    let controller = match WifiController::new(
        peripherals.WIFI,
        ControllerConfig::default().with_initial_config(WifiConfig::Station(station)),
    ) {
        Ok(controller) => controller,
        Err(e) => fail_with("Wi-Fi did not start", e),
    };

    // With the radio on, the RNG is a true RNG (esp-hal's Trng: rand_core 0.6
    // CryptoRng + RngCore, what embedded-tls takes).
    let Ok(rng) = Trng::try_new() else {
        fail("no entropy source for the TRNG");
    };
    let boot_id = u64::from(rng.random()) << 32 | u64::from(rng.random());
    let net_seed = u64::from(rng.random()) << 32 | u64::from(rng.random());

    static RESOURCES: StaticCell<StackResources<3>> = StaticCell::new();
    let (stack, runner) = embassy_net::new(
        Interface::station(),
        embassy_net::Config::dhcpv4(Default::default()),
        RESOURCES.init(StackResources::new()),
        net_seed,
    );
    spawner.spawn(wifi_task(controller).expect("wifi_task spawned once"));
    spawner.spawn(net_task(runner).expect("net_task spawned once"));

    let Ok(key) = SoftwareKey::from_sec1_der(identity::KEY_DER) else {
        fail("key.der is not a SEC1 DER P-256 key");
    };
    // NoClock: the C3 has no battery-backed clock, so validity periods are not checked
    // (the gateway's Welcome.server_time_ms could set one after the first connection).
    let provider: DeviceProvider<'_, _, _> =
        match DeviceProvider::new(rng, key, identity::CERT_DER, identity::CA_DER) {
            Ok(provider) => provider,
            Err(_) => fail("ca.der is not an X.509 v3 certificate with a P-256 key"),
        };

    static TCP_BUFFERS: StaticCell<([u8; TCP_RX], [u8; TCP_TX])> = StaticCell::new();
    let (tcp_rx, tcp_tx) = TCP_BUFFERS.init(([0; TCP_RX], [0; TCP_TX]));
    static SOCKET: StaticCell<SharedSocket> = StaticCell::new();
    let socket = SOCKET.init(RefCell::new(TcpSocket::new(stack, tcp_rx, tcp_tx)));

    static TLS_BUFFERS: StaticCell<([u8; TLS_RX], [u8; TLS_TX])> = StaticCell::new();
    let (tls_rx, tls_tx) = TLS_BUFFERS.init(([0; TLS_RX], [0; TLS_TX]));
    static FRAMES: StaticCell<[[u8; FRAME_BUF]; 2]> = StaticCell::new();
    let [rx, tx] = FRAMES.init([[0; FRAME_BUF]; 2]);
    let mut config = Config::new(boot_id, identity::FIRMWARE_VERSION);
    config.backoff_min_ms = 1_000;
    config.backoff_max_ms = 30_000;
    static CLIENT: StaticCell<Client<RING, OUTBOX>> = StaticCell::new();
    let client = CLIENT.init(Client::new(config));

    let ota = match ota::Ota::take(peripherals.FLASH) {
        Ok(ota) => {
            println!(
                "firmware: updates go to {} ({} KiB)",
                ota.label(),
                ota.capacity() / 1024
            );
            Some(ota)
        }
        Err(e) => {
            println!("firmware: no OTA slot ({e}): flashed without partitions.csv? No updates");
            None
        }
    };

    wait_for_network(stack).await;

    let hook = |e: &ConnectError<net::OpenError>| match e {
        ConnectError::Transport(t) => println!("firmware: connection attempt failed: {t:?}"),
        e => println!("firmware: connection attempt failed: {}", e.as_str()),
    };
    let mut connector = TlsConnector::new(
        TcpLink::new(stack, socket, identity::GATEWAY_IP, identity::GATEWAY_PORT),
        provider,
        identity::GATEWAY_NAME,
        tls_rx,
        tls_tx,
    )
    .on_error(&hook);
    let mut app = Firmware::new(ota);
    let clock = EmbassyClock;
    println!(
        "firmware: dialling {}.{}.{}.{}:{} as {}",
        identity::GATEWAY_IP[0],
        identity::GATEWAY_IP[1],
        identity::GATEWAY_IP[2],
        identity::GATEWAY_IP[3],
        identity::GATEWAY_PORT,
        identity::GATEWAY_NAME
    );
    let reason = connector.run(client, &clock, &mut app, rx, tx).await;
    // Revoked, or a protocol version the gateway no longer speaks: retrying is useless
    // until someone re-provisions the device.
    println!(
        "firmware: the gateway refused this device for good: {}",
        reason.as_str()
    );
    loop {
        Timer::after(Duration::from_secs(3600)).await;
    }
}

/// Waits for the Wi-Fi association and a DHCP lease.
async fn wait_for_network(stack: Stack<'static>) {
    println!("firmware: joining Wi-Fi `{}`", identity::WIFI_SSID);
    stack.wait_config_up().await;
    if let Some(config) = stack.config_v4() {
        println!("firmware: address {}", config.address);
    }
}

/// Joins the access point, and again whenever the station is dropped.
#[embassy_executor::task]
async fn wifi_task(mut controller: WifiController<'static>) {
    loop {
        match controller.connect_async().await {
            Ok(info) => {
                println!("wifi: associated (channel {})", info.channel);
                let _ = controller.wait_for_disconnect_async().await;
                println!("wifi: disconnected");
            }
            Err(e) => println!("wifi: join failed: {e:?}"),
        }
        Timer::after(Duration::from_secs(5)).await;
    }
}

/// Runs the network stack.
#[embassy_executor::task]
async fn net_task(mut runner: Runner<'static, Interface>) {
    runner.run().await
}

/// The device's application: a thermometer that also answers commands and updates
/// itself.
struct Firmware {
    interval_ms: Millis,
    next: Millis,
    sent: u32,
    connects: u32,
    /// Firmware updates into the other OTA slot, if the partition table has one.
    ota: Option<ota::Ota>,
    updater: Updater<'static, 4>,
    /// Whether the running image was marked good (after the first Welcome).
    booted_marked: bool,
    /// Reset once the last results left, or at the deadline (update installed, or the
    /// `reboot` command).
    restart_at: Option<Millis>,
}

impl Firmware {
    fn new(ota: Option<ota::Ota>) -> Self {
        let room = ota.as_ref().map_or(0, ota::Ota::capacity);
        Self {
            interval_ms: DEFAULT_INTERVAL_MS,
            next: 0,
            sent: 0,
            connects: 0,
            updater: Updater::new(identity::RELEASE_KEY).with_max_size(room),
            ota,
            booted_marked: false,
            restart_at: None,
        }
    }
}

impl App for Firmware {
    fn next_wake(&self) -> Option<Millis> {
        Some(match self.restart_at {
            Some(at) => self.next.min(at),
            None => self.next,
        })
    }

    fn on_wake<const R: usize, const O: usize>(&mut self, now: Millis, client: &mut Client<R, O>) {
        if let Some(at) = self.restart_at {
            // Once the results left (answers, the update's status), or at the deadline.
            if client.pending_results() == 0 || now >= at + RESTART_GRACE_MS {
                println!("firmware: restarting");
                esp_hal::system::software_reset();
            }
            self.next = now + 200;
            return;
        }
        // A made-up temperature and the uptime.
        let temp = 21.0 + (self.sent % 10) as f32 * 0.1;
        let readings = [
            Reading::new(Name::from_static("temp_c"), Value::F32(temp)),
            Reading::new(Name::from_static("uptime_ms"), Value::U64(now)),
        ];
        match client.send_telemetry(None, &readings) {
            Ok(_) => self.sent += 1,
            Err(e) => println!("firmware: record not queued: {}", send_error_str(e)),
        }
        self.next = now + self.interval_ms;
    }

    fn on_command<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        cmd: &Command<'_>,
    ) {
        println!("firmware: command {} `{}`", cmd.id, cmd.name.as_str());
        let answered = match cmd.name.as_str() {
            "echo" => client.complete_command(cmd.id, CommandStatus::Succeeded, &cmd.args),
            "reboot" => {
                self.restart_at = Some(now + 500);
                self.next = now + 500;
                client.complete_command(cmd.id, CommandStatus::Succeeded, &[])
            }
            _ => client.complete_command(cmd.id, CommandStatus::UnknownCommand, &[]),
        };
        if let Err(e) = answered {
            println!("firmware: result not queued: {}", complete_error_str(e));
        }
    }

    /// The one setting this firmware has: `interval_ms` (100 to 3,600,000), back to the
    /// default when unset. It reports the interval it uses.
    fn on_desired<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        desired: &Desired<'_>,
    ) {
        let mut interval = if desired.base == 0 {
            DEFAULT_INTERVAL_MS
        } else {
            self.interval_ms
        };
        for change in &desired.changes {
            match change {
                Change::Set(r) if r.name.as_str() == "interval_ms" => {
                    if let Some(ms @ 100..=3_600_000) = r.value.as_u64() {
                        interval = ms;
                    }
                }
                Change::Unset(n) if n.as_str() == "interval_ms" => interval = DEFAULT_INTERVAL_MS,
                _ => {}
            }
        }
        if interval != self.interval_ms {
            self.interval_ms = interval;
            if self.restart_at.is_none() {
                self.next = now + interval;
            }
        }
        println!(
            "firmware: desired version {} applied (base {}): interval {} ms",
            desired.version, desired.base, interval
        );
        let value = Reading::new(Name::from_static("interval_ms"), Value::U64(interval));
        if let Err(e) = client.report_state(&[value]) {
            println!("firmware: report not queued: {}", complete_error_str(e));
        }
    }

    /// A firmware update: the updater writes it to the other OTA slot and checks it; a
    /// verified image is selected for the bootloader and the device restarts into it.
    fn on_firmware<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        client: &mut Client<R, O>,
        msg: &FirmwareMsg<'_>,
    ) {
        // Until the running image is marked good the other slot holds the image to
        // fall back to: leave it alone (the gateway offers again next session).
        let (Some(ota), true) = (self.ota.as_mut(), self.booted_marked) else {
            return;
        };
        let updater = &mut self.updater;
        let update = match ota.with_slot(|slot| updater.handle(client, slot, msg)) {
            Ok(update) => update,
            Err(e) => {
                println!("firmware: OTA slot not writable: {e}");
                return;
            }
        };
        match update {
            // One line per 64 KiB.
            Update::Progress { received, size, .. }
                if received % 65_536 < 1024 || received == size =>
            {
                println!("firmware: image {received} of {size} B");
            }
            Update::Verified { version, .. } => match ota.activate() {
                Ok(()) => {
                    println!(
                        "firmware: image {} verified, {} selected: restarting",
                        version.as_str(),
                        ota.label()
                    );
                    self.restart_at = Some(now + RESTART_GRACE_MS);
                    self.next = now + 200;
                }
                Err(e) => println!("firmware: image verified but not selected: {e}"),
            },
            Update::Failed { outcome, .. } => {
                println!("firmware: image refused: {}", outcome.as_str());
            }
            Update::Declined { .. } => println!("firmware: image declined"),
            Update::Cancelled { .. } => println!("firmware: image withdrawn"),
            _ => {}
        }
    }

    fn on_event<const R: usize, const O: usize>(
        &mut self,
        now: Millis,
        _client: &mut Client<R, O>,
        event: Event,
    ) {
        match event {
            Event::Connected { last_acked, .. } => {
                self.connects += 1;
                println!(
                    "firmware: connected (session {}) at {} ms, gateway had up to {:?}",
                    self.connects, now, last_acked
                );
                // The image reached the gateway over TLS: it works, keep it.
                if !self.booted_marked
                    && let Some(ota) = self.ota.as_mut()
                {
                    match ota.mark_booted() {
                        Ok(true) => println!("firmware: this image marked valid"),
                        Ok(false) => {}
                        Err(e) => println!("firmware: could not mark this image valid: {e}"),
                    }
                    self.booted_marked = true;
                }
            }
            Event::Disconnected {
                reason,
                reconnect_at,
            } => match reconnect_at {
                Some(at) => println!(
                    "firmware: disconnected: {}, next attempt at {at} ms",
                    reason.as_str()
                ),
                None => println!("firmware: disconnected for good: {}", reason.as_str()),
            },
            _ => {}
        }
    }
}

fn send_error_str(e: SendError) -> &'static str {
    match e {
        SendError::RingFull => "ring full",
        SendError::TooLarge => "too large",
        _ => "sequence numbers exhausted",
    }
}

fn complete_error_str(e: CompleteError) -> &'static str {
    match e {
        CompleteError::OutboxFull => "outbox full",
        CompleteError::TooLarge => "too large",
        _ => "unknown command id",
    }
}

fn fail(msg: &str) -> ! {
    println!("firmware: {msg}");
    halt()
}

fn fail_with(msg: &str, e: impl core::fmt::Debug) -> ! {
    println!("firmware: {msg}: {e:?}");
    halt()
}

/// Stops here (a configuration error: restarting would not help), leaving the log.
fn halt() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("firmware: {info}");
    // A fault in the field: start over (the client resumes from the gateway's acks).
    esp_hal::system::software_reset()
}

//! The device client as firmware on a Raspberry Pi Pico W (RP2040 + CYW43439): mutual
//! TLS with embedded-tls over an embassy-net TCP socket on the CYW43439's Wi-Fi.
//!
//! ```text
//!  main ─► embassy-rp init, RoscRng, ADC temperature sensor, flash (DFU partition)
//!       ─► CYW43439 over PIO SPI (cyw43 + cyw43-pio)   ─► task cyw43_task
//!       ─► embassy-net stack, DHCPv4                    ─► task net_task
//!       ─► Wi-Fi join, rejoin after a drop              ─► task wifi_task (LED: joined)
//!       ─► DeviceProvider (cert + SoftwareKey from key.der, CA: gateway verification)
//!       ─► TlsConnector over TcpLink (net.rs) ─► TlsConnector::run(client, clock, app, rx, tx)
//!                                                (device_client::driver::run, unchanged)
//!  app (app.rs): a reading every `interval_ms` (5 s); commands `echo`, `reboot`; the
//!       desired `interval_ms`; firmware updates (protocol version 3) through
//!       firmware::Updater into the flash's DFU partition (dfu.rs), checked against the
//!       release key baked in by build.rs
//! ```
//!
//! No logging: the firmware reports through its telemetry. A failure at boot (a bad
//! key or CA, no CYW43439 firmware baked in) parks the core in [`halt`], where a
//! debugger finds the reason on the stack.
#![no_std]
#![no_main]

mod app;
mod clock;
mod dfu;
mod identity;
mod net;

use core::cell::RefCell;
use core::panic::PanicInfo;

use cyw43::JoinOptions;
use cyw43_pio::{DEFAULT_CLOCK_DIVIDER, PioSpi};
use device_client::driver::embedded_tls::{DeviceProvider, SoftwareKey, TlsConnector};
use device_client::machine::{Client, Config};
use embassy_executor::Spawner;
use embassy_net::tcp::TcpSocket;
use embassy_net::{IpEndpoint, Ipv4Address, Stack, StackResources};
use embassy_rp::adc::{self, Adc};
use embassy_rp::clocks::RoscRng;
use embassy_rp::flash::Flash;
use embassy_rp::gpio::{Level, Output};
use embassy_rp::peripherals::{DMA_CH0, PIO0};
use embassy_rp::pio::{self, Pio};
use embassy_rp::{bind_interrupts, dma};
use embassy_time::Timer;
use static_cell::StaticCell;

use app::{FRAME_BUF, Firmware, OUTBOX, RING};
use clock::EmbassyClock;
use net::TcpLink;

bind_interrupts!(struct Irqs {
    PIO0_IRQ_0 => pio::InterruptHandler<PIO0>;
    DMA_IRQ_0 => dma::InterruptHandler<DMA_CH0>;
});

/// The firmware version announced in `Hello` (an update offering it is declined).
const FIRMWARE_VERSION: &str = "rp2040-pico-w-0.1.0";
/// The TLS receive buffer: one record of the gateway's `max_fragment_size` = 1024
/// (header included) plus 12 (PROTOCOL.md §6.2). Without that setting: 16,640.
const TLS_RX: usize = 1024 + 12;
/// The TLS send buffer: the device's Certificate message (~450 bytes), and frames.
const TLS_TX: usize = 1024;
/// embassy-net's TCP buffers: two of the gateway's records in flight to the device,
/// and one and a half of the device's.
const TCP_RX: usize = 2048;
const TCP_TX: usize = 1536;
/// Opening TCP plus the TLS handshake (three P-256 operations at 125 MHz on a
/// Cortex-M0+ take a few seconds).
const HANDSHAKE_TIMEOUT_MS: u64 = 20_000;

// The CYW43439's firmware, CLM and NVRAM (build.rs: CYW43_FIRMWARE_DIR, or empty).
static CYW43_FW: &cyw43::Aligned<cyw43::A4, [u8]> =
    cyw43::aligned_bytes!(concat!(env!("OUT_DIR"), "/43439A0.bin"));
static CYW43_CLM: &cyw43::Aligned<cyw43::A4, [u8]> =
    cyw43::aligned_bytes!(concat!(env!("OUT_DIR"), "/43439A0_clm.bin"));
static CYW43_NVRAM: &cyw43::Aligned<cyw43::A4, [u8]> =
    cyw43::aligned_bytes!(concat!(env!("OUT_DIR"), "/nvram_rp2040.bin"));

type Cyw43Runner = cyw43::Runner<'static, cyw43::SpiBus<Output<'static>, PioSpi<'static, PIO0, 0>>>;

#[embassy_executor::task]
async fn cyw43_task(runner: Cyw43Runner) -> ! {
    runner.run().await
}

#[embassy_executor::task]
async fn net_task(mut runner: embassy_net::Runner<'static, cyw43::NetDriver<'static>>) -> ! {
    runner.run().await
}

/// Joins the access point, and joins again whenever the link drops. The LED (the
/// CYW43439's GPIO 0) is on while joined.
#[embassy_executor::task]
async fn wifi_task(mut control: cyw43::Control<'static>, stack: Stack<'static>) -> ! {
    loop {
        let options = if identity::WIFI_PASSWORD.is_empty() {
            JoinOptions::new_open()
        } else {
            JoinOptions::new(identity::WIFI_PASSWORD.as_bytes())
        };
        while control
            .join(identity::WIFI_SSID, options.clone())
            .await
            .is_err()
        {
            Timer::after_secs(2).await;
        }
        control.gpio_set(0, true).await;
        stack.wait_link_down().await;
        control.gpio_set(0, false).await;
    }
}

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    let p = embassy_rp::init(Default::default());
    let mut rng = RoscRng;
    let boot_id = rng.next_u64();

    // The readings and the update partition.
    let adc = Adc::new_blocking(p.ADC, adc::Config::default());
    let temp = adc::Channel::new_temp_sensor(p.ADC_TEMP_SENSOR);
    let dfu = dfu::Dfu::new(Flash::new_blocking(p.FLASH));

    // The identity, before anything else: a bad key or CA stops here.
    let Ok(key) = SoftwareKey::from_sec1_der(identity::KEY_DER) else {
        halt("key.der is not a SEC1 DER P-256 key");
    };
    let Ok(provider) = DeviceProvider::new(RoscRng, key, identity::CERT_DER, identity::CA_DER)
    else {
        halt("ca.der is not an X.509 v3 certificate with a P-256 key");
    };
    let provider: DeviceProvider<'_, _, _> = provider;

    // The CYW43439 on PIO0 (its half-duplex SPI: DIO on GPIO 24, CLK on GPIO 29, CS on
    // GPIO 25, power on GPIO 23).
    // (black_box: without it, a build with the empty placeholders lets the compiler see
    // that everything after this is unreachable, and measures a firmware without TLS.)
    let blobs = [CYW43_FW.len(), CYW43_CLM.len(), CYW43_NVRAM.len()];
    if core::hint::black_box(blobs).contains(&0) {
        halt("built without the CYW43439 firmware (CYW43_FIRMWARE_DIR)");
    }
    let pwr = Output::new(p.PIN_23, Level::Low);
    let cs = Output::new(p.PIN_25, Level::High);
    let mut pio = Pio::new(p.PIO0, Irqs);
    let spi = PioSpi::new(
        &mut pio.common,
        pio.sm0,
        DEFAULT_CLOCK_DIVIDER,
        pio.irq0,
        cs,
        p.PIN_24,
        p.PIN_29,
        dma::Channel::new(p.DMA_CH0, Irqs),
    );
    static CYW43_STATE: StaticCell<cyw43::State> = StaticCell::new();
    let (net_device, mut control, runner) = cyw43::new(
        CYW43_STATE.init(cyw43::State::new()),
        pwr,
        spi,
        CYW43_FW,
        CYW43_NVRAM,
    )
    .await;
    spawn(&spawner, cyw43_task(runner));
    control.init(CYW43_CLM).await;
    control
        .set_power_management(cyw43::PowerManagementMode::PowerSave)
        .await;

    // The IP stack: DHCPv4, one socket (the gateway's).
    static RESOURCES: StaticCell<StackResources<2>> = StaticCell::new();
    let (stack, runner) = embassy_net::new(
        net_device,
        embassy_net::Config::dhcpv4(Default::default()),
        RESOURCES.init(StackResources::new()),
        rng.next_u64(),
    );
    spawn(&spawner, net_task(runner));
    spawn(&spawner, wifi_task(control, stack));
    stack.wait_config_up().await;

    // The buffers, in static RAM (not on the stack of this task).
    static TCP_BUFS: StaticCell<([u8; TCP_RX], [u8; TCP_TX])> = StaticCell::new();
    static TLS_BUFS: StaticCell<([u8; TLS_RX], [u8; TLS_TX])> = StaticCell::new();
    static FRAMES: StaticCell<[[u8; FRAME_BUF]; 2]> = StaticCell::new();
    static CLIENT: StaticCell<Client<RING, OUTBOX>> = StaticCell::new();
    let (tcp_rx, tcp_tx) = TCP_BUFS.init(([0; TCP_RX], [0; TCP_TX]));
    let (tls_rx, tls_tx) = TLS_BUFS.init(([0; TLS_RX], [0; TLS_TX]));
    let [rx, tx] = FRAMES.init([[0; FRAME_BUF]; 2]);
    let mut config = Config::new(boot_id, FIRMWARE_VERSION);
    config.backoff_min_ms = 1_000;
    config.backoff_max_ms = 60_000;
    let client = CLIENT.init(Client::new(config));

    let socket = RefCell::new(TcpSocket::new(stack, tcp_rx, tcp_tx));
    let [a, b, c, d] = identity::GATEWAY_IP;
    let gateway = IpEndpoint::new(Ipv4Address::new(a, b, c, d).into(), identity::GATEWAY_PORT);
    let mut connector = TlsConnector::new(
        TcpLink::new(&socket, gateway),
        provider,
        identity::GATEWAY_NAME,
        tls_rx,
        tls_tx,
    )
    .with_handshake_timeout(HANDSHAKE_TIMEOUT_MS);

    let mut app = Firmware::new(adc, temp, dfu);
    let _reason = connector.run(client, &EmbassyClock, &mut app, rx, tx).await;
    // The gateway refused this device for good (revoked, or a protocol it cannot
    // speak): trying again would only be refused again.
    halt("the gateway refused this device for good");
}

/// Spawns a task; the executor has room for each task once, so this cannot fail.
fn spawn<S>(
    spawner: &Spawner,
    token: Result<embassy_executor::SpawnToken<S>, embassy_executor::SpawnError>,
) {
    match token {
        Ok(token) => spawner.spawn(token),
        Err(_) => halt("a task was spawned twice"),
    }
}

/// Stops here for good, with `why` on the stack for a debugger.
#[inline(never)]
fn halt(why: &'static str) -> ! {
    let why = core::hint::black_box(why);
    loop {
        core::hint::black_box(why);
        cortex_m::asm::wfe();
    }
}

/// A panic restarts the device (and so reconnects): nothing is kept across it but
/// the flash.
#[panic_handler]
fn panic(_: &PanicInfo) -> ! {
    cortex_m::peripheral::SCB::sys_reset()
}

//! Gateway → device frames, taken at compile time from the golden vectors in
//! `device-client/tests/vectors/` (hex with `#` comment lines), so they cannot drift.

/// Walks a vector file's hex digit pairs (`#` lines skipped), writing the bytes into
/// `out` unless it is empty; returns how many bytes there are. One walk serves both the
/// length (the array type needs it first) and the bytes.
const fn decode(text: &str, out: &mut [u8]) -> usize {
    let b = text.as_bytes();
    let (mut i, mut n, mut comment) = (0, 0, false);
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            comment = false;
        } else if c == b'#' {
            comment = true;
        } else if !comment && c.is_ascii_hexdigit() {
            if !out.is_empty() {
                if n % 2 == 0 {
                    out[n / 2] = nibble(c) << 4;
                } else {
                    out[n / 2] |= nibble(c);
                }
            }
            n += 1;
        }
        i += 1;
    }
    assert!(n % 2 == 0, "odd number of hex digits in a vector");
    n / 2
}

const fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("not a hex digit"),
    }
}

/// Number of bytes in a vector file.
const fn hex_len(text: &str) -> usize {
    decode(text, &mut [])
}

/// The bytes of a vector file (`N` from [`hex_len`]).
const fn hex_bytes<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [0u8; N];
    decode(text, &mut out);
    out
}

macro_rules! vector {
    ($(#[$doc:meta])* $name:ident = $file:literal) => {
        $(#[$doc])*
        pub const $name: &[u8] = {
            const TEXT: &str = include_str!(concat!("../../tests/vectors/", $file));
            const BYTES: [u8; hex_len(TEXT)] = hex_bytes(TEXT);
            &BYTES
        };
    };
}

vector!(
    /// `Welcome`: version 1, heartbeat 30 s, nothing acked yet, max frame 4096.
    WELCOME = "down-welcome-fresh-boot.hex"
);
vector!(
    /// `Ack { seq: 42 }`: acknowledges every record the scenario sends.
    ACK = "down-ack.hex"
);
vector!(
    /// `Command { id: 12, name: "set_interval", args: [interval_s = 5], ttl 60 s }`.
    COMMAND = "down-command.hex"
);
vector!(
    /// `Pong` with a nonce the client never sent: decoded and ignored.
    PONG = "down-pong.hex"
);
vector!(
    /// `Goodbye { reason: Revoked }`: fatal; ends the session and `driver::run`.
    GOODBYE_REVOKED = "down-goodbye-revoked.hex"
);

/// Every frame above, for the baseline to keep alive without decoding.
pub const ALL: [&[u8]; 5] = [WELCOME, ACK, COMMAND, PONG, GOODBYE_REVOKED];

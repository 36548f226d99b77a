//! Lines to QEMU's standard output through semihosting, without `core::fmt`.
//!
//! `hprintln!` formats with `core::fmt`; its machinery and the derived `Debug` tables it
//! pulls in cost this firmware about 20 KB of flash, a fifth of its budget. Lines here
//! are built from parts that write themselves: strings, integers, `Option`s. A board
//! with a debug probe would rather use `defmt`, which formats on the host.
//!
//! ```text
//!  say!("firmware: acked up to ", seq)  ──►  Line (200 B on the stack) ──► one SYS_WRITE
//! ```

use cortex_m_semihosting::hio;

/// One line being built; what does not fit is left out.
pub struct Line {
    buf: [u8; 200],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Self {
            buf: [0; 200],
            len: 0,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            // Keep room for the newline.
            if self.len + 1 >= self.buf.len() {
                return;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    /// Writes the line and a newline with one semihosting call.
    pub fn send(mut self) {
        self.buf[self.len] = b'\n';
        self.len += 1;
        if let Ok(mut out) = hio::hstdout() {
            // Nothing to do if the host does not take it.
            let _ = out.write_all(&self.buf[..self.len]);
        }
    }
}

/// Something that can be part of a line.
pub trait Part {
    fn put(&self, line: &mut Line);
}

impl Part for str {
    fn put(&self, line: &mut Line) {
        line.push(self.as_bytes());
    }
}

impl<T: Part + ?Sized> Part for &T {
    fn put(&self, line: &mut Line) {
        (**self).put(line);
    }
}

impl Part for u64 {
    fn put(&self, line: &mut Line) {
        let mut digits = [0u8; 20];
        let mut n = *self;
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        line.push(&digits[i..]);
    }
}

impl Part for u32 {
    fn put(&self, line: &mut Line) {
        u64::from(*self).put(line);
    }
}

impl Part for usize {
    fn put(&self, line: &mut Line) {
        (*self as u64).put(line);
    }
}

impl Part for bool {
    fn put(&self, line: &mut Line) {
        line.push(if *self { b"true" } else { b"false" });
    }
}

impl<T: Part> Part for Option<T> {
    fn put(&self, line: &mut Line) {
        match self {
            Some(v) => v.put(line),
            None => line.push(b"none"),
        }
    }
}

/// Writes one line made of the parts given, e.g. `say!("acked up to ", seq)`.
macro_rules! say {
    ($($part:expr),+ $(,)?) => {{
        let mut line = $crate::log::Line::new();
        $( $crate::log::Part::put(&$part, &mut line); )+
        line.send();
    }};
}
pub(crate) use say;

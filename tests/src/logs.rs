//! Captures the gateway's log lines in a test, to assert on them.
//!
//! Works with `#[tokio::test]` (a current-thread runtime): the gateway's tasks run on
//! the test's thread, where the capturing subscriber is the default.

use std::io;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tracing_subscriber::fmt::MakeWriter;

/// Log lines written so far, and a signal on every write.
#[derive(Clone, Default)]
pub struct LogCapture {
    text: Arc<Mutex<String>>,
    written: Arc<Notify>,
}

impl LogCapture {
    /// Captures logs on this thread until the guard is dropped. If the test fails, the
    /// guard prints what was captured.
    pub fn start() -> (Self, CaptureGuard) {
        let cap = LogCapture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(cap.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (
            cap.clone(),
            CaptureGuard {
                cap,
                _default: guard,
            },
        )
    }

    /// Everything captured.
    pub fn text(&self) -> String {
        self.text.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits (at most [`crate::WAIT`]) for a line containing every one of `parts`;
    /// returns it.
    pub async fn wait_for(&self, parts: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + crate::WAIT;
        loop {
            let written = self.written.notified();
            if let Some(line) = self
                .text()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return line.to_owned();
            }
            if tokio::time::timeout_at(deadline, written).await.is_err() {
                panic!(
                    "no log line with {parts:?} within {:?}; logs:\n{}",
                    crate::WAIT,
                    self.text()
                );
            }
        }
    }
}

impl io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.text
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_str(&String::from_utf8_lossy(buf));
        self.written.notify_waiters();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Ends the capture when dropped; prints the captured logs if the test is failing.
pub struct CaptureGuard {
    cap: LogCapture,
    _default: tracing::subscriber::DefaultGuard,
}

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- gateway logs ---\n{}", self.cap.text());
        }
    }
}

//! The log's writer: lines go into a shared buffer (a lock and a copy on the thread that
//! logs) and a dedicated thread writes the buffer to stderr every [`FLUSH_EVERY`], or sooner
//! when it passes [`FLUSH_AT`]. A request never waits on a `write` to stderr, and a thousand
//! access-log lines a second are a few writes, not a thousand (nor a thousand cross-thread
//! wake-ups, which a channel per line costs).
//!
//! Bounded: while stderr cannot keep up and [`MAX_PENDING`] bytes wait, further lines are
//! dropped (and counted in a line of their own once it catches up). What waits is written when
//! the [`Guard`] is dropped (the gateway's normal exit); a SIGKILL loses at most the last
//! [`FLUSH_EVERY`]. It must not block the thread that logs on anything but its short lock.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The longest a line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// A buffer this full is written at once.
const FLUSH_AT: usize = 64 * 1024;
/// The most bytes kept while stderr is slow; beyond, lines are dropped.
const MAX_PENDING: usize = 8 * 1024 * 1024;

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    dropped: u64,
    closing: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle the log formats into (cheap to clone; one per event).
#[derive(Clone)]
pub struct BatchWriter(Arc<Shared>);

impl BatchWriter {
    /// Appends one whole line (or drops it, counted, when too much waits).
    pub fn push(&self, line: &[u8]) {
        let mut p = self.0.lock();
        if p.buf.len() + line.len() > MAX_PENDING {
            p.dropped += 1;
        } else {
            p.buf.extend_from_slice(line);
            if p.buf.len() >= FLUSH_AT {
                self.0.wake.notify_one();
            }
        }
    }
}

impl Write for BatchWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = BatchWriter;
    fn make_writer(&'a self) -> BatchWriter {
        self.clone()
    }
}

/// Writes what is left and stops the writer thread when dropped.
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer and its guard; the thread writes to `out`.
pub fn start(mut out: impl Write + Send + 'static) -> (BatchWriter, Guard) {
    let shared = Arc::new(Shared::default());
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name("mofa-log".into())
        .spawn(move || {
            let mut spare = Vec::new();
            loop {
                let (closing, dropped) = {
                    let mut p = s.lock();
                    if p.buf.len() < FLUSH_AT && !p.closing {
                        p = s
                            .wake
                            .wait_timeout(p, FLUSH_EVERY)
                            .map_or_else(|e| e.into_inner().0, |(g, _)| g);
                    }
                    std::mem::swap(&mut p.buf, &mut spare);
                    (p.closing, std::mem::take(&mut p.dropped))
                };
                // Written outside the lock: loggers only ever wait for a copy.
                let _ = out.write_all(&spare);
                if dropped > 0 {
                    let _ = writeln!(
                        out,
                        "mofa-gateway: {dropped} log lines dropped (stderr did not keep up)"
                    );
                }
                let _ = out.flush();
                spare.clear();
                if closing {
                    break;
                }
            }
        });
    let thread = thread.ok();
    (BatchWriter(shared.clone()), Guard { shared, thread })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose bytes the test can read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_in_order_and_all_are_written_at_the_end() {
        let sink = Sink::default();
        let (w, guard) = start(sink.clone());
        for i in 0..1000 {
            let mut w = w.clone();
            writeln!(w, "line {i}").unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        assert!(lines
            .iter()
            .enumerate()
            .all(|(i, l)| *l == format!("line {i}")));
    }

    #[test]
    fn a_line_is_written_without_waiting_for_the_end() {
        let sink = Sink::default();
        let (mut w, _guard) = start(sink.clone());
        writeln!(w, "early").unwrap();
        let t = std::time::Instant::now();
        while sink.0.lock().unwrap().is_empty() {
            assert!(t.elapsed() < Duration::from_secs(5), "never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"early\n");
    }
}

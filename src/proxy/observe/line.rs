//! The access log line of a finished request, written by the gateway itself: one buffer per
//! thread, integers and milliseconds in integer arithmetic, one call to the sink a line. It
//! writes the same fields, in the same order and the same two formats, as the `tracing` event
//! it replaces (tracing-subscriber's text `Full` format without colour, and its flattened JSON),
//! at a small part of the cost: formatting that event through `tracing`'s visitors and
//! `core::fmt` was a quarter of the gateway's instructions per request.
//!
//! The sink is set by the binary ([`set_sink`]: its log writer); without one (tests, embedders)
//! the line goes out as a `tracing` event as before. Either way it is subject to the log's
//! filter (`RUST_LOG`, target `mofa_gateway::access`, level `info`). It must not log anything
//! but the fields below: never a prompt, a completion, a header or a secret.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use crate::utc::timestamp;

/// The access log's target (and the `target` field of a JSON line).
pub(crate) const TARGET: &str = "mofa_gateway::access";

/// What a finished line is handed to.
type WriteFn = Box<dyn Fn(&[u8]) + Send + Sync>;

/// Where the lines go, and in which format.
struct Sink {
    json: bool,
    write: WriteFn,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// From now on the access log lines are formatted here and handed whole to `write` (one call
/// a line, the newline included): JSON objects when `json`, else readable text. Once per
/// process; a later call is ignored.
pub fn set_sink(json: bool, write: impl Fn(&[u8]) + Send + Sync + 'static) {
    let _ = SINK.set(Sink {
        json,
        write: Box::new(write),
    });
}

/// The fields of one line.
pub(crate) struct Line<'a> {
    pub request_id: &'a str,
    pub client: Option<SocketAddr>,
    pub key: &'a str,
    pub model: &'a str,
    pub backend: &'a str,
    pub priority: &'a str,
    pub stream: bool,
    pub status: u16,
    pub reason: &'a str,
    pub attempts: u32,
    pub queue: Option<Duration>,
    pub ttfb: Option<Duration>,
    pub upstream_ttfb: Option<Duration>,
    pub total: Duration,
    pub bytes: u64,
    /// In, out, estimated.
    pub tokens: Option<(u64, u64, bool)>,
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

impl Line<'_> {
    /// Logs the line, if the log's filter lets it through.
    pub(crate) fn log(&self) {
        if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
            return;
        }
        let Some(sink) = SINK.get() else {
            return self.as_event();
        };
        BUF.with(|b| {
            let Ok(mut buf) = b.try_borrow_mut() else {
                return;
            };
            buf.clear();
            self.write(sink.json, SystemTime::now(), &mut buf);
            (sink.write)(&buf);
            if buf.capacity() > 16 * 1024 {
                // One long line (a long key or model name) does not keep a large buffer.
                *buf = Vec::with_capacity(512);
            }
        });
    }

    /// The line as a `tracing` event (no sink set).
    fn as_event(&self) {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        tracing::info!(
            target: TARGET,
            request_id = self.request_id,
            client = self.client.map(tracing::field::display),
            key = self.key,
            model = self.model,
            backend = self.backend,
            priority = self.priority,
            stream = self.stream,
            status = self.status,
            reason = self.reason,
            attempts = self.attempts,
            queue_ms = self.queue.map(ms),
            ttfb_ms = self.ttfb.map(ms),
            upstream_ttfb_ms = self.upstream_ttfb.map(ms),
            total_ms = ms(self.total),
            bytes = self.bytes,
            tokens_in = self.tokens.map(|t| t.0),
            tokens_out = self.tokens.map(|t| t.1),
            tokens_estimated = self.tokens.map(|t| t.2),
            "request finished"
        );
    }

    /// Appends the line (with its newline) to `out`, stamped `now`.
    fn write(&self, json: bool, now: SystemTime, out: &mut Vec<u8>) {
        let mut w = Writer { out, json };
        if json {
            w.raw(b"{\"timestamp\":\"");
            timestamp(now, w.out);
            w.raw(b"\",\"level\":\"INFO\",\"message\":\"request finished\"");
        } else {
            timestamp(now, w.out);
            w.raw(b"  INFO ");
            w.raw(TARGET.as_bytes());
            w.raw(b": request finished");
        }
        w.str("request_id", self.request_id);
        if let Some(c) = self.client {
            w.key("client");
            if json {
                w.raw(b"\"");
            }
            push_addr(w.out, c);
            if json {
                w.raw(b"\"");
            }
        }
        w.str("key", self.key);
        w.str("model", self.model);
        w.str("backend", self.backend);
        w.str("priority", self.priority);
        w.bool("stream", self.stream);
        w.int("status", u64::from(self.status));
        w.str("reason", self.reason);
        w.int("attempts", u64::from(self.attempts));
        w.ms("queue_ms", self.queue);
        w.ms("ttfb_ms", self.ttfb);
        w.ms("upstream_ttfb_ms", self.upstream_ttfb);
        w.ms("total_ms", Some(self.total));
        w.int("bytes", self.bytes);
        if let Some((input, output, estimated)) = self.tokens {
            w.int("tokens_in", input);
            w.int("tokens_out", output);
            w.bool("tokens_estimated", estimated);
        }
        if json {
            w.raw(b",\"target\":\"");
            w.raw(TARGET.as_bytes());
            w.raw(b"\"}");
        }
        w.raw(b"\n");
    }
}

/// Writes `name=value` pairs (text) or `,"name":value` members (JSON).
struct Writer<'a> {
    out: &'a mut Vec<u8>,
    json: bool,
}

impl Writer<'_> {
    fn raw(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }

    fn key(&mut self, name: &str) {
        if self.json {
            self.raw(b",\"");
            self.raw(name.as_bytes());
            self.raw(b"\":");
        } else {
            self.raw(b" ");
            self.raw(name.as_bytes());
            self.raw(b"=");
        }
    }

    fn str(&mut self, name: &str, v: &str) {
        self.key(name);
        self.raw(b"\"");
        escape(v, self.json, self.out);
        self.raw(b"\"");
    }

    fn int(&mut self, name: &str, v: u64) {
        self.key(name);
        self.raw(itoa::Buffer::new().format(v).as_bytes());
    }

    fn bool(&mut self, name: &str, v: bool) {
        self.key(name);
        self.raw(if v { b"true" } else { b"false" });
    }

    /// Milliseconds with three decimals (whole microseconds); nothing when `None`.
    fn ms(&mut self, name: &str, d: Option<Duration>) {
        let Some(d) = d else { return };
        self.key(name);
        push_ms(self.out, d);
    }
}

/// `d` as milliseconds with three decimals (whole microseconds: `1.500`), in integer
/// arithmetic.
pub(crate) fn push_ms(out: &mut Vec<u8>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    out.extend_from_slice(itoa::Buffer::new().format(us / 1000).as_bytes());
    let frac = us % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

/// `addr` as `ip:port` (`[ip]:port` for IPv6), without `core::fmt` for IPv4.
fn push_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            let mut b = itoa::Buffer::new();
            for (i, octet) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(b.format(octet).as_bytes());
            }
            out.push(b':');
            out.extend_from_slice(b.format(a.port()).as_bytes());
        }
        SocketAddr::V6(_) => {
            let _ = std::io::Write::write_fmt(out, format_args!("{addr}"));
        }
    }
}

/// `s` inside quotes: `"` and `\` escaped, control characters as escapes (JSON's, or Rust's
/// `Debug` ones in text, as tracing writes them); everything else as it is.
fn escape(s: &str, json: bool, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        start = i + 1;
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            if json {
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            } else {
                out.extend_from_slice(b"\\u{");
                if b >> 4 != 0 {
                    out.push(HEX[usize::from(b >> 4)]);
                }
                out.extend_from_slice(&[HEX[usize::from(b & 15)], b'}']);
            }
        } else {
            out.extend_from_slice(esc);
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn line() -> Line<'static> {
        Line {
            request_id: "req-1",
            client: Some("127.0.0.1:5000".parse().unwrap()),
            key: "-",
            model: "m\"x",
            backend: "local(m)",
            priority: "normal",
            stream: false,
            status: 200,
            reason: "ok",
            attempts: 1,
            queue: Some(Duration::from_micros(12)),
            ttfb: Some(Duration::from_micros(1_500)),
            upstream_ttfb: None,
            total: Duration::from_micros(2_345_678),
            bytes: 379,
            tokens: Some((1, 16, false)),
        }
    }

    // 2026-12-04T13:22:55.390665Z
    fn when() -> SystemTime {
        UNIX_EPOCH + Duration::new(1_796_390_575, 390_665_123)
    }

    #[test]
    fn text_is_what_tracing_wrote() {
        let mut out = Vec::new();
        line().write(false, when(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-12-04T13:22:55.390665Z  INFO mofa_gateway::access: request finished \
             request_id=\"req-1\" client=127.0.0.1:5000 key=\"-\" model=\"m\\\"x\" \
             backend=\"local(m)\" priority=\"normal\" stream=false status=200 reason=\"ok\" \
             attempts=1 queue_ms=0.012 ttfb_ms=1.500 total_ms=2345.678 bytes=379 tokens_in=1 \
             tokens_out=16 tokens_estimated=false\n"
        );
    }

    #[test]
    fn json_is_one_object_with_the_fields_at_the_top() {
        let mut out = Vec::new();
        let mut l = line();
        l.model = "a\u{1}\\b\n";
        l.client = None;
        l.tokens = None;
        l.write(true, when(), &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["timestamp"], "2026-12-04T13:22:55.390665Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], TARGET);
        assert_eq!(v["message"], "request finished");
        assert_eq!(v["model"], "a\u{1}\\b\n");
        assert_eq!(v["status"], 200);
        assert_eq!(v["stream"], false);
        assert_eq!(v["queue_ms"], 0.012);
        assert_eq!(v["total_ms"], 2345.678);
        assert!(v.get("client").is_none() && v.get("tokens_in").is_none());
        assert!(v.get("upstream_ttfb_ms").is_none());
    }

    #[test]
    fn addresses_as_display_writes_them() {
        for a in [
            "127.0.0.1:5000",
            "10.0.255.9:1",
            "[::1]:8080",
            "[fe80::1%2]:80",
        ] {
            let addr: SocketAddr = match a.parse() {
                Ok(x) => x,
                Err(_) => continue, // a scope id does not parse everywhere
            };
            let mut out = Vec::new();
            push_addr(&mut out, addr);
            assert_eq!(String::from_utf8(out).unwrap(), addr.to_string());
        }
    }

    #[test]
    fn dates_across_the_calendar() {
        let at = |secs: u64| {
            let mut out = Vec::new();
            timestamp(UNIX_EPOCH + Duration::from_secs(secs), &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00.000000Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59.000000Z");
        assert_eq!(at(4_107_542_400), "2100-03-01T00:00:00.000000Z");
    }

    #[test]
    fn text_escapes_like_debug() {
        let mut out = Vec::new();
        let s = "a\u{7}b\u{1b}\"\\";
        escape(s, false, &mut out);
        let debug = format!("{s:?}");
        assert_eq!(String::from_utf8(out).unwrap(), debug[1..debug.len() - 1]);
    }
}

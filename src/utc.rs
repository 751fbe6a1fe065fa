//! UTC timestamps in RFC 3339 with microseconds, written without a date crate: the access log
//! and the usage ledger stamp records with them. Pure.

use std::time::{SystemTime, UNIX_EPOCH};

/// `now` as RFC 3339 in UTC with microseconds (`2026-12-04T13:22:55.390665Z`), as tracing
/// writes it.
pub(crate) fn timestamp(now: SystemTime, out: &mut Vec<u8>) {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days);
    let two = |out: &mut Vec<u8>, v: u64| {
        out.extend_from_slice(&[b'0' + (v / 10) as u8, b'0' + (v % 10) as u8])
    };
    out.extend_from_slice(itoa::Buffer::new().format(y).as_bytes());
    out.push(b'-');
    two(out, m);
    out.push(b'-');
    two(out, day);
    out.push(b'T');
    two(out, rem / 3600);
    out.push(b':');
    two(out, rem / 60 % 60);
    out.push(b':');
    two(out, rem % 60);
    out.push(b'.');
    let us = u64::from(d.subsec_micros());
    let mut digits = [b'0'; 6];
    let mut v = us;
    for c in digits.iter_mut().rev() {
        *c = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// The (year, month, day) of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
pub(crate) fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a date on or after it (`m` in 1..=12, `y` ≥ 1).
pub(crate) fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
}

/// Days in month `m` of year `y`.
fn month_days(y: u64, m: u64) -> u64 {
    match m {
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A point in time an operator writes (`--since`, `from=`, `to=`), as Unix microseconds:
/// - a span back from `now_us`: `90s`, `30m`, `24h`, `7d`, `2w`;
/// - a day `2026-12-01` or a month `2026-12` (UTC), whose start it is, or with `end` the
///   start of the next one (so that `to=2026-12-01` takes in that whole day);
/// - RFC 3339 `2026-12-01T08:00:00Z` (a fraction and a `+01:00` offset allowed);
/// - Unix seconds `1764547200`.
///
/// `Err` says what is accepted. Dates before 1970 or after 9999 are refused.
pub(crate) fn parse_time(s: &str, now_us: u64, end: bool) -> Result<u64, String> {
    let s = s.trim();
    let refuse = || {
        format!(
            "`{}` is not a time: write a span back from now (`30m`, `24h`, `7d`, `2w`), a UTC \
             day `2026-12-01` or month `2026-12`, RFC 3339 `2026-12-01T08:00:00Z`, or Unix \
             seconds",
            s.chars().take(64).collect::<String>()
        )
    };
    let num = |t: &str| -> Option<u64> {
        (!t.is_empty() && t.len() <= 12 && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    if let Some(unit) = s.chars().last().filter(|c| "smhdw".contains(*c)) {
        if let Some(n) = num(&s[..s.len() - 1]) {
            let secs = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                _ => 7 * 86_400,
            };
            return Ok(now_us.saturating_sub(n.saturating_mul(secs).saturating_mul(1_000_000)));
        }
    }
    if let Some(n) = num(s) {
        return n.checked_mul(1_000_000).ok_or_else(refuse);
    }
    let b = s.as_bytes();
    let digits = |from: usize, len: usize| -> Option<u64> {
        let t = b.get(from..from + len)?;
        t.iter()
            .all(u8::is_ascii_digit)
            .then(|| t.iter().fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0')))
    };
    let sep = |at: usize, c: u8| b.get(at) == Some(&c);
    let (y, m) = match (digits(0, 4), sep(4, b'-'), digits(5, 2)) {
        (Some(y), true, Some(m)) if (1970..=9999).contains(&y) && (1..=12).contains(&m) => (y, m),
        _ => return Err(refuse()),
    };
    if b.len() == 7 {
        let (ny, nm) = match (end, m) {
            (false, _) => (y, m),
            (true, 12) => (y + 1, 1),
            (true, _) => (y, m + 1),
        };
        return Ok(days_from_civil(ny, nm, 1) * 86_400 * 1_000_000);
    }
    let d = match (sep(7, b'-'), digits(8, 2)) {
        (true, Some(d)) if (1..=month_days(y, m)).contains(&d) => d,
        _ => return Err(refuse()),
    };
    let day = days_from_civil(y, m, d) * 86_400;
    if b.len() == 10 {
        return Ok((day + if end { 86_400 } else { 0 }) * 1_000_000);
    }
    if !(sep(10, b'T') || sep(10, b't') || sep(10, b' ')) || !sep(13, b':') || !sep(16, b':') {
        return Err(refuse());
    }
    let (h, mi, sec) = match (digits(11, 2), digits(14, 2), digits(17, 2)) {
        (Some(h), Some(mi), Some(sec)) if h < 24 && mi < 60 && sec < 61 => (h, mi, sec),
        _ => return Err(refuse()),
    };
    let mut at = 19;
    let mut micros = 0u64;
    if sep(at, b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 6 {
                micros = micros * 10 + u64::from(b[at] - b'0');
            }
            at += 1;
        }
        if at == start {
            return Err(refuse());
        }
        for _ in (at - start)..6 {
            micros *= 10;
        }
    }
    let offset: i64 = match b.get(at..) {
        Some(b"Z" | b"z") => 0,
        Some(&[sign @ (b'+' | b'-'), ..]) if b.len() == at + 6 && sep(at + 3, b':') => {
            match (digits(at + 1, 2), digits(at + 4, 2)) {
                (Some(oh), Some(om)) if oh < 24 && om < 60 => {
                    let o = (oh * 3600 + om * 60) as i64;
                    if sign == b'+' {
                        o
                    } else {
                        -o
                    }
                }
                _ => return Err(refuse()),
            }
        }
        _ => return Err(refuse()),
    };
    let local = (day + h * 3600 + mi * 60 + sec) as i64;
    let utc = u64::try_from(local - offset).map_err(|_| refuse())?;
    Ok(utc * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_765_000_000_000_000;

    #[test]
    fn times_operators_write() {
        let day = |y, m, d| days_from_civil(y, m, d) * 86_400 * 1_000_000;
        assert_eq!(
            parse_time("7d", NOW, false),
            Ok(NOW - 7 * 86_400 * 1_000_000)
        );
        assert_eq!(parse_time("90s", NOW, false), Ok(NOW - 90_000_000));
        assert_eq!(
            parse_time("2w", NOW, false),
            Ok(NOW - 14 * 86_400 * 1_000_000)
        );
        assert_eq!(parse_time("2026-12-01", NOW, false), Ok(day(2026, 12, 1)));
        assert_eq!(parse_time("2026-12-01", NOW, true), Ok(day(2026, 12, 2)));
        assert_eq!(parse_time("2026-12", NOW, true), Ok(day(2027, 1, 1)));
        assert_eq!(parse_time("2028-02", NOW, false), Ok(day(2028, 2, 1)));
        assert_eq!(
            parse_time("1764547200", NOW, false),
            Ok(1_764_547_200_000_000)
        );
        assert_eq!(
            parse_time("2026-12-01T08:00:00Z", NOW, false),
            Ok(day(2026, 12, 1) + 8 * 3_600_000_000)
        );
        assert_eq!(
            parse_time("2026-12-01T08:00:00.25+01:00", NOW, false),
            Ok(day(2026, 12, 1) + 7 * 3_600_000_000 + 250_000)
        );
        assert_eq!(parse_time("2028-02-29", NOW, false), Ok(day(2028, 2, 29)));
        // A span longer than the epoch is the epoch.
        assert_eq!(parse_time("999999999999d", NOW, false), Ok(0));
    }

    #[test]
    fn what_is_not_a_time_is_refused_without_a_panic() {
        for s in [
            "",
            "d",
            "7x",
            "-7d",
            "2027-02-29",
            "2026-13-01",
            "2026-00",
            "1969-12-31",
            "2026-12-1",
            "2026-12-01T25:00:00Z",
            "2026-12-01T08:00:00",
            "2026-12-01T08:00:00.Z",
            "2026-12-01T08:00:00+1:00",
            "1970-01-01T00:00:00+01:00",
            "99999999999999999999",
            "2026-12-01T08:00:00Zjunk",
            "é",
            "2026-é",
            "😀😀😀😀-12",
        ] {
            assert!(parse_time(s, NOW, false).is_err(), "{s:?} was taken");
        }
    }

    #[test]
    fn days_round_trip() {
        for days in [0u64, 59, 365, 10_957, 20_423, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}

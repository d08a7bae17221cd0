//! Wall-clock times in audit output and filters: RFC 3339 (UTC) and Unix seconds.

/// Why a string is not a time [`parse_time`] accepts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a time: use RFC 3339 (2024-05-01T12:00:00Z, 2024-05-01T14:00:00+02:00, 2024-05-01) or Unix seconds"
)]
pub struct TimeParseError(String);

const NANOS: u64 = 1_000_000_000;

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `unix_ns` as RFC 3339 in UTC: `2024-05-01T12:00:00Z`, with as many
/// fractional digits as it needs.
pub fn format_rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / NANOS;
    let frac = unix_ns % NANOS;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX);
    let rem = secs % 86_400;
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    let mut out = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}");
    if frac != 0 {
        let digits = format!("{frac:09}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

fn number(s: &str, len: usize) -> Option<u32> {
    (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Parses RFC 3339 (`T` or a space between date and time; `Z` or an offset),
/// a bare date (midnight UTC), or Unix seconds (with an optional fraction),
/// into nanoseconds since the Unix epoch.
pub fn parse_time(input: &str) -> Result<u64, TimeParseError> {
    let err = || TimeParseError(input.chars().take(64).collect());
    let text = input.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
        let secs: u64 = whole.parse().map_err(|_| err())?;
        return secs
            .checked_mul(NANOS)
            .and_then(|n| n.checked_add(fraction_nanos(frac)?))
            .ok_or_else(err);
    }
    let (date, clock) = match text.len() {
        10 => (text, None),
        n if n > 10 && matches!(text.as_bytes()[10], b'T' | b't' | b' ') => {
            (&text[..10], Some(&text[11..]))
        }
        _ => return Err(err()),
    };
    let mut seconds = parse_date(date).ok_or_else(err)? * 86_400;
    let mut nanos = 0;
    if let Some(clock) = clock {
        let (secs, frac) = parse_clock(clock).ok_or_else(err)?;
        seconds += secs;
        nanos = frac;
    }
    let seconds = u64::try_from(seconds).map_err(|_| err())?;
    seconds
        .checked_mul(NANOS)
        .and_then(|n| n.checked_add(nanos))
        .ok_or_else(err)
}

/// `YYYY-MM-DD` as days since 1970-01-01 (not before it).
fn parse_date(date: &str) -> Option<i64> {
    let (year, rest) = date.split_once('-')?;
    let (month, day) = rest.split_once('-')?;
    let (year, month, day) = (number(year, 4)?, number(month, 2)?, number(day, 2)?);
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) || year < 1970 {
        return None;
    }
    Some(days_from_civil(i64::from(year), month, day))
}

/// `HH:MM:SS[.f](Z|±HH:MM)` as seconds into the UTC day (may be negative or
/// past a day, by the offset) and nanoseconds.
fn parse_clock(clock: &str) -> Option<(i64, u64)> {
    let (hms, offset) = split_offset(clock)?;
    let (hms, frac) = hms.split_once('.').unwrap_or((hms, ""));
    let mut parts = hms.split(':');
    let hour = number(parts.next()?, 2)?;
    let minute = number(parts.next()?, 2)?;
    let second = number(parts.next()?, 2)?;
    if parts.next().is_some() || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let secs = i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second) - offset;
    Some((secs, fraction_nanos(frac)?))
}

/// Splits `HH:MM:SS[.f](Z|±HH:MM)` into the clock and the offset in seconds east of UTC.
fn split_offset(time: &str) -> Option<(&str, i64)> {
    if let Some(clock) = time.strip_suffix(['Z', 'z']) {
        return Some((clock, 0));
    }
    let at = time.rfind(['+', '-'])?;
    let (clock, off) = (&time[..at], &time[at + 1..]);
    let (h, m) = off.split_once(':')?;
    let (h, m) = (number(h, 2)?, number(m, 2)?);
    if h > 23 || m > 59 {
        return None;
    }
    let secs = i64::from(h) * 3600 + i64::from(m) * 60;
    Some((
        clock,
        if time.as_bytes()[at] == b'-' {
            -secs
        } else {
            secs
        },
    ))
}

/// Nanoseconds of a fraction's digits (`"5"` → 500 ms); `""` is zero.
fn fraction_nanos(frac: &str) -> Option<u64> {
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.is_empty() {
        return Some(0);
    }
    let digits: u64 = frac.parse().ok()?;
    Some(digits * 10u64.pow(9 - u32::try_from(frac.len()).ok()?))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_rfc3339_and_unix_seconds() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            format_rfc3339(1_714_564_800_250_000_000),
            "2024-05-01T12:00:00.25Z"
        );
        assert_eq!(
            parse_time("2024-05-01T12:00:00.25Z").unwrap(),
            1_714_564_800_250_000_000
        );
        assert_eq!(
            parse_time("2024-05-01T14:00:00+02:00").unwrap(),
            1_714_564_800 * NANOS
        );
        assert_eq!(parse_time("2024-05-01").unwrap(), 1_714_521_600 * NANOS);
        assert_eq!(parse_time("1714564800").unwrap(), 1_714_564_800 * NANOS);
        assert_eq!(
            parse_time("1714564800.5").unwrap(),
            1_714_564_800_500_000_000
        );
        assert_eq!(parse_time("2024-02-29").unwrap(), 1_709_164_800 * NANOS);
        for bad in [
            "",
            "yesterday",
            "2023-02-29",
            "2024-13-01",
            "2024-05-01T25:00:00Z",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_day_round_trips() {
        for day in (0..200_000).step_by(37) {
            let ns = u64::try_from(day).unwrap() * 86_400 * NANOS + 3_723 * NANOS;
            assert_eq!(parse_time(&format_rfc3339(ns)).unwrap(), ns);
        }
    }
}

//! The maintenance window (`[reboot] window`): local time ranges `HH:MM-HH:MM` in which the
//! box may switch; a range whose end is before its start crosses midnight. Pure: the caller
//! hands in the local time of day (`sys::clock::local_minute_of_day`).

use std::fmt;

/// A range of the day in minutes since midnight, `start` included, `end` excluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    start: u16,
    end: u16,
}

const DAY: u16 = 24 * 60;

fn minutes(hhmm: &str) -> Option<u16> {
    let (h, m) = hhmm.trim().split_once(':')?;
    let ok = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit());
    if !ok(h) || !ok(m) {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    let t = h * 60 + m;
    (m < 60 && t <= DAY).then_some(t)
}

impl Range {
    /// Parses `HH:MM-HH:MM` (24 h; `24:00` as an end means midnight).
    pub fn parse(s: &str) -> Result<Range, String> {
        let bad = || format!("{s:?} is not a time range HH:MM-HH:MM");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (start, end) = (minutes(a).ok_or_else(bad)?, minutes(b).ok_or_else(bad)?);
        if start == DAY {
            return Err(bad());
        }
        if start == end {
            return Err(format!("{s:?} is empty (00:00-24:00 is the whole day)"));
        }
        Ok(Range { start, end })
    }

    /// Whether `minute` (since local midnight) is in the range.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hm = |t: u16| format!("{:02}:{:02}", t / 60, t % 60);
        write!(f, "{}-{}", hm(self.start), hm(self.end))
    }
}

/// Parses every range of a window.
pub fn parse(ranges: &[String]) -> Result<Vec<Range>, String> {
    ranges.iter().map(|r| Range::parse(r)).collect()
}

/// Whether `minute` is inside the window; no ranges at all: always.
pub fn open(window: &[Range], minute: u16) -> bool {
    window.is_empty() || window.iter().any(|r| r.contains(minute))
}

/// `minute` as `HH:MM`.
pub fn clock(minute: u16) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hhmm: &str) -> u16 {
        minutes(hhmm).unwrap()
    }

    #[test]
    fn ranges_parse_and_bad_ones_are_refused() {
        let r = Range::parse("01:00-05:30").unwrap();
        assert_eq!(r.to_string(), "01:00-05:30");
        assert_eq!(
            Range::parse(" 22:00 - 02:00 ").unwrap().to_string(),
            "22:00-02:00"
        );
        assert_eq!(
            Range::parse("00:00-24:00").unwrap().to_string(),
            "00:00-24:00"
        );
        for bad in [
            "",
            "01:00",
            "1:00-2:00",
            "25:00-01:00",
            "01:60-02:00",
            "24:00-01:00",
            "01:00-01:00",
            "aa:bb-cc:dd",
            "01:00-02:00-03:00",
            "-1:00-02:00",
        ] {
            assert!(Range::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_range_may_cross_midnight() {
        let night = Range::parse("22:00-02:00").unwrap();
        for (t, inside) in [
            ("21:59", false),
            ("22:00", true),
            ("23:59", true),
            ("00:00", true),
            ("01:59", true),
            ("02:00", false),
            ("12:00", false),
        ] {
            assert_eq!(night.contains(at(t)), inside, "{t}");
        }
        let day = Range::parse("01:00-05:00").unwrap();
        assert!(day.contains(at("01:00")) && day.contains(at("04:59")));
        assert!(!day.contains(at("05:00")) && !day.contains(at("00:59")));
        let all = Range::parse("00:00-24:00").unwrap();
        assert!(all.contains(0) && all.contains(DAY - 1));
        let to_midnight = Range::parse("20:00-24:00").unwrap();
        assert!(to_midnight.contains(at("23:59")) && !to_midnight.contains(0));
    }

    #[test]
    fn a_window_is_any_of_its_ranges_and_empty_means_always() {
        let w = parse(&["01:00-03:00".into(), "13:00-14:00".into()]).unwrap();
        assert!(open(&w, at("02:00")) && open(&w, at("13:30")));
        assert!(!open(&w, at("12:00")));
        assert!(open(&[], at("12:00")));
        assert!(parse(&["x".into()]).is_err());
        assert_eq!(clock(at("07:05")), "07:05");
    }
}

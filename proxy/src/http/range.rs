//! Single byte ranges of cached blobs (RFC 9110 `Range: bytes=`).

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RangeSpec {
    /// Not a single byte range we serve partially: send the whole body.
    Ignore,
    Satisfiable(u64, u64),
    Unsatisfiable,
}

/// Parses a single `bytes=` range against `size` (multi-range requests get
/// the whole body, which RFC 9110 allows).
pub(crate) fn parse_range(value: &str, size: u64) -> RangeSpec {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeSpec::Ignore;
    };
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Ignore;
    };
    let (start, end) = match (a.trim(), b.trim()) {
        ("", "") => return RangeSpec::Ignore,
        ("", suffix) => match suffix.parse::<u64>() {
            Ok(0) => return RangeSpec::Unsatisfiable,
            Ok(n) => (size.saturating_sub(n), size.saturating_sub(1)),
            Err(_) => return RangeSpec::Ignore,
        },
        (s, "") => match s.parse::<u64>() {
            Ok(s) => (s, size.saturating_sub(1)),
            Err(_) => return RangeSpec::Ignore,
        },
        (s, e) => match (s.parse::<u64>(), e.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e => (s, e.min(size.saturating_sub(1))),
            _ => return RangeSpec::Ignore,
        },
    };
    if size == 0 || start >= size {
        RangeSpec::Unsatisfiable
    } else {
        RangeSpec::Satisfiable(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeSpec::Satisfiable(0, 9));
        assert_eq!(
            parse_range("bytes=90-", 100),
            RangeSpec::Satisfiable(90, 99)
        );
        assert_eq!(
            parse_range("bytes=-10", 100),
            RangeSpec::Satisfiable(90, 99)
        );
        assert_eq!(
            parse_range("bytes=50-500", 100),
            RangeSpec::Satisfiable(50, 99)
        );
        assert_eq!(parse_range("bytes=100-", 100), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("items=0-1", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("bytes=9-1", 100), RangeSpec::Ignore);
    }
}

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

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Any header value against any size: no panic, and a satisfiable
        /// answer always lies inside the blob.
        #[test]
        fn any_range_value_is_safe(value in "\\PC{0,64}", size in proptest::num::u64::ANY) {
            if let RangeSpec::Satisfiable(a, b) = parse_range(&value, size) {
                proptest::prop_assert!(a <= b && b < size, "{value:?} {size}: {a}-{b}");
            }
        }

        /// Range-shaped values with numbers of any size (u64::MAX and
        /// beyond included).
        #[test]
        fn range_shaped_values_are_safe(
            a in "[0-9]{0,22}",
            b in "[0-9]{0,22}",
            sep in "(-| - |--|,)",
            size in proptest::prop_oneof![proptest::num::u64::ANY, 0u64..1024],
        ) {
            let value = format!("bytes={a}{sep}{b}");
            if let RangeSpec::Satisfiable(x, y) = parse_range(&value, size) {
                proptest::prop_assert!(x <= y && y < size, "{value:?} {size}: {x}-{y}");
            }
        }

        /// A well-formed range inside the blob is served exactly.
        #[test]
        fn ranges_inside_the_blob_are_exact(size in 1u64..u64::MAX, x in proptest::num::u64::ANY, y in proptest::num::u64::ANY) {
            let (a, b) = ((x % size).min(y % size), (x % size).max(y % size));
            proptest::prop_assert_eq!(
                parse_range(&format!("bytes={a}-{b}"), size),
                RangeSpec::Satisfiable(a, b)
            );
        }
    }
}

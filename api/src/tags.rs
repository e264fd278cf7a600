//! Tag freshness policy: how long a tag → digest answer is trusted before
//! the upstream is asked again, per tag, by ordered rules.
//!
//! ```yaml
//! tagPolicy:
//!   - {pattern: 'latest|main|master|stable', ttl: 0s}   # asked every pull
//!   - {pattern: 'v?\d+\.\d+\.\d+', ttl: immutable}      # never asked again
//! # any other tag: the registry's tagTTL
//! ```
//!
//! The first rule whose pattern matches the whole tag wins. Patterns are
//! Rust regular expressions (linear-time: a pattern cannot make matching
//! slow), implicitly anchored so `latest` does not match `latest-rc`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Rules per registry at most: a policy is read top to bottom per tag.
pub const MAX_RULES: usize = 32;
/// Longest pattern, in bytes.
pub const MAX_PATTERN_LEN: usize = 256;
/// Compiled size bound of one pattern (the regex crate's `size_limit`).
const COMPILED_SIZE_LIMIT: usize = 64 * 1024;
/// The `ttl` that never expires.
pub const IMMUTABLE: &str = "immutable";

/// How long an answer for a matching tag is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagTtl {
    /// Asked again once older than this; `0s` asks on every pull.
    After(Duration),
    /// Never asked again while the answer is cached (release tags that are
    /// never re-pushed). The upstream is still asked when nothing is cached.
    Immutable,
}

impl TagTtl {
    /// Whether an answer `age` old is still trusted.
    pub fn is_fresh(self, age: Duration) -> bool {
        match self {
            TagTtl::After(ttl) => age < ttl,
            TagTtl::Immutable => true,
        }
    }

    /// Parses `immutable` or a duration with `parse` (the config file takes
    /// humantime, the CRD Go syntax).
    pub fn parse_with(
        s: &str,
        parse: impl FnOnce(&str) -> Result<Duration, String>,
    ) -> Result<Self, String> {
        if s == IMMUTABLE {
            Ok(TagTtl::Immutable)
        } else {
            parse(s).map(TagTtl::After)
        }
    }
}

impl fmt::Display for TagTtl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TagTtl::After(d) => write!(f, "{}", humantime::format_duration(*d)),
            TagTtl::Immutable => f.write_str(IMMUTABLE),
        }
    }
}

impl Serialize for TagTtl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TagTtl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TagTtl::parse_with(&s, |s| {
            humantime::parse_duration(s).map_err(|e| e.to_string())
        })
        .map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is neither `{IMMUTABLE}` nor a duration like 0s, 10m, 1h30m: {e}"
            ))
        })
    }
}

/// One rule of a registry's `tagPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TagRule {
    /// Regular expression the whole tag must match.
    pub pattern: String,
    pub ttl: TagTtl,
}

/// A registry's rules, compiled, with its `tagTTL` for tags no rule matches.
#[derive(Debug, Clone)]
pub struct TagPolicy {
    rules: Vec<(regex::Regex, TagTtl)>,
    default: Duration,
}

/// What is wrong with which rule (`index` into the list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub index: Option<usize>,
    pub message: String,
}

impl TagPolicy {
    /// Compiles `rules`; the error names the rule and what is wrong.
    pub fn compile(rules: &[TagRule], default: Duration) -> Result<Self, RuleError> {
        if rules.len() > MAX_RULES {
            return Err(RuleError {
                index: None,
                message: format!("{} rules; at most {MAX_RULES}", rules.len()),
            });
        }
        let compiled = rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                compile_pattern(&r.pattern)
                    .map(|re| (re, r.ttl))
                    .map_err(|message| RuleError {
                        index: Some(i),
                        message,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            rules: compiled,
            default,
        })
    }

    /// Only the registry's `tagTTL`.
    pub fn uniform(default: Duration) -> Self {
        Self {
            rules: Vec::new(),
            default,
        }
    }

    /// The TTL for `tag`: the first matching rule's, else `tagTTL`.
    pub fn ttl(&self, tag: &str) -> TagTtl {
        self.rules
            .iter()
            .find(|(re, _)| re.is_match(tag))
            .map_or(TagTtl::After(self.default), |(_, ttl)| *ttl)
    }
}

impl PartialEq for TagPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.default == other.default
            && self.rules.len() == other.rules.len()
            && self
                .rules
                .iter()
                .zip(&other.rules)
                .all(|((a, x), (b, y))| a.as_str() == b.as_str() && x == y)
    }
}

fn compile_pattern(pattern: &str) -> Result<regex::Regex, String> {
    if pattern.is_empty() {
        return Err("pattern is empty".into());
    }
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(format!(
            "pattern is {} bytes; at most {MAX_PATTERN_LEN}",
            pattern.len()
        ));
    }
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(COMPILED_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("`{pattern}` is not a regular expression: {e}"))
}

/// A tag the proxy saw pointing at a new digest: an entry of `tagMoves`
/// in its `GET /status` (docs/cluster-contract.md), which the operator
/// turns into Events on the MirrorRegistry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TagMove {
    pub registry: String,
    pub repository: String,
    pub tag: String,
    pub from: String,
    pub to: String,
    /// Unix milliseconds.
    pub at: i64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rules(yaml: &str) -> Vec<TagRule> {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn first_matching_rule_wins_and_patterns_match_whole_tags() {
        let p = TagPolicy::compile(
            &rules(
                "- {pattern: 'latest|main|stable', ttl: 0s}\n- {pattern: 'v?\\d+\\.\\d+\\.\\d+', ttl: immutable}\n- {pattern: 'v?\\d+.*', ttl: 1h}\n",
            ),
            Duration::from_secs(600),
        )
        .unwrap();
        assert_eq!(p.ttl("latest"), TagTtl::After(Duration::ZERO));
        assert_eq!(p.ttl("main"), TagTtl::After(Duration::ZERO));
        // Anchored: a tag that merely contains `latest` is not `latest`.
        assert_eq!(p.ttl("latest-rc1"), TagTtl::After(Duration::from_secs(600)));
        assert_eq!(p.ttl("v1.2.3"), TagTtl::Immutable);
        assert_eq!(p.ttl("1.25.3"), TagTtl::Immutable);
        // `1.25` is not x.y.z: the third rule.
        assert_eq!(p.ttl("1.25"), TagTtl::After(Duration::from_secs(3600)));
        assert_eq!(p.ttl("edge"), TagTtl::After(Duration::from_secs(600)));
    }

    #[test]
    fn freshness() {
        assert!(TagTtl::Immutable.is_fresh(Duration::from_secs(u32::MAX.into())));
        assert!(!TagTtl::After(Duration::ZERO).is_fresh(Duration::ZERO));
        assert!(TagTtl::After(Duration::from_secs(2)).is_fresh(Duration::from_secs(1)));
        assert!(!TagTtl::After(Duration::from_secs(2)).is_fresh(Duration::from_secs(2)));
    }

    #[test]
    fn bad_rules_are_named() {
        let e = TagPolicy::compile(
            &rules("- {pattern: ok, ttl: 1m}\n- {pattern: '(unclosed', ttl: 1m}\n"),
            Duration::ZERO,
        )
        .unwrap_err();
        assert_eq!(e.index, Some(1));
        assert!(e.message.contains("(unclosed"), "{}", e.message);
        let e = TagPolicy::compile(&rules("- {pattern: '', ttl: 1m}\n"), Duration::ZERO);
        assert_eq!(e.unwrap_err().index, Some(0));
        let long = "a".repeat(MAX_PATTERN_LEN + 1);
        let e = TagPolicy::compile(
            &[TagRule {
                pattern: long,
                ttl: TagTtl::Immutable,
            }],
            Duration::ZERO,
        );
        assert!(e.unwrap_err().message.contains("at most"));
        // A pattern that compiles huge is refused, not built.
        let e = TagPolicy::compile(
            &[TagRule {
                pattern: "\\w{1000}\\w{1000}\\w{1000}".into(),
                ttl: TagTtl::Immutable,
            }],
            Duration::ZERO,
        );
        assert!(e.is_err());
        let many = vec![
            TagRule {
                pattern: "a".into(),
                ttl: TagTtl::Immutable
            };
            MAX_RULES + 1
        ];
        assert_eq!(
            TagPolicy::compile(&many, Duration::ZERO).unwrap_err().index,
            None
        );
    }

    #[test]
    fn ttl_round_trips_and_bad_ttl_is_explained() {
        let r = rules("- {pattern: a, ttl: immutable}\n- {pattern: b, ttl: 1h 30m}\n");
        assert_eq!(r[0].ttl, TagTtl::Immutable);
        assert_eq!(r[1].ttl, TagTtl::After(Duration::from_secs(5400)));
        let text = serde_norway::to_string(&r).unwrap();
        assert_eq!(rules(&text), r);
        let e = serde_norway::from_str::<Vec<TagRule>>("- {pattern: a, ttl: forever}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("forever") && e.contains("immutable"), "{e}");
    }
}

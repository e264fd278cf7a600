//! What a request was and how the cache took part in it: the words both
//! the access log and the metrics use, kept apart so neither imports the
//! other.

/// How the cache took part in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    /// Missed this replica's disk, found in the shared storage (S3).
    SharedHit,
    Miss,
    Stale,
    /// Passed through without caching (auth challenges, tag lists, pushes).
    Pass,
    /// Refused by the proxy itself.
    Denied,
}

impl CacheResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "HIT",
            CacheResult::SharedHit => "SHARED_HIT",
            CacheResult::Miss => "MISS",
            CacheResult::Stale => "STALE",
            CacheResult::Pass => "PASS",
            CacheResult::Denied => "DENIED",
        }
    }
}

/// What kind of request it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ping,
    Manifest,
    Tag,
    Blob,
    Token,
    /// `/v2/<repo>/referrers/<digest>`.
    Referrers,
    Other,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Ping => "ping",
            Kind::Manifest => "manifest",
            Kind::Tag => "tag",
            Kind::Blob => "blob",
            Kind::Token => "token",
            Kind::Referrers => "referrers",
            Kind::Other => "other",
        }
    }
}

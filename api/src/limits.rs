//! `limits:` of the proxy config: what clients may hold of the proxy's
//! listeners, and the upstream work they can make it do.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// `limits:`: bounds on what clients may hold of the proxy's listeners,
/// and on the upstream work they can make it do. Without them one client
/// could keep thousands of connections open that never finish a request
/// and exhaust the proxy's file descriptors, or make up repository names
/// so that the proxy asks a token realm with its `credentialsFile`
/// credentials once per name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Connections the HTTP and HTTPS listeners hold at once (together).
    /// Further clients wait in the kernel's accept queue until one closes.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Of those, the connections one client address may hold: a node's
    /// runtime pulls over a few, while without a bound one pod could take
    /// them all (requests it never reads hold a connection for
    /// `idleTimeout`) and every node would wait in the accept queue.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: u32,
    /// Concurrent HTTP/2 streams per connection.
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: u32,
    /// Longest time from connect (or from the end of the previous request
    /// on a kept-alive HTTP/1 connection) to a complete request head.
    #[serde(with = "humantime_serde", default = "default_header_read_timeout")]
    pub header_read_timeout: Duration,
    /// A connection that makes no progress for this long is closed. On
    /// HTTP/1 progress is any byte moving either way; on HTTP/2 it is a
    /// request arriving, request body data, response data taken by the
    /// client, or a response ending: pings and other frames alone do not
    /// keep a connection whose client reads none of its responses.
    #[serde(with = "humantime_serde", default = "default_idle_timeout")]
    pub idle_timeout: Duration,
    /// Longest TLS handshake on the HTTPS listener.
    #[serde(with = "humantime_serde", default = "default_tls_handshake_timeout")]
    pub tls_handshake_timeout: Duration,
    /// Token requests per minute, per registry, that the proxy makes with
    /// a registry's `credentialsFile` credentials for repositories it holds
    /// no token for and never read with them (a token bucket refilled at
    /// this rate). Renewals for repositories already read are not counted.
    /// Past it such a request is answered `429` without asking the realm.
    #[serde(default = "default_new_repository_tokens_per_minute")]
    pub new_repository_tokens_per_minute: u32,
    /// How many of those token requests may go at once before the rate
    /// applies (the bucket's size).
    #[serde(default = "default_new_repository_token_burst")]
    pub new_repository_token_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_connections_per_source: default_max_connections_per_source(),
            max_streams_per_connection: default_max_streams_per_connection(),
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
            tls_handshake_timeout: default_tls_handshake_timeout(),
            new_repository_tokens_per_minute: default_new_repository_tokens_per_minute(),
            new_repository_token_burst: default_new_repository_token_burst(),
        }
    }
}

impl Limits {
    pub(crate) fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Upper bound of every timeout: a deadline is `now + timeout`, which
    /// must not overflow, and a day is already far beyond any useful value.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
    /// Upper bound of `maxConnections` (far above any file-descriptor limit
    /// a proxy runs with).
    pub const MAX_CONNECTIONS: u32 = 1_000_000;
    /// Upper bound of `maxStreamsPerConnection`.
    pub const MAX_STREAMS: u32 = 10_000;
    /// Upper bound of `newRepositoryTokensPerMinute` (1000 a second: more
    /// is no limit on a realm at all).
    pub const MAX_TOKENS_PER_MINUTE: u32 = 60_000;
    /// Upper bound of `newRepositoryTokenBurst`.
    pub const MAX_TOKEN_BURST: u32 = 100_000;

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        for (key, value, max) in [
            (
                "limits.maxConnections",
                self.max_connections,
                Self::MAX_CONNECTIONS,
            ),
            (
                "limits.maxConnectionsPerSource",
                self.max_connections_per_source,
                Self::MAX_CONNECTIONS,
            ),
            (
                "limits.maxStreamsPerConnection",
                self.max_streams_per_connection,
                Self::MAX_STREAMS,
            ),
            (
                "limits.newRepositoryTokensPerMinute",
                self.new_repository_tokens_per_minute,
                Self::MAX_TOKENS_PER_MINUTE,
            ),
            (
                "limits.newRepositoryTokenBurst",
                self.new_repository_token_burst,
                Self::MAX_TOKEN_BURST,
            ),
        ] {
            if !(1..=max).contains(&value) {
                return Err(ConfigError::new(
                    key,
                    format!("must be between 1 and {max}"),
                ));
            }
        }
        for (key, value) in [
            ("limits.headerReadTimeout", self.header_read_timeout),
            ("limits.idleTimeout", self.idle_timeout),
            ("limits.tlsHandshakeTimeout", self.tls_handshake_timeout),
        ] {
            if value.is_zero() || value > Self::MAX_TIMEOUT {
                return Err(ConfigError::new(
                    key,
                    "must be more than 0s and at most 24h",
                ));
            }
        }
        Ok(())
    }
}

fn default_max_connections() -> u32 {
    8192
}

fn default_max_connections_per_source() -> u32 {
    512
}

fn default_max_streams_per_connection() -> u32 {
    128
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(20)
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(120)
}

fn default_tls_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

/// One a second: a cluster starting workloads from new repositories pulls
/// far fewer distinct ones than that once the burst is spent.
fn default_new_repository_tokens_per_minute() -> u32 {
    60
}

/// A node or a rollout pulling a hundred new repositories at once is not
/// slowed at all.
fn default_new_repository_token_burst() -> u32 {
    100
}

//! Registry host names as written in image references.

use std::ops::Not;

/// Docker Hub's name in image references, and the hosts it is known by.
pub const DOCKER_HUB: &str = "docker.io";

/// Validates a registry host as written in an image reference:
/// lowercase DNS name or IP, optional `:port`, no scheme or path.
pub fn validate_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("is empty".into());
    }
    if host.contains("://") {
        return Err(format!(
            "`{host}` must be a host name, not a URL (drop the scheme)"
        ));
    }
    if host.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(format!("`{host}` must be lowercase"));
    }
    let (name, port) = split_port(host);
    if let Some(port) = port
        && port.parse::<u16>().is_ok_and(|p| p != 0).not()
    {
        return Err(format!("`{host}` has an invalid port"));
    }
    let bracketed = name.starts_with('[') && name.ends_with(']');
    if bracketed {
        return name[1..name.len() - 1]
            .parse::<std::net::Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| format!("`{host}` is not a valid IPv6 address"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "`{host}` is not a valid host name (lowercase letters, digits, '-' and '.', optional :port)"
        ));
    }
    Ok(())
}

/// Splits `host[:port]` (IPv6 in brackets) into name and port.
pub fn split_port(host: &str) -> (&str, Option<&str>) {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.find(']') {
            Some(end) => {
                let name = &host[..end + 2];
                let port = host[end + 2..].strip_prefix(':');
                (name, port)
            }
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => (name, Some(port)),
        _ => (host, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_registry_hosts() {
        for h in [
            "quay.io",
            "docker.io",
            "registry.k8s.io",
            "localhost:5000",
            "10.0.0.1:443",
            "[::1]:5000",
            "my-reg.example",
        ] {
            assert_eq!(validate_host(h), Ok(()), "{h}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for h in [
            "",
            "https://quay.io",
            "Quay.io",
            "quay.io:0",
            "quay.io:http",
            "-a.io",
            "a..io",
            "a/b",
            "[::1",
            "quay io",
        ] {
            assert!(validate_host(h).is_err(), "{h}");
        }
    }

    #[test]
    fn splits_ports() {
        assert_eq!(split_port("quay.io:443"), ("quay.io", Some("443")));
        assert_eq!(split_port("quay.io"), ("quay.io", None));
        assert_eq!(split_port("[::1]:5"), ("[::1]", Some("5")));
        assert_eq!(split_port("[::1]"), ("[::1]", None));
    }
}

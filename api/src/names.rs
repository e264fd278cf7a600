//! Registry host names as written in image references.

use std::borrow::Cow;
use std::net::IpAddr;
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

/// Validates the name of a registry as image references carry it:
/// [`validate_host`], and a single DNS label needs a port. A reference's
/// first component names a registry only when it holds a '.' or a ':' (or
/// is `localhost`): `harbor/app` is Docker Hub's `docker.io/harbor/app`.
/// So no pull could name a registry `harbor`, while the agents would still
/// point the name `harbor` at the proxy on every node, and dockerd's Docker
/// Hub mirror requests for `harbor/app` would be routed to it rather than
/// to Docker Hub: one image name, two images, by runtime.
pub fn validate_reference_host(host: &str) -> Result<(), String> {
    validate_host(host)?;
    let (name, port) = split_port(host);
    if port.is_none() && !name.contains('.') && !name.starts_with('[') && name != "localhost" {
        return Err(format!(
            "`{host}` is a single name without a port: image references read `{host}/app` as Docker Hub's `docker.io/{host}/app`, so no pull names this registry; use a name with a dot (e.g. its cluster DNS name) or add its port (`{host}:5000`)"
        ));
    }
    Ok(())
}

/// Why `host` may not be mirrored, if it is a name the node itself depends
/// on: `localhost` (and `*.localhost`, RFC 6761), or an IP literal that is
/// loopback, link-local or unspecified. A registry under such a name would
/// have the agent hijack the node's own services, and the proxy would dial
/// itself or the cloud's metadata endpoint (169.254.169.254).
pub fn reserved_host(host: &str) -> Option<&'static str> {
    let (name, _) = split_port(host);
    if name == "localhost" || name.ends_with(".localhost") {
        return Some("localhost names the node itself");
    }
    let ip: std::net::IpAddr = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name)
        .parse()
        .ok()?;
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    let link_local = match ip {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    if ip.is_loopback() {
        Some("a loopback address names the node itself")
    } else if link_local {
        Some(
            "a link-local address reaches the node's own network (e.g. the cloud metadata service)",
        )
    } else if ip.is_unspecified() {
        Some("the unspecified address reaches the node itself")
    } else {
        None
    }
}

/// The name a registry claims `name` under: `host:443` is `host`, the
/// HTTPS port a client may write out (Go keeps an explicit port) and still
/// reach the same name; an IP literal is its address, written canonically
/// (`[fd00:0::1]` and `[FD00::0001]` are `[fd00::1]`, an IPv4-mapped one is
/// its IPv4 address), since every spelling reaches the same server. Two
/// registries may not claim one key.
pub fn claim_key(name: &str) -> Cow<'_, str> {
    let (host, port) = split_port(name);
    let port = port.filter(|p| *p != "443");
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    // Names, and what is no IP literal at all, keep their spelling: they
    // are validated (lowercase) before they claim anything.
    let Ok(ip) = literal.parse::<IpAddr>() else {
        return Cow::Borrowed(if port.is_some() { name } else { host });
    };
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let host = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    Cow::Owned(match port {
        Some(p) => format!("{host}:{p}"),
        None => host,
    })
}

/// How registry name `host` is written as the first segment of a mirror
/// location's path (`<proxy>/<segment>`, the proxy's path-prefix routing):
/// `host:port` as `host_port`. containers/image builds a mirror's
/// reference by putting the location in front of the repository, and a
/// ':' in a path makes that no reference at all (the whole pull fails, the
/// registry itself untried). No host name holds a '_', so the form is
/// unambiguous. None for an IPv6 literal, which no path segment can hold.
pub fn path_segment(host: &str) -> Option<String> {
    if host.starts_with('[') {
        return None;
    }
    Some(match split_port(host) {
        (name, Some(port)) => format!("{name}_{port}"),
        (name, None) => name.to_string(),
    })
}

/// The registry name `host:port` a path segment `host_port` stands for
/// (see [`path_segment`]); None for a segment not of that form.
pub fn from_path_segment(segment: &str) -> Option<String> {
    let (name, port) = segment.rsplit_once('_')?;
    let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    (digits && !name.is_empty()).then(|| format!("{name}:{port}"))
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
    fn a_registry_needs_a_name_references_can_carry() {
        for h in [
            "quay.io",
            "harbor:5000",
            "harbor.registry.svc",
            "10.0.0.1",
            "[fd00::1]",
            "localhost",
        ] {
            assert_eq!(validate_reference_host(h), Ok(()), "{h}");
        }
        let e = validate_reference_host("harbor").unwrap_err();
        assert!(e.contains("docker.io/harbor/app"), "{e}");
        // Still a host, for the names that are not registries.
        assert_eq!(validate_host("harbor"), Ok(()));
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
    fn refuses_names_the_node_itself_depends_on() {
        for h in [
            "localhost",
            "localhost:5000",
            "registry.localhost",
            "127.0.0.1",
            "127.1.2.3:443",
            "[::1]:5000",
            "[::ffff:127.0.0.1]",
            "[0:0:0:0:0:0:0:1]",
            "169.254.169.254",
            "[fe80::1]:5000",
            "0.0.0.0",
            "[::]",
        ] {
            assert!(reserved_host(h).is_some(), "{h}");
        }
        for h in [
            "quay.io",
            "localhost.example",
            "10.0.0.5:5000",
            "[fd00::1]:5000",
            "128.0.0.1",
            "169.255.0.1",
        ] {
            assert_eq!(reserved_host(h), None, "{h}");
        }
    }

    /// The mirror-path form of a name is a valid reference path segment
    /// and reads back as the name.
    #[test]
    fn names_with_ports_have_a_path_segment_that_reads_back() {
        for (host, segment) in [
            ("quay.io", "quay.io"),
            ("registry.local:5000", "registry.local_5000"),
            ("10.0.0.5:443", "10.0.0.5_443"),
        ] {
            assert_eq!(path_segment(host).as_deref(), Some(segment));
            // Reference grammar: lowercase alphanumerics split by `.`, `_`,
            // `__` or dashes; no ':'.
            assert!(!segment.contains(':'), "{segment}");
            if host.contains(':') {
                assert_eq!(from_path_segment(segment).as_deref(), Some(host));
            }
        }
        assert_eq!(path_segment("[fd00::1]:5000"), None);
        for s in ["quay.io", "my_repo", "a_", "_5000", "a_50x"] {
            assert_eq!(from_path_segment(s), None, "{s}");
        }
    }

    /// One address in any spelling is one claim: a second registry under
    /// another spelling of it is a duplicate.
    #[test]
    fn an_ip_literal_claims_its_address_in_any_spelling() {
        for h in [
            "[fd00::1]",
            "[fd00:0::1]",
            "[FD00:0000::0001]",
            "[fd00::1]:443",
            "[fd00:0:0:0:0:0:0:1]:443",
        ] {
            assert_eq!(claim_key(h), "[fd00::1]", "{h}");
        }
        assert_eq!(claim_key("[fd00:0::1]:5000"), "[fd00::1]:5000");
        assert_eq!(claim_key("[::ffff:10.0.0.1]:443"), "10.0.0.1");
        assert_eq!(claim_key("10.0.0.1:443"), "10.0.0.1");
        assert_eq!(claim_key("10.0.0.1:5000"), "10.0.0.1:5000");
        // Names keep their spelling; only the HTTPS port goes.
        assert_eq!(claim_key("quay.io:443"), "quay.io");
        assert_eq!(claim_key("quay.io:5000"), "quay.io:5000");
        assert_eq!(claim_key("[not-an-ip]"), "[not-an-ip]");
    }

    #[test]
    fn splits_ports() {
        assert_eq!(split_port("quay.io:443"), ("quay.io", Some("443")));
        assert_eq!(split_port("quay.io"), ("quay.io", None));
        assert_eq!(split_port("[::1]:5"), ("[::1]", Some("5")));
        assert_eq!(split_port("[::1]"), ("[::1]", None));
    }
}

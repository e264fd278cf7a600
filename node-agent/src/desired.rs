//! What each runtime should be told, derived from the config alone (no
//! files): which names `/etc/hosts` hijacks, which mirrors daemon.json
//! lists, which hosts.toml and drop-in entries exist.

use std::net::IpAddr;

use pullthrough_api::config::RegistryConfig;
use pullthrough_api::names::{self, DOCKER_HUB};

use crate::config::AgentConfig;
use crate::error::ConfigError;
use crate::patch::crio::CrioRegistry;
use crate::patch::daemon_json::DaemonJsonWant;
use crate::patch::hosts::HostsEntry;
use crate::patch::hosts_toml::server_for;

/// dockerd's share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerWant {
    pub hosts: Vec<HostsEntry>,
    pub daemon_json: DaemonJsonWant,
    /// `host[:port]` names that get the CA in `/etc/docker/certs.d`.
    pub ca_authorities: Vec<String>,
    /// Why registries were left out of `/etc/hosts`.
    pub notes: Vec<String>,
}

/// One containerd hosts.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdRegistry {
    /// The name in image references (host or alias).
    pub name: String,
    /// hosts.toml `server` (the upstream).
    pub server: String,
}

/// Names a registry answers to in `/etc/hosts`: host, aliases, auth hosts.
fn hijack_names(r: &RegistryConfig) -> impl Iterator<Item = &str> {
    r.names().chain(r.auth_hosts.iter().map(String::as_str))
}

/// `host:port` (an IPv6 literal is bracketed, `[::1]:5000`).
fn has_port(name: &str) -> bool {
    match name.rsplit_once(':') {
        Some((host, port)) => {
            !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    }
}

fn is_docker_hub(r: &RegistryConfig) -> bool {
    r.names().any(|n| n == DOCKER_HUB)
}

/// dockerd: Docker Hub through `registry-mirrors` (its built-in endpoint
/// ignores certs.d, so hijacking it would need the system trust store);
/// every other registry with `nodes.dnsHijack` through `/etc/hosts`, except
/// those `proxy.neverHijack` protects.
pub fn docker(cfg: &AgentConfig) -> Result<DockerWant, ConfigError> {
    let p = &cfg.proxy;
    let mut notes = Vec::new();
    let mut hijacked: Vec<String> = Vec::new();
    let mut mirrors = Vec::new();
    for r in &cfg.table.registries {
        if !r.nodes.dns_hijack {
            continue;
        }
        if is_docker_hub(r) {
            mirrors.push(p.base_url());
            continue;
        }
        if let Some(n) = hijack_names(r).find(|n| p.never_hijack.iter().any(|h| h == n)) {
            notes.push(format!(
                "{}: not hijacked ({n} is in proxy.neverHijack: pullthrough's own images come from there)",
                r.host
            ));
            continue;
        }
        // /etc/hosts maps names, not ports: dockerd would dial the port
        // such a name carries on the proxy's address, where nothing
        // listens, or (the entry being invalid) resolve the name as before
        // and pull around the proxy. Said, not done; the registry's other
        // names are hijacked as usual.
        for n in hijack_names(r).filter(|n| has_port(n)) {
            notes.push(format!(
                "{}: {n} not hijacked for dockerd (it has a port, which /etc/hosts cannot redirect; containerd and CRI-O mirror it)",
                r.host
            ));
        }
        hijacked.extend(hijack_names(r).filter(|n| !has_port(n)).map(String::from));
    }
    let mut hosts = Vec::new();
    if !hijacked.is_empty() {
        let address: IpAddr = p.address.parse().map_err(|_| ConfigError::AddressNotIp {
            address: p.address.clone(),
            names: hijacked.join(", "),
        })?;
        let (port, needed, key) = if p.uses_tls() {
            (p.https_port, 443, "httpsPort")
        } else {
            (p.http_port.unwrap_or(0), 80, "httpPort")
        };
        if port != needed {
            return Err(ConfigError::HijackPort {
                key,
                port,
                needed,
                names: hijacked.join(", "),
                address: p.address.clone(),
            });
        }
        hosts = hijacked
            .iter()
            .map(|name| HostsEntry {
                address,
                name: name.clone(),
            })
            .collect();
    }
    let (insecure, ca_authorities) = if p.uses_tls() {
        let mut cas = hijacked.clone();
        cas.push(p.authority());
        (Vec::new(), cas)
    } else {
        (hijacked.clone(), Vec::new())
    };
    Ok(DockerWant {
        hosts,
        daemon_json: DaemonJsonWant {
            registry_mirrors: mirrors,
            insecure_registries: insecure,
        },
        ca_authorities,
        notes,
    })
}

/// containerd: a hosts.toml per registry name with `nodes.containerd`.
/// containerd falls back to the upstream when the proxy fails, so
/// `neverHijack` does not apply here.
pub fn containerd(cfg: &AgentConfig) -> Vec<ContainerdRegistry> {
    cfg.table
        .registries
        .iter()
        .filter(|r| r.nodes.containerd)
        .flat_map(|r| {
            let server = server_for(&r.host, r.upstream.as_deref());
            r.names().map(move |n| ContainerdRegistry {
                name: n.to_string(),
                server: server.clone(),
            })
        })
        .collect()
}

/// CRI-O/podman: a `[[registry]]` per name with `nodes.crio`, mirrored at
/// `<proxy>/<host>` (`host_port` for a host with a port: see
/// [`names::path_segment`]). A registry named by an IPv6 literal has no
/// such path and is left to CRI-O's own config, with a warning.
pub fn crio(cfg: &AgentConfig) -> Vec<CrioRegistry> {
    let p = &cfg.proxy;
    cfg.table
        .registries
        .iter()
        .filter(|r| r.nodes.crio)
        .filter_map(|r| {
            let segment = names::path_segment(&r.host);
            if segment.is_none() {
                tracing::warn!(registry = %r.host,
                    "an IPv6 literal cannot be a mirror path for CRI-O/podman; not mirrored there");
            }
            segment.map(|segment| (r, segment))
        })
        .flat_map(|(r, segment)| {
            r.names().map(move |n| CrioRegistry {
                prefix: n.to_string(),
                mirror: format!("{}/{segment}", p.authority()),
                insecure: !p.uses_tls(),
                upstream: crate::patch::hosts_toml::server_for(&r.host, r.upstream.as_deref())
                    .split_once("://")
                    .map_or_else(String::new, |(_, rest)| rest.to_string()),
                admin: None,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pullthrough_api::config::ProxyConfig;

    fn cfg(yaml: &str) -> AgentConfig {
        let table = ProxyConfig::from_yaml(yaml).unwrap();
        AgentConfig {
            proxy: table.proxy.clone().unwrap(),
            table,
            ca_pem: None,
            sha256: String::new(),
        }
    }

    const TABLE: &str = "
registries:
  - {host: docker.io, upstream: 'https://registry-1.docker.io', aliases: [registry-1.docker.io], authHosts: [auth.docker.io]}
  - {host: quay.io, authHosts: [cdn.quay.io]}
  - {host: ghcr.io}
  - {host: gcr.io, nodes: {dnsHijack: false, crio: false}}
";

    #[test]
    fn docker_hijacks_all_but_hub_and_protected_registries() {
        let c = cfg(&format!(
            "proxy: {{address: 10.0.0.5, caFile: ca.crt, neverHijack: [ghcr.io]}}\n{TABLE}"
        ));
        let d = docker(&c).unwrap();
        let names: Vec<_> = d.hosts.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["quay.io", "cdn.quay.io"]);
        assert_eq!(d.daemon_json.registry_mirrors, ["https://10.0.0.5"]);
        assert!(d.daemon_json.insecure_registries.is_empty());
        assert_eq!(d.ca_authorities, ["quay.io", "cdn.quay.io", "10.0.0.5"]);
        assert!(d.notes[0].contains("neverHijack"), "{:?}", d.notes);
    }

    #[test]
    fn a_name_with_a_port_is_not_hijacked_and_says_so() {
        let c = cfg(
            "proxy: {address: 10.0.0.5, caFile: c}\nregistries:\n  - {host: 'registry.local:5000'}\n  - {host: quay.io, aliases: ['quay.local:8443']}\n  - {host: ghcr.io}\n",
        );
        let d = docker(&c).unwrap();
        let names: Vec<_> = d.hosts.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["quay.io", "ghcr.io"]);
        assert_eq!(d.ca_authorities, ["quay.io", "ghcr.io", "10.0.0.5"]);
        assert_eq!(d.notes.len(), 2, "{:?}", d.notes);
        assert!(
            d.notes[0].contains("registry.local:5000 not hijacked"),
            "{:?}",
            d.notes
        );
        assert!(
            d.notes[1].contains("quay.local:8443 not hijacked"),
            "{:?}",
            d.notes
        );
        assert!(has_port("[::1]:5000") && !has_port("fd00::1") && !has_port("quay.io"));
    }

    #[test]
    fn plain_http_mode_uses_insecure_registries() {
        let c = cfg(&format!(
            "proxy: {{address: 10.0.0.5, httpPort: 80}}\n{TABLE}"
        ));
        let d = docker(&c).unwrap();
        assert_eq!(d.daemon_json.registry_mirrors, ["http://10.0.0.5"]);
        assert_eq!(
            d.daemon_json.insecure_registries,
            ["quay.io", "cdn.quay.io", "ghcr.io"]
        );
        assert!(d.ca_authorities.is_empty());
    }

    #[test]
    fn hijack_needs_an_ip_on_the_standard_port() {
        let c = cfg(&format!(
            "proxy: {{address: proxy.local, caFile: c}}\n{TABLE}"
        ));
        assert!(docker(&c).unwrap_err().to_string().contains("needs an IP"));
        let c = cfg(&format!(
            "proxy: {{address: 10.0.0.5, caFile: c, httpsPort: 5443}}\n{TABLE}"
        ));
        assert!(docker(&c).unwrap_err().to_string().contains("port 443"));
        // Only Docker Hub: no hijack, so any address and port will do.
        let c = cfg(
            "proxy: {address: proxy.local, caFile: c, httpsPort: 5443}\nregistries: [{host: docker.io}]\n",
        );
        let d = docker(&c).unwrap();
        assert!(d.hosts.is_empty());
        assert_eq!(d.daemon_json.registry_mirrors, ["https://proxy.local:5443"]);
    }

    #[test]
    fn containerd_and_crio_entries() {
        let c = cfg(&format!(
            "proxy: {{address: 10.0.0.5, caFile: c, httpsPort: 5443}}\n{TABLE}"
        ));
        let names: Vec<_> = containerd(&c)
            .into_iter()
            .map(|r| (r.name, r.server))
            .collect();
        assert_eq!(
            names[0],
            ("docker.io".into(), "https://registry-1.docker.io".into())
        );
        assert_eq!(
            names[1],
            (
                "registry-1.docker.io".into(),
                "https://registry-1.docker.io".into()
            )
        );
        assert_eq!(names.len(), 5);
        let cr = crio(&c);
        assert_eq!(cr.len(), 4, "gcr.io opted out");
        assert_eq!(cr[1].prefix, "registry-1.docker.io");
        assert_eq!(cr[1].mirror, "10.0.0.5:5443/docker.io");
    }
}

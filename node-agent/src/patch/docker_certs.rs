//! Trust for the proxy's CA in the `certs.d` directories that dockerd
//! (`/etc/docker/certs.d/<host[:port]>/`) and containers/image
//! (`/etc/containers/certs.d/<host[:port]>/`) read: both load every `*.crt`
//! file there as a CA, so the agent writes its own `pullthrough-ca.crt`
//! next to whatever the admin keeps in the directory (a `ca.crt` of theirs
//! is never touched or shadowed).

use super::{PatchError, check_ca_pem};

/// dockerd's certs.d.
pub const DOCKER_CERTS_D: &str = "/etc/docker/certs.d";
/// containers/image's (CRI-O, podman) certs.d.
pub const CONTAINERS_CERTS_D: &str = "/etc/containers/certs.d";
/// The CA file the agent writes in each directory.
pub const CA_FILE_NAME: &str = "pullthrough-ca.crt";

/// Host paths of the CA files for these `host[:port]` names under
/// `certs_d`, sorted and deduplicated.
pub fn ca_paths<'a>(certs_d: &str, authorities: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = authorities
        .into_iter()
        .map(|a| format!("{certs_d}/{a}/{CA_FILE_NAME}"))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The bytes of one CA file: the PEM as given, checked to hold a
/// certificate, with a final newline.
pub fn ca_file(pem: &[u8]) -> Result<Vec<u8>, PatchError> {
    check_ca_pem(pem)?;
    let mut out = pem.to_vec();
    if !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_per_authority() {
        assert_eq!(
            ca_paths(DOCKER_CERTS_D, ["quay.io", "10.0.0.5:5443", "quay.io"]),
            [
                "/etc/docker/certs.d/10.0.0.5:5443/pullthrough-ca.crt",
                "/etc/docker/certs.d/quay.io/pullthrough-ca.crt",
            ]
        );
    }

    #[test]
    fn the_ca_must_be_a_certificate() {
        assert!(ca_file(b"not a cert").is_err());
        let pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----";
        assert!(ca_file(pem).unwrap().ends_with(b"-----\n"));
    }
}

//! Objects MirrorRegistries point at: `spec.tls.caBundleConfigMapRef` (a
//! ConfigMap key with PEM roots) and `spec.credentialsSecretRef` (upstream
//! credentials). They are read with the operator's own token, so RBAC
//! decides what may be referenced: the release namespace, plus the chart's
//! `operator.referenceNamespaces`.
//!
//! A reference that cannot be used (missing, forbidden, malformed, a
//! request the API server refuses as such: 400, 422) is a problem of that
//! one MirrorRegistry (`Accepted=False`); an API server that does not
//! answer, or answers anything else (429 when it sheds load, 401, 5xx), is
//! a reconcile error, so a hiccup never drops a working registry from the
//! table. References of a spec the table refuses anyway (`InvalidSpec`, a
//! name the API server could not hold among them) are never read.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use base64::Engine;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};
use pullthrough_api::config::RegistryConfig;
use pullthrough_api::crd::{ConfigMapKeyRef, MirrorRegistry, SecretRef};
use serde::Deserialize;

use crate::error::Error;

/// Upstream credentials for one registry, in the form the proxy reads from
/// `registries[].credentialsFile`: `{"username": ..., "password": ...}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The proxy's credentials-file content.
    pub fn to_json(&self) -> String {
        serde_json::json!({"username": self.username, "password": self.password}).to_string()
    }
}

/// The referenced objects, read once per table render.
#[derive(Debug, Default, Clone)]
pub struct Refs {
    config_maps: HashMap<(String, String), Result<BTreeMap<String, String>, String>>,
    secrets: HashMap<(String, String), Result<Secret, String>>,
}

/// What went wrong reading a reference, for the condition message.
fn describe(kind: &str, ns: &str, name: &str, e: &kube::Error) -> Option<String> {
    match e {
        kube::Error::Api(s) if s.code == 403 => Some(format!(
            "the operator may not read {kind} {ns}/{name}: add `{ns}` to the chart value \
             operator.referenceNamespaces (or keep the {kind} in the release namespace)"
        )),
        kube::Error::Api(s) if s.code == 404 => Some(format!("{kind} {ns}/{name} not found")),
        // The request itself is wrong, and it is this reference's: the
        // same request fails on every retry, so failing the reconcile
        // would block every registry (and every deletion) for one bad
        // name.
        kube::Error::Api(s) if s.code == 400 || s.code == 422 => Some(format!(
            "the API server refuses to read {kind} {ns}/{name}: {}",
            s.message
        )),
        kube::Error::BuildRequest(e) => {
            Some(format!("{kind} {ns}/{name} cannot be requested: {e}"))
        }
        // Any other answer (429 after the client's retries, 401 for the
        // operator's own token, 408, 5xx) and connection errors say
        // nothing about the registry: the reconcile fails and is retried,
        // and the table keeps the registry as it was.
        _ => None,
    }
}

/// [`describe`]'s message, or the error that fails the reconcile, naming
/// the object it could not read.
fn describe_or_fail(kind: &str, ns: &str, name: &str, e: kube::Error) -> Result<String, Error> {
    describe(kind, ns, name, &e).ok_or_else(|| Error::Kube {
        action: format!("reading {kind} {ns}/{name}"),
        source: e,
    })
}

impl Refs {
    /// Reads every object referenced by the live MirrorRegistries in `crs`.
    pub async fn read<'a>(
        client: &Client,
        crs: impl IntoIterator<Item = &'a MirrorRegistry>,
    ) -> Result<Self, Error> {
        let mut refs = Refs::default();
        for cr in crs {
            // Left out of the table anyway: a deleting one, and one whose
            // spec is invalid, whose references may not even make a
            // request (kube-rs puts their names into the path as they are).
            if cr.metadata.deletion_timestamp.is_some()
                || RegistryConfig::try_from(&cr.spec).is_err()
            {
                continue;
            }
            if let Some(r) = cr
                .spec
                .tls
                .as_ref()
                .and_then(|t| t.ca_bundle_config_map_ref.as_ref())
            {
                let id = (r.namespace.clone(), r.name.clone());
                if let Entry::Vacant(slot) = refs.config_maps.entry(id) {
                    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &r.namespace);
                    slot.insert(match api.get(&r.name).await {
                        Ok(cm) => Ok(cm.data.unwrap_or_default()),
                        Err(e) => Err(describe_or_fail("ConfigMap", &r.namespace, &r.name, e)?),
                    });
                }
            }
            if let Some(r) = &cr.spec.credentials_secret_ref {
                let id = (r.namespace.clone(), r.name.clone());
                if let Entry::Vacant(slot) = refs.secrets.entry(id) {
                    let api: Api<Secret> = Api::namespaced(client.clone(), &r.namespace);
                    slot.insert(match api.get(&r.name).await {
                        Ok(s) => Ok(s),
                        Err(e) => Err(describe_or_fail("Secret", &r.namespace, &r.name, e)?),
                    });
                }
            }
        }
        Ok(refs)
    }

    /// Adds an object as if read (tests).
    pub fn with_config_map(mut self, ns: &str, name: &str, data: &[(&str, &str)]) -> Self {
        self.config_maps.insert(
            (ns.into(), name.into()),
            Ok(data
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()),
        );
        self
    }

    /// Adds a Secret as if read (tests).
    pub fn with_secret(mut self, secret: Secret) -> Self {
        let id = (
            secret.metadata.namespace.clone().unwrap_or_default(),
            secret.metadata.name.clone().unwrap_or_default(),
        );
        self.secrets.insert(id, Ok(secret));
        self
    }

    /// The PEM bundle `r` points at.
    pub fn ca_bundle(&self, r: &ConfigMapKeyRef) -> Result<String, String> {
        let data = self
            .config_maps
            .get(&(r.namespace.clone(), r.name.clone()))
            .ok_or_else(|| format!("ConfigMap {}/{} was not read", r.namespace, r.name))?
            .as_ref()
            .map_err(Clone::clone)?;
        let pem = data.get(&r.key).ok_or_else(|| {
            format!(
                "ConfigMap {}/{} has no key `{}` (keys: {})",
                r.namespace,
                r.name,
                r.key,
                data.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!(
                "ConfigMap {}/{} key `{}` holds no PEM certificate",
                r.namespace, r.name, r.key
            ));
        }
        Ok(pem.clone())
    }

    /// The credentials `r` holds for a registry known by `names` (host,
    /// aliases, upstream host).
    pub fn credentials(&self, r: &SecretRef, names: &[&str]) -> Result<Credentials, String> {
        let secret = self
            .secrets
            .get(&(r.namespace.clone(), r.name.clone()))
            .ok_or_else(|| format!("Secret {}/{} was not read", r.namespace, r.name))?
            .as_ref()
            .map_err(Clone::clone)?;
        credentials_from_secret(secret, names)
            .map_err(|e| format!("Secret {}/{}: {e}", r.namespace, r.name))
    }
}

/// `kubernetes.io/dockerconfigjson` (`.dockerconfigjson`, the `auths` entry
/// for one of `names`), or `kubernetes.io/basic-auth` / any Secret with
/// `username` and `password` keys. A dockerconfigjson entry for another
/// registry is never used, even as the only one: those credentials would go
/// to an upstream they were not issued for.
pub fn credentials_from_secret(secret: &Secret, names: &[&str]) -> Result<Credentials, String> {
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &str| -> Result<Option<String>, String> {
        data.get(key)
            .map(|b| {
                String::from_utf8(b.0.clone()).map_err(|_| format!("key `{key}` is not UTF-8"))
            })
            .transpose()
    };
    if let Some(json) = text(".dockerconfigjson")? {
        return from_docker_config(&json, names);
    }
    match (text("username")?, text("password")?) {
        (Some(username), Some(password)) if !username.is_empty() => {
            Ok(Credentials { username, password })
        }
        _ => Err(format!(
            "expected a kubernetes.io/dockerconfigjson Secret (key .dockerconfigjson) or \
             keys `username` and `password`; found keys: {}",
            data.keys().cloned().collect::<Vec<_>>().join(", ")
        )),
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    username: Option<String>,
    password: Option<String>,
    auth: Option<String>,
}

/// The registry part of an `auths` key: `https://index.docker.io/v1/` →
/// `index.docker.io`.
fn auth_key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

fn from_docker_config(json: &str, names: &[&str]) -> Result<Credentials, String> {
    // serde_json's message quotes the value it choked on, which may be a
    // password: only the kind of error and where it is go into the
    // condition and the Event (both readable well beyond the Secret).
    let cfg: DockerConfig = serde_json::from_str(json).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Data => "not shaped like a Docker config",
            serde_json::error::Category::Eof => "cut short",
            serde_json::error::Category::Syntax | serde_json::error::Category::Io => {
                "not valid JSON"
            }
        };
        format!(
            ".dockerconfigjson is {kind} (at line {}, column {}; expected {{\"auths\": {{\"<host>\": {{\"username\", \"password\"}} or {{\"auth\"}}}}}})",
            e.line(),
            e.column()
        )
    })?;
    // Docker Hub credentials are stored under index.docker.io.
    let hub = names
        .iter()
        .any(|n| *n == pullthrough_api::names::DOCKER_HUB || *n == "registry-1.docker.io");
    let wanted = |h: &str| names.contains(&h) || (hub && h == "index.docker.io");
    let entry = cfg
        .auths
        .iter()
        .find(|(k, _)| wanted(auth_key_host(k)))
        .ok_or_else(|| {
            format!(
                ".dockerconfigjson has no auths entry for {} (entries: {})",
                names.join(", "),
                cfg.auths.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
    let (key, a) = entry;
    match (&a.username, &a.password, &a.auth) {
        (Some(u), Some(p), _) if !u.is_empty() => Ok(Credentials {
            username: u.clone(),
            password: p.clone(),
        }),
        (_, _, Some(auth)) => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| format!("auths[{key}].auth is not base64"))?;
            let s =
                String::from_utf8(raw).map_err(|_| format!("auths[{key}].auth is not UTF-8"))?;
            let (u, p) = s
                .split_once(':')
                .ok_or_else(|| format!("auths[{key}].auth is not `user:password`"))?;
            Ok(Credentials {
                username: u.into(),
                password: p.into(),
            })
        }
        _ => Err(format!(
            "auths[{key}] has neither username/password nor auth"
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(data: &[(&str, &str)]) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some("creds".into());
        s.metadata.namespace = Some("ns".into());
        s.data = Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        );
        s
    }

    #[test]
    fn basic_auth_secret() {
        let c = credentials_from_secret(
            &secret(&[("username", "u"), ("password", "p")]),
            &["quay.io"],
        )
        .unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "p"));
        assert!(!format!("{c:?}").contains("\"p\""), "{c:?}");
        assert_eq!(c.to_json(), r#"{"username":"u","password":"p"}"#);
    }

    #[test]
    fn docker_config_picks_the_registry_entry() {
        let auth = base64::engine::general_purpose::STANDARD.encode("hubuser:hubpw");
        let json = format!(
            r#"{{"auths": {{"quay.io": {{"username": "q", "password": "qp"}},
                "https://index.docker.io/v1/": {{"auth": "{auth}"}}}}}}"#
        );
        let s = secret(&[(".dockerconfigjson", &json)]);
        let hub = credentials_from_secret(&s, &["docker.io"]).unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("hubuser", "hubpw")
        );
        let quay = credentials_from_secret(&s, &["quay.io"]).unwrap();
        assert_eq!(quay.username, "q");
        let err = credentials_from_secret(&s, &["ghcr.io"]).unwrap_err();
        assert!(err.contains("no auths entry for ghcr.io"), "{err}");
    }

    #[test]
    fn an_entry_for_another_registry_is_never_used() {
        let s = secret(&[(
            ".dockerconfigjson",
            r#"{"auths": {"reg.lan:5000": {"username": "a", "password": "b"}}}"#,
        )]);
        let err = credentials_from_secret(&s, &["other.lan"]).unwrap_err();
        assert!(
            err.contains("no auths entry for other.lan (entries: reg.lan:5000)"),
            "{err}"
        );
        assert_eq!(
            credentials_from_secret(&s, &["reg.lan:5000"])
                .unwrap()
                .username,
            "a"
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let err = credentials_from_secret(&secret(&[("token", "x")]), &["q"]).unwrap_err();
        assert!(err.contains("found keys: token"), "{err}");
        let err =
            credentials_from_secret(&secret(&[(".dockerconfigjson", "{")]), &["q"]).unwrap_err();
        assert!(err.contains(".dockerconfigjson is cut short"), "{err}");
    }

    /// A malformed dockerconfigjson must not have its values quoted in the
    /// error: it becomes a condition message and an Event, readable by
    /// many more than the Secret.
    #[test]
    fn a_malformed_docker_config_is_not_quoted() {
        for json in [
            r#"{"auths": {"q": "robot:hunter2"}}"#,
            r#"{"auths": {"q": {"username": "robot", "password": 271828}}}"#,
            r#"{"auths": {"q": {"username": "robot", "password": "hunter2"}"#,
            r#"{"auths": {"q": {"username": "robot", "password": hunter2}}}"#,
        ] {
            let err = credentials_from_secret(&secret(&[(".dockerconfigjson", json)]), &["q"])
                .unwrap_err();
            assert!(err.contains(".dockerconfigjson is"), "{err}");
            for secret in ["hunter2", "271828", "robot"] {
                assert!(!err.contains(secret), "{secret} quoted: {err}");
            }
        }
    }

    /// What a reference read's failure says about the registry: a
    /// request refused as malformed (or one that cannot be built) is that
    /// registry's problem, every time; throttling, auth and server errors
    /// are not, and fail the reconcile.
    #[test]
    fn a_malformed_request_is_the_registrys_problem() {
        let api = |code: u16| {
            kube::Error::Api(
                kube::core::Status::failure("why", "Reason")
                    .with_code(code)
                    .boxed(),
            )
        };
        for code in [400, 422, 403, 404] {
            assert!(
                describe("Secret", "ns", "x", &api(code)).is_some(),
                "{code}"
            );
        }
        for code in [401, 408, 429, 500, 503] {
            assert!(
                describe("Secret", "ns", "x", &api(code)).is_none(),
                "{code}"
            );
        }
        let unbuildable = http::Request::get("/api/v1/namespaces/ns/secrets/a b")
            .body(())
            .unwrap_err();
        let e = kube::Error::BuildRequest(kube::core::request::Error::BuildRequest(unbuildable));
        let why = describe("Secret", "ns", "a b", &e).unwrap();
        assert!(why.contains("Secret ns/a b cannot be requested"), "{why}");
        let empty = kube::Error::BuildRequest(kube::core::request::Error::Validation(
            "A non-empty name is required".into(),
        ));
        assert!(describe("Secret", "ns", "", &empty).is_some());
    }

    #[test]
    fn ca_bundle_errors_name_the_key() {
        let refs = Refs::default().with_config_map("ns", "cm", &[("other", "x")]);
        let r = ConfigMapKeyRef {
            name: "cm".into(),
            namespace: "ns".into(),
            key: "ca.crt".into(),
        };
        let err = refs.ca_bundle(&r).unwrap_err();
        assert!(err.contains("no key `ca.crt` (keys: other)"), "{err}");
    }
}

//! Tests of loading, credentials files and the reload watcher.

use super::*;

#[test]
fn embedded_default_serves_the_big_five() {
    let c = load(None).unwrap();
    for host in [
        "docker.io",
        "quay.io",
        "registry.k8s.io",
        "gcr.io",
        "ghcr.io",
    ] {
        assert!(c.registry(host).is_some(), "{host}");
    }
    assert_eq!(
        c.registry("docker.io").unwrap().upstream_url(),
        "https://registry-1.docker.io"
    );
    assert_eq!(c.default_registry.as_deref(), Some("docker.io"));
    assert!(c.listen.https.unwrap().ip().is_loopback());
}

#[test]
fn proxy_settings_come_from_the_shared_config() {
    let (c, s) = parse(
        "cache: {maxSize: 10GiB, highWatermark: 0.9, lowWatermark: 0.8}\nauthCheckTTL: 5s\nadminToken: t\nregistries:\n  - host: quay.io\n    private: true\n    cacheTags: false\n    tagTTL: 1s\n  - host: b.io\n",
    )
    .unwrap();
    assert_eq!(c.registries.len(), 2);
    assert_eq!(c.registries[0].tag_ttl, Duration::from_secs(1));
    assert_eq!(s.cache.max_size.unwrap().as_u64(), 10 << 30);
    assert_eq!(s.auth_check_ttl, Duration::from_secs(5));
    assert_eq!(s.admin_token.as_deref(), Some("t"));
    assert!(s.registry("quay.io").private);
    assert!(!s.registry("quay.io").cache_tags);
    assert!(s.registry("b.io").cache_tags);
    assert!(!s.registry("b.io").private);
    let (_, s) = parse("cache: {maxSize: 500MiB}\n").unwrap();
    assert_eq!(s.cache.max_size.unwrap().as_u64(), 500 << 20);
    assert!(parse("cache: {maxSize: lots}\n").is_err());
    assert!(parse("cache: {colour: red}\n").is_err());
    assert!(parse("cache: {highWatermark: 0.5, lowWatermark: 0.7}\n").is_err());
    let e = parse("registries:\n  - host: quay.io\n    private: maybe\n").unwrap_err();
    assert_eq!(e.key, "registries[0].private");
    let e = parse("registries:\n  - host: quay.io\n    colour: red\n").unwrap_err();
    assert!(e.to_string().contains("colour"), "{e}");
}

fn write_creds(path: &Path, user: &str, password: &str) {
    std::fs::write(
        path,
        format!(r#"{{"username": "{user}", "password": "{password}"}}"#),
    )
    .unwrap();
}

#[test]
fn credentials_files_are_read_with_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("quay.json");
    write_creds(&creds, "bot", "hunter2");
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "registries:\n  - host: quay.io\n    credentialsFile: {}\n  - host: p.io\n    private: true\n    credentialsFile: {0}\n  - host: b.io\n",
            creds.display()
        ),
    )
    .unwrap();
    let loaded = load_full(Some(&config)).unwrap();
    let quay = loaded.settings.registry("quay.io");
    assert!(quay.proxy_credentials().is_some());
    assert_eq!(quay.anonymous_basis().len(), 64);
    // private: read (and checked), never used on a client's behalf.
    let p = loaded.settings.registry("p.io");
    assert!(p.credentials.is_some());
    assert!(p.proxy_credentials().is_none());
    assert_eq!(p.anonymous_basis(), "");
    assert!(
        loaded
            .settings
            .registry("b.io")
            .proxy_credentials()
            .is_none()
    );
    assert!(!format!("{:?}", loaded.settings).contains("hunter2"));

    // Each broken file: an error naming the config, the registry, the
    // file and the field; never the password.
    for (content, field) in [
        (None, "No such file"),
        (Some("{"), "not JSON"),
        (
            Some(r#"{"username":"bot","password":"hunter2","x":1}"#),
            "x: unknown key",
        ),
        (Some(r#"{"username":"bot"}"#), "password: missing"),
    ] {
        match content {
            Some(c) => std::fs::write(&creds, c).unwrap(),
            None => std::fs::remove_file(&creds).unwrap(),
        }
        let e = load_full(Some(&config)).unwrap_err().to_string();
        for needle in ["c.yaml", "quay.io", "quay.json", field] {
            assert!(e.contains(needle), "`{needle}` not in: {e}");
        }
        assert!(!e.contains("hunter2"), "{e}");
    }
}

/// Kubernetes updates a Secret volume by pointing `..data` at a new
/// directory: the file's own path and the config file do not change.
fn swap_secret(dir: &Path, generation: u32, user: &str, password: &str) {
    let gen_dir = dir.join(format!("..gen{generation}"));
    std::fs::create_dir_all(&gen_dir).unwrap();
    write_creds(&gen_dir.join("creds.json"), user, password);
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(gen_dir.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join("creds.json").exists() {
        std::os::unix::fs::symlink("..data/creds.json", dir.join("creds.json")).unwrap();
    }
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Loaded>) -> Loaded {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no reload within 5 s")
        .unwrap()
}

/// True when nothing was applied for 300 ms (10 polls).
async fn quiet(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Loaded>) -> bool {
    tokio::time::timeout(Duration::from_millis(300), rx.recv())
        .await
        .is_err()
}

/// The config changes after the running one was read and before the
/// watcher's first poll (at start-up, while the cache index is rebuilt):
/// the change is applied. Before, the watcher took what it first saw as
/// the baseline, and the change was never applied.
#[tokio::test]
async fn a_change_before_the_first_poll_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, "registries: [{host: a.io}]\n").unwrap();
    let baseline = Baseline::take(&config);
    let running = load_full(Some(&config)).unwrap();
    assert!(running.config.registry("a.io").is_some());
    std::fs::write(&config, "registries: [{host: b.io}]\n").unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(watch(
        config.clone(),
        Duration::from_millis(30),
        baseline,
        move |l: Loaded| {
            let _ = tx.send(l);
            Ok(())
        },
    ));
    let l = next(&mut rx).await;
    assert!(l.config.registry("b.io").is_some());
    assert!(quiet(&mut rx).await);
    watcher.abort();
}

#[tokio::test]
async fn watch_applies_rotated_credentials_and_waits_for_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    swap_secret(&secret, 1, "old", "pw1");
    let config = dir.path().join("c.yaml");
    let body = format!(
        "registries:\n  - host: quay.io\n    credentialsFile: {}\n",
        secret.join("creds.json").display()
    );
    std::fs::write(&config, &body).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(watch(
        config.clone(),
        Duration::from_millis(30),
        Baseline::take(&config),
        move |l: Loaded| {
            let _ = tx.send(l);
            Ok(())
        },
    ));
    assert!(quiet(&mut rx).await, "reloaded with nothing changed");

    // Rotation by symlink swap: config file untouched.
    let before = std::fs::read(&config).unwrap();
    swap_secret(&secret, 2, "new", "pw2");
    let l = next(&mut rx).await;
    assert_eq!(std::fs::read(&config).unwrap(), before);
    let c = l.settings.registry("quay.io").credentials.unwrap();
    assert_eq!(
        *c,
        RegistryCredentials::new(
            "quay.io",
            &secret.join("creds.json"),
            pullthrough_api::config::UpstreamCredentials {
                username: "new".into(),
                password: "pw2".into(),
            }
        )
    );
    assert!(quiet(&mut rx).await);

    // The file vanishes (kubelet mid-sync): nothing is applied, and the
    // reload is retried at every poll until the file is back, with no
    // other change.
    let gone = dir.path().join("later.json");
    std::fs::write(
        &config,
        format!(
            "registries:\n  - host: quay.io\n    credentialsFile: {}\n",
            gone.display()
        ),
    )
    .unwrap();
    assert!(
        quiet(&mut rx).await,
        "a config with a missing file was applied"
    );
    write_creds(&gone, "third", "pw3");
    let l = next(&mut rx).await;
    let c = l.settings.registry("quay.io").credentials.unwrap();
    assert_eq!(
        *c,
        RegistryCredentials::new(
            "quay.io",
            &gone,
            pullthrough_api::config::UpstreamCredentials {
                username: "third".into(),
                password: "pw3".into(),
            }
        )
    );
    assert!(quiet(&mut rx).await);
    watcher.abort();
}

/// A failure outside the watched files' content, in the load step
/// (`fail_load`) or the apply step, twice: retried at every poll with
/// nothing changed, then applied once.
async fn retried_after_two_failures(fail_load: bool) {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, "registries: [{host: a.io}]\n").unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let (loads, applies) = (attempts.clone(), attempts.clone());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(watch_with(
        config.clone(),
        Duration::from_millis(30),
        Baseline::take(&config),
        move |p| {
            if fail_load && loads.fetch_add(1, SeqCst) < 2 {
                return Err(LoadError::Read {
                    path: p.to_path_buf(),
                    source: std::io::Error::other("not yet"),
                });
            }
            load_full(Some(p))
        },
        move |l: Loaded| {
            // Say, a caBundle the new config names is not on disk yet.
            if !fail_load && applies.fetch_add(1, SeqCst) < 2 {
                return Err("caBundle not there yet".into());
            }
            let _ = tx.send(l);
            Ok(())
        },
    ));
    assert!(quiet(&mut rx).await);
    std::fs::write(&config, "registries: [{host: b.io}]\n").unwrap();
    let l = next(&mut rx).await;
    assert!(l.config.registry("b.io").is_some());
    assert_eq!(attempts.load(SeqCst), 3);
    assert!(quiet(&mut rx).await, "applied again after success");
    assert_eq!(attempts.load(SeqCst), 3);
    watcher.abort();
}

#[tokio::test]
async fn watch_retries_a_failed_reload_with_nothing_changed() {
    retried_after_two_failures(true).await;
}

#[tokio::test]
async fn watch_retries_a_failed_apply_with_nothing_changed() {
    retried_after_two_failures(false).await;
}

#[test]
fn unchanged_credentials_keep_their_learnt_state_across_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("q.json");
    write_creds(&creds, "bot", "pw");
    let config = dir.path().join("c.yaml");
    let body = |ttl: &str| {
        format!(
            "registries:\n  - host: quay.io\n    tagTTL: {ttl}\n    credentialsFile: {}\n",
            creds.display()
        )
    };
    std::fs::write(&config, body("1m")).unwrap();
    let first = load_full(Some(&config)).unwrap().settings;
    std::fs::write(&config, body("2m")).unwrap();
    let mut second = load_full(Some(&config)).unwrap().settings;
    second.keep_credentials_state(&first);
    let (a, b) = (
        first.registry("quay.io").credentials.unwrap(),
        second.registry("quay.io").credentials.unwrap(),
    );
    assert!(
        Arc::ptr_eq(&a, &b),
        "tokens of unchanged credentials dropped"
    );
    write_creds(&creds, "bot", "rotated");
    let mut third = load_full(Some(&config)).unwrap().settings;
    third.keep_credentials_state(&second);
    let c = third.registry("quay.io").credentials.unwrap();
    assert!(!Arc::ptr_eq(&b, &c), "tokens of old credentials kept");
}

#[test]
fn file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.yaml");
    std::fs::write(&p, "registries:\n  - host: quay.io\n    tagTTL: forever\n").unwrap();
    let e = load(Some(&p)).unwrap_err().to_string();
    assert!(
        e.contains("c.yaml") && e.contains("registries[0].tagTTL"),
        "{e}"
    );
    let e = load(Some(&dir.path().join("missing.yaml")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.yaml"), "{e}");
}

//! Binaries of this workspace for tests outside their own crate (which
//! cannot use `CARGO_BIN_EXE_<name>`), always built from the current tree.
//!
//! `cargo test --workspace --all-targets` (what `tests/run` does) builds
//! every bin target into `<target>/debug` before any test runs, so there the
//! binary is fresh and used as is. `cargo test -p pullthrough-testbed` (or
//! any run that leaves the bins out) does not: `<target>/debug/<name>` may
//! then be missing or older than the source. Such a binary is never used;
//! the test builds the package into a target dir of its own,
//! `<target>/testbed` (the running `cargo test` may hold the lock on the
//! main one), where cargo itself decides what is fresh.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use serde_json::Value;

use crate::error::{Error, IoContext, Result};

/// The binary `name` of workspace package `package`, built from the current
/// tree: env `PULLTHROUGH_<NAME>_BIN` (see [`bin_env`]) when set, else
/// `<target>/debug/<name>` when it is newer than every input of its build
/// (see [`package_inputs`], [`stale_reason`]), else
/// `cargo build -p <package> --bin <name>` into `<target>/testbed`.
/// Decided once per test process.
pub fn workspace_bin(name: &str, package: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(bin_env(name)) {
        return Ok(PathBuf::from(p));
    }
    // Held while building, so the threads of one test binary wait for one
    // build instead of queueing on cargo's lock.
    static FOUND: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut found = FOUND.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(p) = found.get(name) {
        return Ok(p.clone());
    }
    let bin = current_bin(name, package)?;
    found.insert(name.to_string(), bin.clone());
    Ok(bin)
}

fn current_bin(name: &str, package: &str) -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| Error::Other("test bed crate has no parent dir".into()))?
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let metadata = crate::process::run(
        std::process::Command::new(&cargo)
            .current_dir(&workspace)
            .args([
                "metadata",
                "--no-deps",
                "--offline",
                "--format-version",
                "1",
            ]),
    )?;
    let inputs = package_inputs(&serde_json::from_str(&metadata)?, package)?;
    let bin = target.join("debug").join(name);
    let Some(why) = stale_reason(&bin, &inputs)? else {
        return Ok(bin);
    };
    let own = target.join("testbed");
    eprintln!(
        "pullthrough-testbed: {why}: building {name} into {}",
        own.display()
    );
    crate::process::run(
        std::process::Command::new(&cargo)
            .current_dir(&workspace)
            .env("CARGO_TARGET_DIR", &own)
            .args(["build", "--locked", "-p", package, "--bin", name]),
    )?;
    Ok(own.join("debug").join(name))
}

/// What the bins of workspace package `package` are built from, given
/// `cargo metadata --no-deps` output: the workspace's `Cargo.toml` and
/// `Cargo.lock`, and for the package and every workspace package it depends
/// on (normal and build dependencies, transitively; dev-dependencies such
/// as the test bed do not go into a bin) its manifest, the dirs of its lib
/// and bin targets (`src/`) and its build script. Files or dirs.
pub fn package_inputs(metadata: &Value, package: &str) -> Result<Vec<PathBuf>> {
    let bad = |what: &str| Error::Other(format!("cargo metadata: {what}"));
    let root = PathBuf::from(
        metadata["workspace_root"]
            .as_str()
            .ok_or_else(|| bad("no workspace_root"))?,
    );
    let packages = metadata["packages"]
        .as_array()
        .ok_or_else(|| bad("no packages"))?;
    let dir_of = |p: &Value| -> Option<PathBuf> {
        Some(
            Path::new(p["manifest_path"].as_str()?)
                .parent()?
                .to_path_buf(),
        )
    };
    let mut inputs = BTreeSet::from([root.join("Cargo.toml"), root.join("Cargo.lock")]);
    let start = packages
        .iter()
        .find(|p| p["name"] == package)
        .ok_or_else(|| bad(&format!("no workspace package {package}")))?;
    let mut seen = BTreeSet::new();
    let mut queue = VecDeque::from([start]);
    while let Some(p) = queue.pop_front() {
        let dir = dir_of(p).ok_or_else(|| bad("package without manifest_path"))?;
        if !seen.insert(dir.clone()) {
            continue;
        }
        inputs.insert(dir.join("Cargo.toml"));
        for t in p["targets"].as_array().into_iter().flatten() {
            let Some(src) = t["src_path"].as_str().map(Path::new) else {
                continue;
            };
            let kinds: Vec<&str> = t["kind"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if kinds.contains(&"custom-build") {
                inputs.insert(src.to_path_buf());
            } else if !kinds
                .iter()
                .any(|k| matches!(*k, "test" | "bench" | "example"))
                && let Some(src_dir) = src.parent()
            {
                inputs.insert(src_dir.to_path_buf());
            }
        }
        for d in p["dependencies"].as_array().into_iter().flatten() {
            let Some(path) = d["path"].as_str().map(Path::new) else {
                continue;
            };
            if d["kind"] == "dev" {
                continue;
            }
            if let Some(dep) = packages.iter().find(|q| dir_of(q).as_deref() == Some(path)) {
                queue.push_back(dep);
            }
        }
    }
    Ok(inputs.into_iter().collect())
}

/// Why `bin` must not be used as built from `inputs` (files, or dirs
/// walked recursively; missing ones are skipped): it is missing, or some
/// input was modified after it. `None` when it is current.
pub fn stale_reason(bin: &Path, inputs: &[PathBuf]) -> Result<Option<String>> {
    let built = match std::fs::metadata(bin) {
        Ok(m) => m.modified().ctx(|| format!("mtime of {}", bin.display()))?,
        Err(_) => return Ok(Some(format!("{} is missing", bin.display()))),
    };
    let mut todo: Vec<PathBuf> = inputs.to_vec();
    while let Some(path) = todo.pop() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).ctx(|| format!("listing {}", path.display()))? {
                todo.push(entry.ctx(|| format!("listing {}", path.display()))?.path());
            }
        } else if newer(&meta, built) {
            return Ok(Some(format!(
                "{} is older than {}",
                bin.display(),
                path.display()
            )));
        }
    }
    Ok(None)
}

fn newer(meta: &std::fs::Metadata, than: SystemTime) -> bool {
    meta.modified().is_ok_and(|m| m > than)
}

/// The override variable for binary `name`.
pub fn bin_env(name: &str) -> String {
    let short = name.strip_prefix("pullthrough-").unwrap_or(name);
    format!("PULLTHROUGH_{}_BIN", short.to_uppercase().replace('-', "_"))
}

/// `pullthrough-operator` (env `PULLTHROUGH_OPERATOR_BIN`).
pub fn operator_bin() -> Result<PathBuf> {
    workspace_bin("pullthrough-operator", "pullthrough-operator")
}

/// `pullthrough-agent` (env `PULLTHROUGH_AGENT_BIN`).
pub fn agent_bin() -> Result<PathBuf> {
    workspace_bin("pullthrough-agent", "pullthrough-agent")
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File};
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use serde_json::json;

    use super::{bin_env, package_inputs, stale_reason};

    #[test]
    fn override_variables_match_the_proxy_one() {
        assert_eq!(bin_env("pullthrough-proxy"), "PULLTHROUGH_PROXY_BIN");
        assert_eq!(bin_env("pullthrough-operator"), "PULLTHROUGH_OPERATOR_BIN");
        assert_eq!(bin_env("pullthrough-agent"), "PULLTHROUGH_AGENT_BIN");
    }

    fn write_at(path: &Path, t: SystemTime) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, path.display().to_string()).unwrap();
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    /// An existing binary is used only when no input is newer: a source
    /// edited after the build (deep in a dir, or Cargo.lock) makes it
    /// stale, as does a missing binary.
    #[test]
    fn a_binary_older_than_any_input_is_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let t = |secs: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs);
        let d = tmp.path();
        let inputs = vec![
            d.join("Cargo.toml"),
            d.join("Cargo.lock"),
            d.join("proxy/src"),
            d.join("api/src"),
            d.join("gone/src"),
        ];
        for f in [
            "Cargo.toml",
            "Cargo.lock",
            "proxy/src/main.rs",
            "api/src/lib.rs",
        ] {
            write_at(&d.join(f), t(0));
        }
        write_at(&d.join("api/src/deep/er/mod.rs"), t(0));
        let bin = d.join("target/debug/pullthrough-proxy");

        let why = stale_reason(&bin, &inputs).unwrap().unwrap();
        assert!(why.contains("missing"), "{why}");

        write_at(&bin, t(10));
        assert_eq!(stale_reason(&bin, &inputs).unwrap(), None);

        // Not an input: the test bed's own source, a test of the package.
        write_at(&d.join("tests/src/lib.rs"), t(20));
        write_at(&d.join("proxy/tests/it.rs"), t(20));
        assert_eq!(stale_reason(&bin, &inputs).unwrap(), None);

        write_at(&d.join("api/src/deep/er/mod.rs"), t(11));
        let why = stale_reason(&bin, &inputs).unwrap().unwrap();
        assert!(why.ends_with("api/src/deep/er/mod.rs"), "{why}");

        write_at(&bin, t(30));
        assert_eq!(stale_reason(&bin, &inputs).unwrap(), None);
        write_at(&d.join("Cargo.lock"), t(31));
        let why = stale_reason(&bin, &inputs).unwrap().unwrap();
        assert!(why.ends_with("Cargo.lock"), "{why}");
    }

    /// The inputs of a bin: its package's and its path dependencies'
    /// (transitively, build deps too) manifests and source dirs, the
    /// workspace manifest and lock file; not dev-dependencies, tests or
    /// registry crates.
    #[test]
    fn inputs_follow_path_dependencies_but_not_dev_ones() {
        let pkg = |name: &str, targets: serde_json::Value, deps: serde_json::Value| {
            json!({"name": name, "manifest_path": format!("/w/{name}/Cargo.toml"),
                   "targets": targets, "dependencies": deps})
        };
        let meta = json!({"workspace_root": "/w", "packages": [
            pkg("proxy", json!([
                {"kind": ["lib"], "src_path": "/w/proxy/src/lib.rs"},
                {"kind": ["bin"], "src_path": "/w/proxy/src/main.rs"},
                {"kind": ["test"], "src_path": "/w/proxy/tests/it.rs"},
            ]), json!([
                {"name": "api", "kind": null, "path": "/w/api"},
                {"name": "testbed", "kind": "dev", "path": "/w/testbed"},
                {"name": "tokio", "kind": null},
            ])),
            pkg("api", json!([
                {"kind": ["lib"], "src_path": "/w/api/src/lib.rs"},
                {"kind": ["custom-build"], "src_path": "/w/api/build.rs"},
            ]), json!([{"name": "gen", "kind": "build", "path": "/w/gen"}])),
            pkg("gen", json!([{"kind": ["lib"], "src_path": "/w/gen/src/lib.rs"}]), json!([])),
            pkg("testbed", json!([{"kind": ["lib"], "src_path": "/w/testbed/src/lib.rs"}]),
                json!([{"name": "api", "kind": null, "path": "/w/api"}])),
        ]});
        let got: Vec<String> = package_inputs(&meta, "proxy")
            .unwrap()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(
            got,
            [
                "/w/Cargo.lock",
                "/w/Cargo.toml",
                "/w/api/Cargo.toml",
                "/w/api/build.rs",
                "/w/api/src",
                "/w/gen/Cargo.toml",
                "/w/gen/src",
                "/w/proxy/Cargo.toml",
                "/w/proxy/src",
            ]
        );
        assert!(package_inputs(&meta, "nope").is_err());
    }

    /// On this workspace: the proxy is built from itself and the api crate,
    /// not from the test bed (its dev-dependency), so editing the test bed
    /// does not make a fresh proxy look stale.
    #[test]
    fn the_proxy_is_built_from_proxy_and_api() {
        let out = std::process::Command::new(env!("CARGO"))
            .args([
                "metadata",
                "--no-deps",
                "--offline",
                "--format-version",
                "1",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let inputs = package_inputs(&meta, "pullthrough-proxy").unwrap();
        for want in ["proxy/src", "api/src", "Cargo.lock", "proxy/Cargo.toml"] {
            assert!(inputs.contains(&ws.join(want)), "{want}: {inputs:?}");
        }
        assert!(
            !inputs.iter().any(|p| p.starts_with(ws.join("tests"))),
            "{inputs:?}"
        );
    }
}

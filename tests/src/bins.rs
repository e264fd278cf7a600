//! Binaries of this workspace for tests outside their own crate (which
//! cannot use `CARGO_BIN_EXE_<name>`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The binary `name` of workspace package `package`: env
/// `PULLTHROUGH_<NAME>_BIN` (name upper-cased, `-` → `_`, without the
/// `pullthrough-` prefix, e.g. `PULLTHROUGH_OPERATOR_BIN`), else
/// `<target>/debug/<name>`. When that is missing it is built with
/// `cargo build -p <package> --bin <name>` into a target dir of its own
/// (`<target>/testbed-<package>`): the running `cargo test` holds the lock
/// on the main one. An existing binary is used as is, so build it first to
/// test the current source.
pub fn workspace_bin(name: &str, package: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(bin_env(name)) {
        return Ok(PathBuf::from(p));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| Error::Other("test bed crate has no parent dir".into()))?
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let bin = target.join("debug").join(name);
    if bin.is_file() {
        return Ok(bin);
    }
    let own = target.join(format!("testbed-{package}"));
    let built = own.join("debug").join(name);
    if !built.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        crate::process::run(
            std::process::Command::new(cargo)
                .current_dir(&workspace)
                .env("CARGO_TARGET_DIR", &own)
                .args(["build", "-p", package, "--bin", name]),
        )?;
    }
    Ok(built)
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
    use super::bin_env;

    #[test]
    fn override_variables_match_the_proxy_one() {
        assert_eq!(bin_env("pullthrough-proxy"), "PULLTHROUGH_PROXY_BIN");
        assert_eq!(bin_env("pullthrough-operator"), "PULLTHROUGH_OPERATOR_BIN");
        assert_eq!(bin_env("pullthrough-agent"), "PULLTHROUGH_AGENT_BIN");
    }
}

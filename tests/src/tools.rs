//! Where the Go-built test tools live (built and cached by
//! `tests/tools/go-tools.sh`), and the Debian-packaged ones.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// The cache directory of Go-built tools:
/// `$PULLTHROUGH_TOOLS_DIR`, default `~/.cache/pullthrough/bin`.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PULLTHROUGH_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/pullthrough/bin")
}

/// Path of a Go-built tool (`kube-apiserver`, `kubectl`, `crictl`, `helm`,
/// `kubeconform`, `promtool`, ...); an error that says how to install it
/// when missing.
pub fn go_tool(name: &str) -> Result<PathBuf> {
    let path = tools_dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingTool {
            tool: name.to_string(),
            path,
        })
    }
}

/// Path of a program expected on PATH (Debian packages installed by
/// `tests/run`).
pub fn system_tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Other(format!(
                "{name} is not on PATH: run tests/run, which installs the Debian packages the tests need"
            ))
        })
}

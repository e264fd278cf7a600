//! Container images built offline: the workspace's own binaries (or any
//! host program) plus exactly the shared libraries `ldd` lists, at the
//! paths, users and entrypoints of `images/Dockerfile.*`, as one-layer OCI
//! image archives (uncompressed layer) that `ctr images import` takes.
//! Nothing is pulled from any registry.
//!
//! Used by `tests/tests/images.rs` (each image runs under `ctr run`) and by
//! the one-node cluster (`tests/tests/cluster.rs`: the chart's pods run
//! these images).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::kube::workspace_dir;
use crate::process::run;

/// The distroless `nonroot` user the proxy and operator images run as.
pub const NONROOT: u64 = 65532;

/// Builds the three program binaries (a no-op when they are fresh) and
/// returns `(name, path)` as cargo reports them: the images must hold the
/// binaries of the current tree, never a stale file in `target/`.
pub fn build_program_binaries() -> Result<Vec<(String, PathBuf)>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_dir()?).args([
        "build",
        "--locked",
        "--message-format=json-render-diagnostics",
    ]);
    for p in PROGRAMS {
        cmd.args(["-p", p, "--bin", p]);
    }
    let out = cmd
        .output()
        .ctx(|| "running cargo build for the program binaries".into())?;
    if !out.status.success() {
        return Err(Error::Other(format!(
            "cargo build of the program binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(name), Some(exe)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            bins.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    for want in PROGRAMS {
        if !bins.iter().any(|(n, _)| n == want) {
            return Err(Error::Other(format!(
                "cargo build did not report {want}: {bins:?}"
            )));
        }
    }
    Ok(bins)
}

const PROGRAMS: [&str; 3] = [
    "pullthrough-proxy",
    "pullthrough-operator",
    "pullthrough-agent",
];

/// Absolute paths of the shared libraries (and the loader) `ldd` lists.
pub fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = run(Command::new("ldd").arg(bin))?;
    let mut libs = Vec::new();
    for line in out.lines() {
        let line = line.trim();
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// One image's root filesystem as a tar, with parent directories.
pub struct Rootfs {
    tar: tar::Builder<std::io::BufWriter<std::fs::File>>,
    dirs: BTreeSet<String>,
    files: BTreeSet<String>,
    path: PathBuf,
}

impl Rootfs {
    /// A layer written to `path`.
    pub fn new(path: &Path) -> Result<Self> {
        let f = std::fs::File::create(path).ctx(|| format!("creating {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            tar: tar::Builder::new(std::io::BufWriter::new(f)),
            dirs: BTreeSet::new(),
            files: BTreeSet::new(),
        })
    }

    fn io(&self, e: std::io::Error) -> Error {
        Error::Io {
            what: format!("writing layer {}", self.path.display()),
            source: e,
        }
    }

    /// A directory (and its parents, 0755 root).
    pub fn dir(&mut self, path: &str, mode: u32, uid: u64) -> Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755, 0)?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(0);
        self.tar
            .append_data(&mut h, format!("{path}/"), std::io::empty())
            .map_err(|e| self.io(e))?;
        self.dirs.insert(path.to_string());
        Ok(())
    }

    /// A regular file owned by root.
    pub fn file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let Some(path) = self.claim(path)? else {
            return Ok(());
        };
        let mut h = header(tar::EntryType::Regular, data.len() as u64, mode);
        self.tar
            .append_data(&mut h, path, data)
            .map_err(|e| self.io(e))
    }

    /// A symlink `path` → `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let Some(path) = self.claim(path)? else {
            return Ok(());
        };
        let mut h = header(tar::EntryType::Symlink, 0, 0o777);
        self.tar
            .append_link(&mut h, path, target)
            .map_err(|e| self.io(e))
    }

    /// `path` without its leading `/`, with its parent directories added;
    /// `None` when the layer already has an entry there (the first wins).
    fn claim<'p>(&mut self, path: &'p str) -> Result<Option<&'p str>> {
        let path = path.trim_start_matches('/');
        if !self.files.insert(path.to_string()) {
            return Ok(None);
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755, 0)?;
        }
        Ok(Some(path))
    }

    /// `host` (symlinks followed) at `at` in the image, with the libraries
    /// it needs at their own paths. Debug info is stripped (as in a release
    /// build) when `strip` is there: a fifth of the size to write and import.
    pub fn program(&mut self, host: &Path, at: &str) -> Result<()> {
        let stripped = self.path.with_extension("stripped");
        let bytes = match Command::new("strip")
            .arg("--strip-debug")
            .arg(host)
            .arg("-o")
            .arg(&stripped)
            .status()
        {
            Ok(s) if s.success() => std::fs::read(&stripped),
            _ => std::fs::read(host),
        }
        .ctx(|| format!("reading program {}", host.display()))?;
        let _ = std::fs::remove_file(&stripped);
        self.file(at, &bytes, 0o755)?;
        for lib in shared_libs(host)? {
            let path = lib.to_string_lossy().into_owned();
            if !self.files.contains(path.trim_start_matches('/')) {
                let bytes =
                    std::fs::read(&lib).ctx(|| format!("reading library {}", lib.display()))?;
                self.file(&path, &bytes, 0o755)?;
            }
        }
        Ok(())
    }

    /// Files every image carries (what distroless/debian bases provide
    /// and the programs touch at start-up): a writable /tmp, a resolv.conf
    /// that resolves nothing (the tests are offline), passwd/group with
    /// the users.
    pub fn base_files(&mut self) -> Result<()> {
        self.dir("tmp", 0o1777, 0)?;
        self.file("etc/resolv.conf", b"nameserver 127.0.0.1\n", 0o644)?;
        self.file("etc/hosts", b"127.0.0.1 localhost\n", 0o644)?;
        self.file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
            0o644,
        )?;
        self.file("etc/group", b"root:x:0:\nnonroot:x:65532:\n", 0o644)?;
        self.dir("home/nonroot", 0o700, NONROOT)
    }

    /// Flushes the layer; returns its path.
    pub fn finish(self) -> Result<PathBuf> {
        let path = self.path.clone();
        let mut w = self
            .tar
            .into_inner()
            .ctx(|| format!("finishing layer {}", path.display()))?;
        w.flush().ctx(|| format!("flushing {}", path.display()))?;
        Ok(path)
    }
}

/// A root-owned entry header with a fixed mtime (reproducible layers).
fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

/// The OCI architecture name of this machine.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// An OCI image layout directory holding one image named `name` with
/// `layer` (an uncompressed tar, moved in) and the given process config.
/// Returns the layout dir (skopeo's `oci:<dir>:<name>` can push it).
pub fn oci_layout(dir: &Path, name: &str, layer: &Path, config: Value) -> Result<PathBuf> {
    let layout = dir.join(format!("{}-layout", name.replace(['/', ':'], "_")));
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).ctx(|| format!("creating {}", blobs.display()))?;
    let write_blob = |bytes: &[u8]| -> Result<(String, u64)> {
        let hex = hex::encode(Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).ctx(|| format!("writing blob {hex}"))?;
        Ok((format!("sha256:{hex}"), bytes.len() as u64))
    };
    let f = std::fs::File::open(layer).ctx(|| format!("opening {}", layer.display()))?;
    let (layer_digest, layer_size) =
        crate::fixtures::hash_reader(f).ctx(|| format!("hashing {}", layer.display()))?;
    std::fs::rename(
        layer,
        blobs.join(layer_digest.trim_start_matches("sha256:")),
    )
    .ctx(|| "moving the layer into the layout".into())?;
    let config = json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": config,
        // Uncompressed layer: diff_id = layer digest.
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = write_blob(&serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = write_blob(&serde_json::to_vec(&manifest)?)?;
    let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)
        .ctx(|| "writing index.json".into())?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .ctx(|| "writing oci-layout".into())?;
    Ok(layout)
}

/// Writes an OCI image archive (layout in a tar) holding one image named
/// `name`; see [`oci_layout`].
pub fn oci_archive(dir: &Path, name: &str, layer: &Path, config: Value) -> Result<PathBuf> {
    let layout = oci_layout(dir, name, layer, config)?;
    let archive = dir.join(format!("{}.tar", name.replace(['/', ':'], "_")));
    let f = std::fs::File::create(&archive).ctx(|| format!("creating {}", archive.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(f));
    let what = || format!("writing {}", archive.display());
    tar.append_dir_all(".", &layout).ctx(what)?;
    tar.into_inner().ctx(what)?.flush().ctx(what)?;
    std::fs::remove_dir_all(&layout).ctx(|| "removing the layout".into())?;
    Ok(archive)
}

/// An image archive and the name it is imported as.
#[derive(Debug, Clone)]
pub struct ImageArchive {
    pub name: String,
    pub archive: PathBuf,
}

/// One image named `name`: a layer holding the base files plus what
/// `fill` adds, and the process `config`. Every image of the test bed is
/// made this way.
pub fn image(
    dir: &Path,
    name: &str,
    config: Value,
    fill: impl FnOnce(&mut Rootfs) -> Result<()>,
) -> Result<ImageArchive> {
    let stem = name.replace(['/', ':'], "_");
    let mut fs = Rootfs::new(&dir.join(format!("{stem}-layer.tar")))?;
    fs.base_files()?;
    fill(&mut fs)?;
    let layer = fs.finish()?;
    let archive = oci_archive(dir, name, &layer, config)?;
    Ok(ImageArchive {
        name: name.to_string(),
        archive,
    })
}

/// The three program images as `images/Dockerfile.*` build them, named
/// `<repo_prefix>/pullthrough-{proxy,operator,agent}:<tag>`. `proxy_extra`
/// adds files to the proxy image (e.g. a baked-in config).
pub fn program_images(
    dir: &Path,
    repo_prefix: &str,
    tag: &str,
    proxy_extra: &[(&str, &[u8])],
) -> Result<Vec<ImageArchive>> {
    let bins = build_program_binaries()?;
    let bin = |name: &str| -> Result<PathBuf> {
        bins.iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| Error::Other(format!("{name} not built")))
    };
    let (proxy, operator, agent) = (
        bin("pullthrough-proxy")?,
        bin("pullthrough-operator")?,
        bin("pullthrough-agent")?,
    );
    let nsenter = crate::tools::system_tool("nsenter")?;
    Ok(vec![
        // The proxy: distroless-like, uid 65532.
        image(
            dir,
            &format!("{repo_prefix}/pullthrough-proxy:{tag}"),
            json!({
                "User": "65532:65532",
                "Entrypoint": ["/usr/local/bin/pullthrough-proxy"],
                "Env": [
                    "PATH=/usr/local/bin:/usr/bin:/bin",
                    "PULLTHROUGH_DATA_DIR=/var/lib/pullthrough",
                ],
                "ExposedPorts": {"8443/tcp": {}, "8080/tcp": {}, "9090/tcp": {}},
            }),
            |fs| {
                fs.program(&proxy, "/usr/local/bin/pullthrough-proxy")?;
                for (path, data) in proxy_extra {
                    fs.file(path, data, 0o644)?;
                }
                fs.dir("var/lib/pullthrough", 0o750, NONROOT)
            },
        )?,
        // The operator: same base, uid 65532.
        image(
            dir,
            &format!("{repo_prefix}/pullthrough-operator:{tag}"),
            json!({
                "User": "65532:65532",
                "Entrypoint": ["/usr/local/bin/pullthrough-operator"],
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                "ExposedPorts": {"8080/tcp": {}},
            }),
            |fs| fs.program(&operator, "/usr/local/bin/pullthrough-operator"),
        )?,
        // The agent: root, with nsenter (it restarts runtimes in the host's
        // namespaces), default command `run --root=/host`.
        image(
            dir,
            &format!("{repo_prefix}/pullthrough-agent:{tag}"),
            json!({
                "User": "0:0",
                "Entrypoint": ["/usr/local/bin/pullthrough-agent"],
                "Cmd": ["run", "--root=/host"],
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            }),
            |fs| {
                fs.program(&agent, "/usr/local/bin/pullthrough-agent")?;
                fs.program(&nsenter, "/usr/bin/nsenter")?;
                fs.dir("host", 0o755, 0)
            },
        )?,
    ])
}

/// Adds busybox (from Debian's busybox-static) at `/bin/busybox` and the
/// given applets beside it: the stand-in for small utility images (the
/// pause image, a workload).
pub fn add_busybox(fs: &mut Rootfs, applets: &[&str]) -> Result<()> {
    let busybox = crate::tools::system_tool("busybox")?;
    for d in ["proc", "sys", "dev"] {
        fs.dir(d, 0o755, 0)?;
    }
    let bytes = std::fs::read(&busybox).ctx(|| format!("reading {}", busybox.display()))?;
    fs.file("bin/busybox", &bytes, 0o755)?;
    for a in applets {
        fs.symlink(&format!("bin/{a}"), "busybox")?;
    }
    Ok(())
}

/// A busybox layer (file `file` in `dir`) with the base files and
/// [`add_busybox`], for an image built as a layout (to push) rather than
/// an archive.
pub fn busybox_layer(dir: &Path, file: &str, applets: &[&str]) -> Result<PathBuf> {
    let mut fs = Rootfs::new(&dir.join(file))?;
    fs.base_files()?;
    add_busybox(&mut fs, applets)?;
    fs.finish()
}

//! The container images, built offline: each program's binary from this
//! workspace (built by `cargo build` if needed) plus exactly the shared
//! libraries `ldd` lists, at the paths, users and entrypoints of
//! `images/Dockerfile.*`, as a one-layer OCI image (uncompressed layer).
//! Each image is imported into the test bed's containerd and run with
//! `ctr run` (host network: the test's loopback): the proxy must answer
//! `/healthz` on its admin port as uid 65532; the operator and the agent
//! must run `--help`/`--version` (the agent also `status`) and exit 0.
//! Nothing is pulled from any registry: the images are imported from
//! archives the test writes.
//!
//! A second test checks the chart against the same binaries: the proxy
//! parses the chart's base config, and each program accepts every flag the
//! chart passes it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pullthrough_testbed::containerd::{Containerd, ContainerdOpts};
use pullthrough_testbed::http::Get;
use pullthrough_testbed::net::{free_port, wait_for};
use pullthrough_testbed::process::run;
use serde_json::json;
use sha2::{Digest, Sha256};

const NONROOT: u64 = 65532;
const OPERATOR: &str = "/usr/local/bin/pullthrough-operator";
const AGENT: &str = "/usr/local/bin/pullthrough-agent";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Builds the three program binaries (a no-op when they are fresh) and
/// returns their paths, as cargo reports them.
fn build_binaries() -> Vec<(String, PathBuf)> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace()).args([
        "build",
        "--locked",
        "--message-format=json-render-diagnostics",
        "-p",
        "pullthrough-proxy",
        "--bin",
        "pullthrough-proxy",
        "-p",
        "pullthrough-operator",
        "--bin",
        "pullthrough-operator",
        "-p",
        "pullthrough-agent",
        "--bin",
        "pullthrough-agent",
    ]);
    let out = cmd.output().expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build of the program binaries failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8_lossy(&out.stdout);
    let mut bins = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
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
    for want in [
        "pullthrough-proxy",
        "pullthrough-operator",
        "pullthrough-agent",
    ] {
        assert!(
            bins.iter().any(|(n, _)| n == want),
            "{want} built: {bins:?}"
        );
    }
    bins
}

/// Absolute paths of the shared libraries (and the loader) `ldd` lists.
fn shared_libs(bin: &Path) -> Vec<PathBuf> {
    let out = run(Command::new("ldd").arg(bin)).expect("ldd");
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
    assert!(
        libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
        "ldd {}: {out}",
        bin.display()
    );
    libs
}

/// One image's root filesystem as a tar, with parent directories.
struct Rootfs {
    tar: tar::Builder<std::io::BufWriter<std::fs::File>>,
    dirs: BTreeSet<String>,
    files: BTreeSet<String>,
    scratch: PathBuf,
}

impl Rootfs {
    fn new(path: &Path) -> Self {
        let f = std::fs::File::create(path).expect("create layer tar");
        Self {
            scratch: path.parent().expect("layer in a dir").to_path_buf(),
            tar: tar::Builder::new(std::io::BufWriter::new(f)),
            dirs: BTreeSet::new(),
            files: BTreeSet::new(),
        }
    }

    fn dir(&mut self, path: &str, mode: u32, uid: u64) {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755, 0);
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
            .expect("dir entry");
        self.dirs.insert(path.to_string());
    }

    fn file(&mut self, path: &str, data: &[u8], mode: u32) {
        let path = path.trim_start_matches('/');
        if !self.files.insert(path.to_string()) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755, 0);
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        self.tar
            .append_data(&mut h, path, data)
            .expect("file entry");
    }

    /// `host` (symlinks followed) at `at` in the image, with the libraries
    /// it needs at their own paths. Debug info is stripped (as in a release
    /// build) when `strip` is there: a fifth of the size to write and import.
    fn program(&mut self, host: &Path, at: &str) {
        let stripped = self.scratch.join("stripped");
        let bytes = match Command::new("strip")
            .arg("--strip-debug")
            .arg(host)
            .arg("-o")
            .arg(&stripped)
            .status()
        {
            Ok(s) if s.success() => std::fs::read(&stripped).expect("read stripped program"),
            _ => std::fs::read(host).expect("read program"),
        };
        self.file(at, &bytes, 0o755);
        for lib in shared_libs(host) {
            let path = lib.to_string_lossy().into_owned();
            if !self.files.contains(path.trim_start_matches('/')) {
                let bytes = std::fs::read(&lib).expect("read shared library");
                self.file(&path, &bytes, 0o755);
            }
        }
    }

    fn finish(self) {
        let mut w = self.tar.into_inner().expect("finish layer");
        w.flush().expect("flush layer");
    }
}

fn sha256_file(path: &Path) -> (String, u64) {
    let f = std::fs::File::open(path).expect("open");
    pullthrough_testbed::fixtures::hash_reader(f).expect("hash")
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Writes an OCI image archive (layout in a tar) holding one image named
/// `name` with `layer` (an uncompressed tar) and the given process config.
fn oci_archive(dir: &Path, name: &str, layer: &Path, config: serde_json::Value) -> PathBuf {
    let layout = dir.join(format!("{}-layout", name.replace(['/', ':'], "_")));
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("layout dir");
    let write_blob = |bytes: &[u8]| -> (String, u64) {
        let hex = hex::encode(Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).expect("write blob");
        (format!("sha256:{hex}"), bytes.len() as u64)
    };
    let (layer_digest, layer_size) = sha256_file(layer);
    std::fs::rename(
        layer,
        blobs.join(layer_digest.trim_start_matches("sha256:")),
    )
    .expect("move layer into layout");
    let config = json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": config,
        // Uncompressed layer: diff_id = layer digest.
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = write_blob(&serde_json::to_vec(&config).unwrap());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = write_blob(&serde_json::to_vec(&manifest).unwrap());
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": "test"},
        }],
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let archive = dir.join(format!("{}.tar", name.replace(['/', ':'], "_")));
    let f = std::fs::File::create(&archive).expect("archive");
    let mut tar = tar::Builder::new(std::io::BufWriter::new(f));
    tar.append_dir_all(".", &layout).expect("tar layout");
    tar.into_inner().expect("finish archive").flush().unwrap();
    std::fs::remove_dir_all(&layout).expect("remove layout");
    archive
}

/// Files every image carries (what distroless/debian bases provide and
/// the programs touch at start-up): a writable /tmp, a resolv.conf that
/// resolves nothing (the test is offline), passwd/group with the users.
fn base_files(fs: &mut Rootfs) {
    fs.dir("tmp", 0o1777, 0);
    fs.file("etc/resolv.conf", b"nameserver 127.0.0.1\n", 0o644);
    fs.file("etc/hosts", b"127.0.0.1 localhost\n", 0o644);
    fs.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
        0o644,
    );
    fs.file("etc/group", b"root:x:0:\nnonroot:x:65532:\n", 0o644);
    fs.dir("home/nonroot", 0o700, NONROOT);
}

/// Imports `archive` into containerd and checks `name` is listed.
fn import(ctd: &Containerd, archive: &Path, name: &str) {
    ctd.ctr([
        OsStr::new("images"),
        OsStr::new("import"),
        archive.as_os_str(),
    ])
    .expect("ctr images import");
    let list = ctd.ctr(["images", "ls", "-q"]).expect("ctr images ls");
    assert!(list.lines().any(|l| l == name), "{name} in {list}");
}

/// `ctr run --rm --net-host IMAGE ID ARGS...` to completion; stdout. ctr
/// 1.6 replaces entrypoint and command when given ARGS, so they start with
/// the program.
fn run_to_end(ctd: &Containerd, image: &str, id: &str, args: &[&str]) -> String {
    let mut all = vec!["run", "--rm", "--net-host", image, id];
    all.extend_from_slice(args);
    ctd.ctr(all)
        .unwrap_or_else(|e| panic!("{image} {args:?} must exit 0: {e}"))
}

/// The uid a running task's process has (from /proc, by its host PID).
fn task_uid(ctd: &Containerd, id: &str) -> u32 {
    let tasks = ctd.ctr(["tasks", "ls"]).expect("ctr tasks ls");
    let pid: u32 = tasks
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&id)).then(|| cols.get(1)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("task {id} in {tasks}"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|u| u.split_whitespace().next()?.parse().ok())
        .expect("Uid line")
}

#[test]
fn images_built_offline_run_under_containerd() {
    let t0 = Instant::now();
    let bins = build_binaries();
    let bin = |name: &str| {
        bins.iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .unwrap()
    };
    let built = t0.elapsed();
    let dir = tempfile::Builder::new()
        .prefix("pt-images-")
        .tempdir()
        .expect("temp dir");

    // The proxy: distroless-like, uid 65532, a small config baked in.
    let admin = free_port().unwrap();
    let http = free_port().unwrap();
    let proxy_config = format!(
        "listen:\n  http: 127.0.0.1:{http}\n  admin: 127.0.0.1:{admin}\ndataDir: /var/lib/pullthrough\nregistries:\n  - host: quay.io\n"
    );
    let layer = dir.path().join("proxy-layer.tar");
    let mut fs = Rootfs::new(&layer);
    base_files(&mut fs);
    fs.program(
        &bin("pullthrough-proxy"),
        "/usr/local/bin/pullthrough-proxy",
    );
    fs.file(
        "etc/pullthrough/config.yaml",
        proxy_config.as_bytes(),
        0o644,
    );
    fs.dir("var/lib/pullthrough", 0o750, NONROOT);
    fs.finish();
    let proxy_image = "pullthrough.test/pullthrough-proxy:test";
    let proxy_archive = oci_archive(
        dir.path(),
        proxy_image,
        &layer,
        json!({
            "User": "65532:65532",
            "Entrypoint": ["/usr/local/bin/pullthrough-proxy"],
            // As the Dockerfile, plus the test's config file.
            "Env": [
                "PATH=/usr/local/bin:/usr/bin:/bin",
                "PULLTHROUGH_DATA_DIR=/var/lib/pullthrough",
                "PULLTHROUGH_CONFIG=/etc/pullthrough/config.yaml",
            ],
            "ExposedPorts": {"8443/tcp": {}, "8080/tcp": {}, "9090/tcp": {}},
        }),
    );

    // The operator: same base, uid 65532.
    let layer = dir.path().join("operator-layer.tar");
    let mut fs = Rootfs::new(&layer);
    base_files(&mut fs);
    fs.program(
        &bin("pullthrough-operator"),
        "/usr/local/bin/pullthrough-operator",
    );
    fs.finish();
    let operator_image = "pullthrough.test/pullthrough-operator:test";
    let operator_archive = oci_archive(
        dir.path(),
        operator_image,
        &layer,
        json!({
            "User": "65532:65532",
            "Entrypoint": ["/usr/local/bin/pullthrough-operator"],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "ExposedPorts": {"8080/tcp": {}},
        }),
    );

    // The agent: root, with nsenter (it restarts runtimes in the host's
    // namespaces), default command `run --root=/host`.
    let layer = dir.path().join("agent-layer.tar");
    let mut fs = Rootfs::new(&layer);
    base_files(&mut fs);
    fs.program(
        &bin("pullthrough-agent"),
        "/usr/local/bin/pullthrough-agent",
    );
    let nsenter = pullthrough_testbed::tools::system_tool("nsenter").expect("nsenter (util-linux)");
    fs.program(&nsenter, "/usr/bin/nsenter");
    fs.dir("host", 0o755, 0);
    fs.finish();
    let agent_image = "pullthrough.test/pullthrough-agent:test";
    let agent_archive = oci_archive(
        dir.path(),
        agent_image,
        &layer,
        json!({
            "User": "0:0",
            "Entrypoint": ["/usr/local/bin/pullthrough-agent"],
            "Cmd": ["run", "--root=/host"],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
        }),
    );
    let archived = t0.elapsed();

    let ctd = Containerd::start(ContainerdOpts::default()).expect("containerd");
    for (archive, name) in [
        (&proxy_archive, proxy_image),
        (&operator_archive, operator_image),
        (&agent_archive, agent_image),
    ] {
        import(&ctd, archive, name);
    }
    let imported = t0.elapsed();

    // Operator and agent: the binaries start in their images and exit 0.
    let help = run_to_end(&ctd, operator_image, "operator-help", &[OPERATOR, "--help"]);
    assert!(help.contains("MirrorRegistry"), "{help}");
    let version = run_to_end(
        &ctd,
        operator_image,
        "operator-version",
        &[OPERATOR, "--version"],
    );
    assert!(version.starts_with("pullthrough-operator "), "{version}");
    let help = run_to_end(&ctd, agent_image, "agent-help", &[AGENT, "--help"]);
    assert!(help.contains("revert"), "{help}");
    let status = run_to_end(
        &ctd,
        agent_image,
        "agent-status",
        &[AGENT, "status", "--root=/host", "--output=json"],
    );
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(status["applied"], false, "{status}");

    // The proxy, started by the image's own entrypoint (the config file
    // through PULLTHROUGH_CONFIG): runs as 65532, answers its health
    // endpoints.
    ctd.ctr(["run", "-d", "--net-host", proxy_image, "proxy"])
        .expect("ctr run -d proxy");
    let healthz = format!("http://127.0.0.1:{admin}/healthz");
    let readyz = format!("http://127.0.0.1:{admin}/readyz");
    let mut last = String::new();
    wait_for(
        "the proxy's /readyz in its image",
        Duration::from_secs(30),
        || match Get::new(&readyz).send() {
            Ok(r) => {
                last = format!("{} {}", r.status, String::from_utf8_lossy(&r.body));
                Ok(r.status.is_success())
            }
            Err(e) => {
                last = e.to_string();
                Ok(false)
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}; last: {last}; containerd log:\n{}", ctd.log()));
    let health = Get::new(&healthz).send().expect("GET /healthz");
    assert!(health.status.is_success(), "{}", health.status);
    assert_eq!(
        task_uid(&ctd, "proxy"),
        NONROOT as u32,
        "proxy runs non-root"
    );
    // And it serves: the registry ping on its HTTP port.
    let ping = Get::new(&format!("http://127.0.0.1:{http}/v2/?ns=quay.io"))
        .send()
        .expect("GET /v2/");
    assert!(
        ping.status.is_success() || ping.status.as_u16() == 401,
        "/v2/: {}",
        ping.status
    );
    ctd.ctr(["tasks", "kill", "--signal", "SIGTERM", "proxy"])
        .expect("SIGTERM the proxy");
    wait_for("the proxy task to exit", Duration::from_secs(40), || {
        Ok(ctd
            .ctr(["tasks", "ls"])?
            .lines()
            .filter(|l| l.starts_with("proxy "))
            .all(|l| l.contains("STOPPED")))
    })
    .expect("proxy stops on SIGTERM");
    ctd.ctr(["tasks", "rm", "proxy"]).ok();
    ctd.ctr(["containers", "rm", "proxy"])
        .expect("remove container");

    let sizes: Vec<String> = [&proxy_archive, &operator_archive, &agent_archive]
        .iter()
        .map(|a| format!("{} MiB", std::fs::metadata(a).unwrap().len() >> 20))
        .collect();
    eprintln!(
        "images: cargo build {:.1}s, rootfs+archives {:.1}s ({}), containerd import {:.1}s, runs {:.1}s",
        built.as_secs_f64(),
        (archived - built).as_secs_f64(),
        sizes.join(", "),
        (imported - archived).as_secs_f64(),
        (t0.elapsed() - imported).as_secs_f64()
    );
}

/// The `args:` list of the first container in a rendered workload (helm's
/// flat YAML: `          args:` then `            - ARG` lines, comments
/// skipped).
fn container_args(rendered: &str) -> Vec<String> {
    let mut lines = rendered.lines().skip_while(|l| *l != "          args:");
    lines.next();
    lines
        .filter(|l| !l.trim_start().starts_with('#'))
        .map_while(|l| l.strip_prefix("            - "))
        .map(|a| a.trim_matches('"').to_string())
        .collect()
}

/// What the chart passes to the programs is what they accept: the
/// proxy's base config parses with the proxy's own parser, and every flag
/// the operator, proxy and agent get from the chart (default and
/// all-features values) parses (`ARGS... --help` exits 0 only when every
/// flag before it is known and its value valid).
#[test]
fn chart_flags_and_base_config_are_accepted_by_the_programs() {
    let bins = build_binaries();
    let bin = |name: &str| {
        bins.iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .unwrap()
    };
    let helm = pullthrough_testbed::kube::Helm::new(None).expect("helm");
    let chart = workspace().join("charts/pullthrough").display().to_string();
    let all = workspace()
        .join("charts/pullthrough/ci/all-features-values.yaml")
        .display()
        .to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    for values in [None, Some(all.as_str())] {
        let show = |template: &str| {
            let mut args = vec![
                "template",
                "pullthrough",
                &chart,
                "--namespace",
                "pullthrough",
                "--show-only",
                template,
            ];
            if let Some(v) = values {
                args.extend(["-f", v]);
            }
            helm.run(&args).expect("helm template")
        };
        // The base config, as the operator reads it and merges it into the
        // table the proxy runs.
        let cm = show("templates/proxy-base-config.yaml");
        let base: String = cm
            .lines()
            .skip_while(|l| !l.ends_with("config.yaml: |"))
            .skip(1)
            .map_while(|l| l.strip_prefix("    ").or((l.is_empty()).then_some("")))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(base.contains("listen:"), "base config:\n{cm}");
        let base_file = dir.path().join("base.yaml");
        std::fs::write(&base_file, &base).unwrap();
        let effective = run(Command::new(bin("pullthrough-proxy"))
            .arg("--print-config")
            .arg("--config")
            .arg(&base_file))
        .unwrap_or_else(|e| panic!("the proxy accepts the chart's base config:\n{base}\n{e}"));
        assert!(effective.contains("neverHijack"), "{effective}");

        for (template, program) in [
            ("templates/operator-deployment.yaml", "pullthrough-operator"),
            ("templates/proxy-deployment.yaml", "pullthrough-proxy"),
            ("templates/agent-daemonset.yaml", "pullthrough-agent"),
        ] {
            let mut args = container_args(&show(template));
            assert!(args.len() >= 3, "{template}: args {args:?}");
            args.push("--help".into());
            run(Command::new(bin(program)).args(&args))
                .unwrap_or_else(|e| panic!("{program} accepts the chart's flags {args:?}: {e}"));
        }
    }
}

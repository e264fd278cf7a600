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

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pullthrough_testbed::containerd::{Containerd, ContainerdOpts};
use pullthrough_testbed::http::Get;
use pullthrough_testbed::images::{NONROOT, build_program_binaries, program_images};
use pullthrough_testbed::net::{free_port, wait_for};
use pullthrough_testbed::process::run;
use pullthrough_testbed::stub::Stub;

const OPERATOR: &str = "/usr/local/bin/pullthrough-operator";
const AGENT: &str = "/usr/local/bin/pullthrough-agent";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn build_binaries() -> Vec<(String, PathBuf)> {
    build_program_binaries().expect("build the program binaries")
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
    let dir = tempfile::Builder::new()
        .prefix("pt-images-")
        .tempdir()
        .expect("temp dir");

    // The proxy gets a small config baked in (the chart mounts one). Its
    // registry's upstream is a loopback stub: with no `upstream:` it would
    // be https://quay.io, and the proxy resolves by DNS (never the hosts
    // file), so the ping below would leave the machine.
    let admin = free_port().unwrap();
    let http = free_port().unwrap();
    let upstream = Stub::canned().start().expect("upstream stub");
    let proxy_config = format!(
        "listen:\n  http: 127.0.0.1:{http}\n  admin: 127.0.0.1:{admin}\ndataDir: /var/lib/pullthrough\nregistries:\n  - host: quay.io\n    upstream: {}\n",
        upstream.url()
    );
    let images = program_images(
        dir.path(),
        "pullthrough.test",
        "test",
        &[("etc/pullthrough/config.yaml", proxy_config.as_bytes())],
    )
    .expect("build the images");
    let built = t0.elapsed();
    let [proxy, operator, agent] = &images[..] else {
        panic!("three images: {images:?}")
    };
    let (proxy_image, proxy_archive) = (proxy.name.as_str(), &proxy.archive);
    let (operator_image, operator_archive) = (operator.name.as_str(), &operator.archive);
    let (agent_image, agent_archive) = (agent.name.as_str(), &agent.archive);

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
    ctd.ctr([
        "run",
        "-d",
        "--net-host",
        "--env",
        "PULLTHROUGH_CONFIG=/etc/pullthrough/config.yaml",
        proxy_image,
        "proxy",
    ])
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
    // And it serves: the registry ping on its HTTP port, answered by the
    // upstream (the proxy answers its own ping when it cannot reach it).
    let ping = Get::new(&format!("http://127.0.0.1:{http}/v2/?ns=quay.io"))
        .send()
        .expect("GET /v2/");
    assert_eq!(ping.status.as_u16(), 200, "/v2/");
    assert_eq!(upstream.count("GET", "/v2/"), 1, "the upstream's ping");
    ctd.ctr(["tasks", "kill", "--signal", "SIGTERM", "proxy"])
        .expect("SIGTERM the proxy");
    wait_for("the proxy task to exit", Duration::from_secs(40), || {
        let tasks = ctd.ctr(["tasks", "ls"])?;
        let proxy: Vec<&str> = tasks.lines().filter(|l| l.starts_with("proxy ")).collect();
        // Listed and stopped: a task no longer listed proves nothing.
        Ok(!proxy.is_empty() && proxy.iter().all(|l| l.contains("STOPPED")))
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
        "images: cargo build + rootfs + archives {:.1}s ({}), containerd import {:.1}s, runs {:.1}s",
        built.as_secs_f64(),
        sizes.join(", "),
        (imported - built).as_secs_f64(),
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

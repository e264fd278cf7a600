//! `crdgen`: prints the MirrorRegistry CustomResourceDefinition as YAML.

use clap::Parser;
use pullthrough_api::cli::parse_or_exit;

/// Print the MirrorRegistry CRD (YAML) derived from the Rust types, for the
/// chart's `crds/` folder and `deploy/`.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {}

fn main() {
    let _cli: Cli = parse_or_exit();
    eprintln!("crdgen: the MirrorRegistry types are not defined in this build");
    std::process::exit(1);
}

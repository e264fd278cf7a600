//! `crdgen`: prints the MirrorRegistry CustomResourceDefinition as YAML.

use clap::Parser;
use pullthrough_api::cli::parse_or_exit;

/// Print the MirrorRegistry CRD (YAML) derived from the Rust types, for the
/// chart's `crds/` folder and `deploy/`:
/// `cargo run -p pullthrough-operator --bin crdgen > charts/pullthrough/crds/mirrorregistries.yaml`
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {}

fn main() {
    let _cli: Cli = parse_or_exit();
    match pullthrough_operator::crd_yaml() {
        Ok(yaml) => print!("{yaml}"),
        Err(e) => {
            eprintln!("crdgen: {e}");
            std::process::exit(1);
        }
    }
}

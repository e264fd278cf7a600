//! `crdgen`: the CustomResourceDefinitions (MirrorRegistry,
//! DiscoveredRegistry) as YAML, derived from the Rust types.

use std::path::PathBuf;

use clap::Parser;
use pullthrough_api::cli::parse_or_exit;

/// Print the CRDs (YAML, one document each) derived from the Rust types, or
/// write one file per CRD into a folder: the chart's `crds/` and
/// `deploy/crds/` hold exactly this
/// (`cargo run -p pullthrough-operator --bin crdgen -- --out-dir charts/pullthrough/crds`).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Write `<plural>.yaml` per CRD into this folder instead of printing.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

fn main() {
    let cli: Cli = parse_or_exit();
    let files = match pullthrough_operator::crd_files() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("crdgen: {e}");
            std::process::exit(1);
        }
    };
    match cli.out_dir {
        None => {
            let docs: Vec<_> = files.into_iter().map(|(_, y)| y).collect();
            print!("{}", docs.join("---\n"));
        }
        Some(dir) => {
            for (name, yaml) in files {
                let path = dir.join(name);
                if let Err(e) = std::fs::write(&path, yaml) {
                    eprintln!("crdgen: {}: {e}", path.display());
                    std::process::exit(1);
                }
            }
        }
    }
}

//! `pullthrough-agent`: makes a node's container runtime pull through the
//! proxy. The commands are in the library's `cli` module; this sets up
//! logging and turns an error into a message and an exit code.

use std::io::IsTerminal;

use pullthrough_agent::cli::{self, Cli};
use pullthrough_api::cli::parse_or_exit;

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        // Escape codes only for a person watching, not in a log file.
        b.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

fn main() {
    let cli: Cli = parse_or_exit();
    init_logging(cli.log_json);
    let daemon = cli.is_daemon();
    if let Err(e) = cli::execute(cli) {
        if daemon {
            tracing::error!(error = %e, "stopped: {e}");
        } else {
            // apply/revert/status: the message is the command's answer.
            eprintln!("pullthrough-agent: {e}");
        }
        std::process::exit(e.exit_code());
    }
}

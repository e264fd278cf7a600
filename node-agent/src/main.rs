//! `pullthrough-agent`: makes a node's container runtime pull through the
//! proxy. The commands are in the library's `cli` module; this sets up
//! logging and turns an error into a message and an exit code.

use pullthrough_agent::cli::{self, Cli};
use pullthrough_api::cli::{init_logging, parse_or_exit};

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

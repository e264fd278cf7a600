//! Command-line conventions common to all pullthrough binaries.

use clap::Parser;
use clap::error::ErrorKind;

/// Exit code for a usage or configuration error (`EX_USAGE` from sysexits.h),
/// so supervisors can tell "fix your flags/config" apart from a crash.
pub const EXIT_USAGE: i32 = 64;

/// Parses the process arguments; `--help`/`--version` print and exit 0, any
/// other parse error prints clap's message and exits with [`EXIT_USAGE`].
pub fn parse_or_exit<T: Parser>() -> T {
    parse_from_or_exit(std::env::args_os())
}

/// As [`parse_or_exit`], for explicit arguments (tests, wrappers).
pub fn parse_from_or_exit<T, I, A>(args: I) -> T
where
    T: Parser,
    I: IntoIterator<Item = A>,
    A: Into<std::ffi::OsString> + Clone,
{
    match T::try_parse_from(args) {
        Ok(parsed) => parsed,
        Err(err) => {
            let code = match err.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                // A missing subcommand is a usage error even though clap
                // answers it with the help text.
                _ => EXIT_USAGE,
            };
            // clap routes help to stdout and errors to stderr; a failed write
            // there leaves nothing better to do than exit with the same code.
            let _ = err.print();
            std::process::exit(code);
        }
    }
}

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` (default
/// `info`): JSON lines with `json`, else text, with colour only when a
/// person watches a terminal (not in a log file). The operator and the
/// agent log the same way; the proxy, whose access log is the product,
/// writes JSON to stdout through its own writer thread.
pub fn init_logging(json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

//! `pullthrough-proxy`: one caching proxy for every registry a cluster pulls from.

use pullthrough_api::cli::parse_or_exit;
use pullthrough_proxy::observe::log_queue::{LogQueue, PROCESS_QUEUE_FULL};
use pullthrough_proxy::{Cli, run};

/// Log lines queued for the writer thread at most: seconds of peak traffic.
const LOG_QUEUE_LINES: usize = 16 * 1024;

#[tokio::main]
async fn main() {
    let cli: Cli = parse_or_exit();
    // Lines are written by tracing-appender's thread, off the request path
    // (a slow stdout consumer must not stall requests). Lossless: the access
    // log is the record of every proxied request, so a full queue makes the
    // logging task wait (as a synchronous writer did) instead of dropping.
    // The queue counts lines that had to wait for room: back-pressure shows
    // in /metrics (`pullthrough_log_queue_full`), not only as latency.
    let queue = LogQueue::new(LOG_QUEUE_LINES, PROCESS_QUEUE_FULL.clone());
    let (writer, log_guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("log-writer")
        // The writer thread flushes whenever its queue runs empty: under
        // load a batch of lines costs one write(2), idle a line goes out at
        // once.
        .finish(queue.receiver(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        )));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(queue.sender(writer))
        .init();
    match run(cli).await {
        Ok(()) => {}
        Err(err) => {
            tracing::error!(error = %err, "cannot start");
            eprintln!("pullthrough-proxy: {err}");
            // exit() skips destructors: write out the queued lines first.
            drop(log_guard);
            std::process::exit(err.exit_code());
        }
    }
    drop(log_guard);
}

//! Back-pressure of the log writer. Log lines go through a bounded queue to
//! tracing-appender's writer thread, losslessly: when the queue is full, the
//! task logging a line waits (the access log is the record of every
//! request). That wait is invisible in the log itself, so this counts it:
//! each line is counted in when handed over and out when written, and a
//! line handed over while the queue is already full is one that waited.

use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use prometheus_client::metrics::counter::Counter;

/// The process's log writer is one, set up before anything else: its count
/// lives here so the metrics can export it (`pullthrough_log_queue_full`).
pub static PROCESS_QUEUE_FULL: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Lines in flight between the loggers and the writer, and how often the
/// queue was full.
#[derive(Debug)]
pub struct LogQueue {
    in_flight: AtomicUsize,
    limit: usize,
    waited: Counter,
}

impl LogQueue {
    /// A queue of `limit` lines (the writer's `buffered_lines_limit`);
    /// lines that find it full and wait for room count in `waited`.
    pub fn new(limit: usize, waited: Counter) -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            limit,
            waited,
        })
    }

    /// Wraps the queue's sending side (what the subscriber writes to).
    pub fn sender<W>(self: &Arc<Self>, inner: W) -> Sender<W> {
        Sender {
            inner,
            queue: self.clone(),
        }
    }

    /// Wraps the writer thread's destination.
    pub fn receiver<W>(self: &Arc<Self>, inner: W) -> Receiver<W> {
        Receiver {
            inner,
            queue: self.clone(),
        }
    }
}

/// The sending side: every `write` is one line handed to the queue.
#[derive(Debug, Clone)]
pub struct Sender<W> {
    inner: W,
    queue: Arc<LogQueue>,
}

impl<W: Write> Write for Sender<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The writer thread holds one line while it writes it, so the
        // queue proper is full only beyond `limit` lines in flight.
        let before = self.queue.in_flight.fetch_add(1, Ordering::Relaxed);
        if before > self.queue.limit {
            self.queue.waited.inc();
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<'a, W: tracing_subscriber::fmt::MakeWriter<'a>> tracing_subscriber::fmt::MakeWriter<'a>
    for Sender<W>
{
    type Writer = Sender<W::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        Sender {
            inner: self.inner.make_writer(),
            queue: self.queue.clone(),
        }
    }
}

/// The writer thread's side: every `write_all` is one line leaving the queue.
#[derive(Debug)]
pub struct Receiver<W> {
    inner: W,
    queue: Arc<LogQueue>,
}

impl<W: Write> Write for Receiver<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let written = self.inner.write_all(buf);
        // Out of flight even when the write failed: the line is gone.
        let _ = self
            .queue
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        written
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::{Condvar, Mutex};

    /// A destination that holds every write until the gate opens, as a
    /// stdout nobody reads.
    #[derive(Clone, Default)]
    struct Gated {
        open: Arc<(Mutex<bool>, Condvar)>,
        lines: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.open;
            let _open = cv.wait_while(lock.lock().unwrap(), |o| !*o).unwrap();
            self.lines.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_that_find_the_queue_full_are_counted_and_none_is_lost() {
        const LIMIT: usize = 4;
        const LINES: usize = 20;
        let waited = Counter::default();
        let queue = LogQueue::new(LIMIT, waited.clone());
        let out = Gated::default();
        let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(false)
            .buffered_lines_limit(LIMIT)
            .finish(queue.receiver(out.clone()));
        let mut sender = queue.sender(writer);
        // The writer thread blocks on the closed gate: after the line it
        // holds and LIMIT queued ones, every line waits for room.
        let logger = std::thread::spawn(move || {
            for i in 0..LINES {
                sender.write_all(format!("line {i}\n").as_bytes()).unwrap();
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while waited.get() == 0 {
            assert!(std::time::Instant::now() < deadline, "no line waited");
            std::thread::yield_now();
        }
        let (lock, cv) = &*out.open;
        *lock.lock().unwrap() = true;
        cv.notify_all();
        logger.join().unwrap();
        drop(guard); // flushes the queue
        let lines = out.lines.lock().unwrap();
        assert_eq!(lines.len(), LINES);
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l, format!("line {i}\n").as_bytes());
        }
        // At most the lines beyond LIMIT + 1 waited (some may have found
        // room once the gate opened), at least the first one that had to.
        let n = waited.get() as usize;
        assert!((1..=LINES - LIMIT - 1).contains(&n), "{n}");
        assert_eq!(queue.in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_queue_with_room_counts_nothing() {
        let waited = Counter::default();
        let queue = LogQueue::new(64, waited.clone());
        let out = Gated::default();
        *out.open.0.lock().unwrap() = true;
        let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(false)
            .buffered_lines_limit(64)
            .finish(queue.receiver(out.clone()));
        let mut sender = queue.sender(writer);
        for i in 0..32 {
            sender.write_all(format!("{i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        assert_eq!(out.lines.lock().unwrap().len(), 32);
        assert_eq!(waited.get(), 0);
    }
}

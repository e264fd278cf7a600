//! Leader election against API servers that misbehave.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use pullthrough_operator::leader::LeaderElector;

/// An "API server" that accepts connections and never answers: the Lease
/// round trip hangs (kube's client has no deadline that would end it
/// before the Lease runs out).
async fn silent_apiserver() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    (url, task)
}

/// A leader whose renewal hangs steps down within the Lease duration:
/// after that a standby may hold the Lease, and two replicas would write
/// the table together.
#[tokio::test]
async fn a_leader_whose_renewal_hangs_steps_down_within_the_lease() {
    let (url, _server) = silent_apiserver().await;
    let config = kube::Config::new(url.parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let duration = Duration::from_secs(2);
    let elector = LeaderElector::new(client, "ns", "lease", "me", duration);
    let (_stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let reachable = AtomicBool::new(true);
    let start = Instant::now();
    let kept = tokio::time::timeout(Duration::from_secs(30), elector.keep(&mut stop, &reachable))
        .await
        .expect("keep() still renewing 30 s after its last renewal");
    assert!(!kept, "a leader that cannot renew must step down");
    assert!(
        start.elapsed() <= duration,
        "stepped down after {:?}, past the Lease duration {duration:?}",
        start.elapsed()
    );
    assert!(!reachable.load(std::sync::atomic::Ordering::Relaxed));
}

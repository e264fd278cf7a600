//! Observability: Prometheus metrics, the access log (one line per
//! request) and the labels they share. The access log feeds the metrics
//! when a response body ends; the metrics never look at the log. The log
//! writer's queue counts its own back-pressure ([`log_queue`]).

pub mod access_log;
pub mod labels;
pub mod log_queue;
pub mod metric_labels;
pub mod metrics;

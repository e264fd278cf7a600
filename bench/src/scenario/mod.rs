//! One module per scenario, in the order a run takes them. Each measures
//! pullthrough, then nginx, and adds its figures to the report.

pub mod concurrent;
pub mod hit;
pub mod hit_h2;
pub mod manifest;
pub mod miss;
pub mod rss;
pub mod scaleout;
pub mod warm;

//! The figures of a run: one table row per figure, and notes.

use std::fmt::Write as _;

/// One figure, pullthrough next to nginx.
pub struct Row {
    pub name: String,
    pub pt: f64,
    pub ng: f64,
    pub unit: &'static str,
    /// Ratio shown as pullthrough / nginx.
    pub target: String,
    pub met: Option<bool>,
}

impl Row {
    /// "<what>: server CPU per GiB served", a figure with no target.
    pub fn server_cpu_per_gib(what: &str, pt_ms: f64, ng_ms: f64) -> Self {
        Self {
            name: format!("{what}: server CPU per GiB served"),
            pt: pt_ms,
            ng: ng_ms,
            unit: "ms",
            target: "–".into(),
            met: None,
        }
    }
}

/// One figure of the scale-out phase: the replicas over a bucket next to
/// one replica on its disk and nginx (`None`: the figure has no
/// counterpart there, e.g. a read from the bucket).
pub struct ScaleRow {
    pub name: String,
    pub replicas: f64,
    pub pt: Option<f64>,
    pub ng: Option<f64>,
    pub unit: &'static str,
    pub target: String,
    pub met: Option<bool>,
}

/// What the scenarios found, printed at the end.
#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
    /// The scale-out phase (a table of its own), its heading and notes.
    pub scale: Vec<ScaleRow>,
    pub scale_title: String,
    pub scale_replicas: usize,
    pub scale_notes: Vec<String>,
    /// A phase that failed after others had figures: reported after the
    /// table, and the run exits non-zero.
    pub failed: Option<String>,
    /// nginx responses in HIT phases whose X-Cache-Status was not HIT.
    pub nginx_not_hit: usize,
}

impl Report {
    /// The Markdown table, then the notes, on stdout.
    pub fn print(&self, quick: bool, machine: &str) {
        println!(
            "\n## pullthrough-bench ({}), {}\n",
            if quick { "--quick" } else { "full" },
            machine
        );
        if !self.rows.is_empty() {
            print!("{}", table(&self.rows));
            println!();
        }
        for n in &self.notes {
            println!("- {n}");
        }
        if !self.scale.is_empty() {
            println!("\n### {}\n", self.scale_title);
            print!("{}", scale_table(&self.scale, self.scale_replicas));
            println!();
            for n in &self.scale_notes {
                println!("- {n}");
            }
        }
    }
}

fn met_cell(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "–",
    }
}

fn value_cell(v: f64, unit: &str) -> String {
    if unit.is_empty() {
        format!("{v}")
    } else {
        format!("{} {unit}", fmt_num(v))
    }
}

fn ratio_cell(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if b != 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

fn scale_table(rows: &[ScaleRow], n: usize) -> String {
    let mut s = format!(
        "| figure | {n} replicas + S3 | 1 replica, disk | nginx | {n}r / 1r | {n}r / nginx | target | met |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let other = |v: Option<f64>| v.map_or("–".into(), |v| value_cell(v, r.unit));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            value_cell(r.replicas, r.unit),
            other(r.pt),
            other(r.ng),
            ratio_cell(r.replicas, r.pt),
            ratio_cell(r.replicas, r.ng),
            r.target,
            met_cell(r.met)
        );
    }
    s
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| figure | pullthrough | nginx | ratio (pt/nginx) | target | met |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ratio = if r.ng != 0.0 {
            format!("{:.2}×", r.pt / r.ng)
        } else {
            "–".into()
        };
        let met = met_cell(r.met);
        let cell = |v: f64| value_cell(v, r.unit);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            cell(r.pt),
            cell(r.ng),
            ratio,
            r.target,
            met
        );
    }
    s
}

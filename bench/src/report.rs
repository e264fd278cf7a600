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

/// What the scenarios found, printed at the end.
#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
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
        print!("{}", table(&self.rows));
        println!();
        for n in &self.notes {
            println!("- {n}");
        }
    }
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
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let cell = |v: f64| {
            if r.unit.is_empty() {
                format!("{v}")
            } else {
                format!("{} {}", fmt_num(v), r.unit)
            }
        };
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

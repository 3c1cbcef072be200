//! `kata-ctl trace report`: where the time of one container's start went,
//! from the spans of its trace (JSON lines: `kata-trace-forwarder
//! --dump-only`, or a collector's spans in the same form).
//!
//! A container's trace is rooted at the shim's `container` span (Create to
//! Delete). The report prints the root's direct children in time order (the
//! task API calls containerd made) with the time between them, so the lines
//! add up to the whole; then the tree of every span under them; and the
//! headline: containerd's Create to the container's first instruction (the
//! end of the agent's StartContainer).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use kata_proto::trace::wire::Record;
use serde_json::json;

/// `kata-ctl trace` commands.
#[derive(Debug, clap::Subcommand)]
pub enum TraceCommand {
    /// Prints where one container's time went, phase by phase.
    Report {
        /// The spans, JSON lines (`-`: stdin).
        file: PathBuf,
        /// The trace (32 hex digits); default: the container trace of
        /// `--container`, else the one that started last.
        #[arg(long, value_name = "ID")]
        trace: Option<String>,
        /// The container whose trace to report.
        #[arg(long, value_name = "ID")]
        container: Option<String>,
        /// The report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `kata-ctl trace` command.
pub fn run(cmd: TraceCommand) -> Result<ExitCode> {
    match cmd {
        TraceCommand::Report {
            file,
            trace,
            container,
            json,
        } => {
            let spans = read(&file)?;
            let r = report(&spans, trace.as_deref(), container.as_deref())?;
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", r.to_json())?;
            } else {
                write!(out, "{}", r.text())?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn read(file: &PathBuf) -> Result<Vec<Record>> {
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?,
        ))
    };
    let mut spans = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: not a span record", file.display(), i + 1))?;
        spans.push(r);
    }
    Ok(spans)
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// The span's name, or `(between calls)` for a gap.
    pub name: String,
    /// The program.
    pub service: String,
    /// Nesting under the root (1: a task API call).
    pub depth: usize,
    /// Nanoseconds since the root started.
    pub offset_ns: u64,
    /// Nanoseconds.
    pub duration_ns: u64,
}

/// The report of one trace.
#[derive(Debug, Clone)]
pub struct Report {
    /// The trace id.
    pub trace_id: String,
    /// The container, if the root names it.
    pub container: String,
    /// The root's duration.
    pub total_ns: u64,
    /// Create's start to StartContainer's end, if both are there.
    pub first_instruction_ns: Option<u64>,
    /// The root's children and the gaps between them: they add up to the total.
    pub phases: Vec<Line>,
    /// Every span under the root, depth first, in time order.
    pub tree: Vec<Line>,
    /// Spans of the trace whose parent is not in it.
    pub orphans: usize,
}

fn pick_trace<'a>(
    spans: &'a [Record],
    trace: Option<&str>,
    container: Option<&str>,
) -> Result<&'a str> {
    if let Some(t) = trace {
        return spans
            .iter()
            .find(|s| s.trace_id == t)
            .map(|s| s.trace_id.as_str())
            .with_context(|| format!("no span of trace {t}"));
    }
    let roots = spans.iter().filter(|s| {
        s.name == "container"
            && s.parent_span_id.is_empty()
            && container.is_none_or(|c| {
                s.attributes.get("container_id").and_then(|v| v.as_str()) == Some(c)
            })
    });
    match roots.max_by_key(|s| s.start_unix_nano) {
        Some(r) => Ok(&r.trace_id),
        None => match container {
            Some(c) => bail!("no container trace of {c} (the root span ends at the container's Delete: was it deleted?)"),
            None => bail!("no container trace in the spans (tracing on: [runtime] enable_tracing)"),
        },
    }
}

/// The report of trace `trace` (or the one `container`'s, or the latest).
pub fn report(spans: &[Record], trace: Option<&str>, container: Option<&str>) -> Result<Report> {
    let id = pick_trace(spans, trace, container)?;
    let mine: Vec<&Record> = spans.iter().filter(|s| s.trace_id == id).collect();
    let root = mine
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .min_by_key(|s| s.start_unix_nano)
        .or_else(|| mine.iter().min_by_key(|s| s.start_unix_nano))
        .copied()
        .context("an empty trace")?;
    let ids: HashMap<&str, &Record> = mine.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    let mut children: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    let mut orphans = 0;
    for s in &mine {
        if s.span_id == root.span_id {
            continue;
        }
        if !ids.contains_key(s.parent_span_id.as_str()) {
            orphans += 1;
        }
        children
            .entry(s.parent_span_id.as_str())
            .or_default()
            .push(s);
    }
    for v in children.values_mut() {
        v.sort_by_key(|s| (s.start_unix_nano, s.end_unix_nano));
    }
    let t0 = root.start_unix_nano;
    let line = |s: &Record, depth| Line {
        name: s.name.clone(),
        service: s.service.clone(),
        depth,
        offset_ns: s.start_unix_nano.saturating_sub(t0),
        duration_ns: s.end_unix_nano.saturating_sub(s.start_unix_nano),
    };
    // the root's children, with what lies between them
    let mut phases = Vec::new();
    let mut at = t0;
    for c in children.get(root.span_id.as_str()).into_iter().flatten() {
        if c.start_unix_nano > at {
            phases.push(Line {
                name: "(between calls)".into(),
                service: String::new(),
                depth: 1,
                offset_ns: at - t0,
                duration_ns: c.start_unix_nano - at,
            });
        }
        // overlapping calls (a Kill during a Start) count once
        let start = c.start_unix_nano.max(at);
        let end = c.end_unix_nano.max(start);
        phases.push(Line {
            duration_ns: end - start,
            offset_ns: start - t0,
            ..line(c, 1)
        });
        at = end;
    }
    if root.end_unix_nano > at {
        phases.push(Line {
            name: "(between calls)".into(),
            service: String::new(),
            depth: 1,
            offset_ns: at - t0,
            duration_ns: root.end_unix_nano - at,
        });
    }
    let mut tree = Vec::new();
    let mut stack: Vec<(&Record, usize)> = children
        .get(root.span_id.as_str())
        .into_iter()
        .flatten()
        .rev()
        .map(|c| (*c, 1))
        .collect();
    while let Some((s, depth)) = stack.pop() {
        tree.push(line(s, depth));
        for c in children.get(s.span_id.as_str()).into_iter().flatten().rev() {
            stack.push((c, depth + 1));
        }
    }
    let create = mine
        .iter()
        .find(|s| s.name == "Create" && s.parent_span_id == root.span_id);
    let started = mine
        .iter()
        .filter(|s| s.name == "StartContainer")
        .max_by_key(|s| s.end_unix_nano);
    Ok(Report {
        trace_id: id.to_string(),
        container: root
            .attributes
            .get("container_id")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string(),
        total_ns: root.end_unix_nano.saturating_sub(t0),
        first_instruction_ns: match (create, started) {
            (Some(c), Some(s)) => Some(s.end_unix_nano.saturating_sub(c.start_unix_nano)),
            _ => None,
        },
        phases,
        tree,
        orphans,
    })
}

fn ms(ns: u64) -> String {
    format!("{:.1} ms", ns as f64 / 1e6)
}

impl Report {
    /// The report for a person.
    pub fn text(&self) -> String {
        let mut o = String::new();
        o.push_str(&format!(
            "trace {}  container {}\n\n",
            self.trace_id,
            if self.container.is_empty() {
                "?"
            } else {
                &self.container
            }
        ));
        o.push_str(&format!(
            "{:<44}{:>12}\n",
            "Create to Delete",
            ms(self.total_ns)
        ));
        if let Some(f) = self.first_instruction_ns {
            o.push_str(&format!(
                "{:<44}{:>12}\n",
                "Create to the container's first instruction",
                ms(f)
            ));
        }
        o.push_str("\nphases (the calls containerd made, and the time between them)\n");
        for p in &self.phases {
            let share = 100.0 * p.duration_ns as f64 / self.total_ns.max(1) as f64;
            o.push_str(&format!(
                "  {:<40}{:>12}  {:>5.1}%\n",
                p.name,
                ms(p.duration_ns),
                share
            ));
        }
        o.push_str("\nevery span (start after Create, duration, program)\n");
        for l in &self.tree {
            let name = format!("{}{}", "  ".repeat(l.depth), l.name);
            o.push_str(&format!(
                "{:<44}{:>12}{:>12}  {}\n",
                name,
                format!("+{}", ms(l.offset_ns)),
                ms(l.duration_ns),
                l.service
            ));
        }
        if self.orphans > 0 {
            o.push_str(&format!(
                "\n{} spans of this trace have a parent that is not in the input (spans lost?)\n",
                self.orphans
            ));
        }
        o
    }

    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let lines = |v: &[Line]| {
            v.iter()
                .map(|l| {
                    json!({
                        "name": l.name,
                        "service": l.service,
                        "depth": l.depth,
                        "offset_ns": l.offset_ns,
                        "duration_ns": l.duration_ns,
                    })
                })
                .collect::<Vec<_>>()
        };
        json!({
            "trace_id": self.trace_id,
            "container": self.container,
            "total_ns": self.total_ns,
            "first_instruction_ns": self.first_instruction_ns,
            "phases": lines(&self.phases),
            "tree": lines(&self.tree),
            "orphans": self.orphans,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, parent: &str, name: &str, service: &str, start: u64, end: u64) -> Record {
        Record {
            trace_id: "ab".repeat(16),
            span_id: id.repeat(8),
            parent_span_id: if parent.is_empty() {
                String::new()
            } else {
                parent.repeat(8)
            },
            name: name.into(),
            service: service.into(),
            start_unix_nano: start,
            end_unix_nano: end,
            ..Default::default()
        }
    }

    #[test]
    fn phases_add_up_and_the_tree_nests() {
        let mut root = rec("01", "", "container", "shim", 1000, 9000);
        root.attributes.insert("container_id".into(), json!("c1"));
        let spans = vec![
            root,
            rec("02", "01", "Create", "shim", 1000, 5000),
            rec("03", "02", "boot", "shim", 1500, 4000),
            rec("04", "02", "CreateContainer", "kata-agent", 4200, 4800),
            rec("05", "01", "Start", "shim", 5500, 6000),
            rec("06", "05", "StartContainer", "kata-agent", 5600, 5900),
            rec("07", "01", "Delete", "shim", 7000, 8500),
            // another trace is left out
            Record {
                trace_id: "cd".repeat(16),
                ..rec("08", "", "container", "shim", 0, 1)
            },
        ];
        let r = report(&spans, None, Some("c1")).unwrap();
        assert_eq!(r.total_ns, 8000);
        let sum: u64 = r.phases.iter().map(|p| p.duration_ns).sum();
        assert_eq!(sum, r.total_ns);
        let names: Vec<&str> = r.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "Create",
                "(between calls)",
                "Start",
                "(between calls)",
                "Delete",
                "(between calls)"
            ]
        );
        assert_eq!(r.first_instruction_ns, Some(4900));
        let tree: Vec<(&str, usize)> = r.tree.iter().map(|l| (l.name.as_str(), l.depth)).collect();
        assert_eq!(
            tree,
            [
                ("Create", 1),
                ("boot", 2),
                ("CreateContainer", 2),
                ("Start", 1),
                ("StartContainer", 2),
                ("Delete", 1)
            ]
        );
        assert_eq!(r.orphans, 0);
        assert!(r
            .text()
            .contains("Create to the container's first instruction"));
        assert!(report(&spans, None, Some("nope")).is_err());
    }
}

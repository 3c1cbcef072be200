//! Prometheus text exposition shared by the agent (GetMetrics), the shim's
//! management socket and kata-monitor: an encoder for the figures read
//! at scrape time (processes from /proc/<pid>, the guest from /proc), and a
//! strict parser for text that comes from elsewhere (a guest's GetMetrics, a
//! pod's scrape), which kata-monitor relabels with `sandbox_id`.
//!
//! Kata's family names: `<prefix>_threads`, `<prefix>_proc_status{item}`,
//! `<prefix>_proc_stat{item}`, `<prefix>_io_stat{item}`, `<prefix>_fds`; the
//! guest's `kata_guest_load`, `_tasks`, `_cpu_time`, `_vm_stat`, `_meminfo`,
//! `_netdev_stat`, `_diskstat`, and kata-rs's `_fs_bytes`, `_fs_inodes`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Most bytes of metrics text taken from a guest or a pod.
pub const MAX_TEXT: usize = 4 << 20;

/// Most series taken from a guest or a pod.
pub const MAX_SERIES: usize = 20_000;

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A value that only goes up.
    Counter,
    /// Buckets, sum and count.
    Histogram,
    /// Anything else (`untyped`, `summary`).
    Untyped,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
            Kind::Untyped => "untyped",
        }
    }

    fn parse(s: &str) -> Kind {
        match s {
            "gauge" => Kind::Gauge,
            "counter" => Kind::Counter,
            "histogram" => Kind::Histogram,
            _ => Kind::Untyped,
        }
    }
}

/// One sample: a series name (the family's, or with `_bucket`, `_sum`,
/// `_count`), its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series name.
    pub name: String,
    /// Label pairs, in order.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

/// A family: help, type, samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// `# HELP` text.
    pub help: String,
    /// `# TYPE`.
    pub kind: Kind,
    /// Its samples.
    pub samples: Vec<Sample>,
}

/// Families by name, written grouped (one HELP and TYPE each), in name order.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Metrics {
    families: BTreeMap<String, Family>,
}

impl Metrics {
    /// Nothing yet.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    fn family(&mut self, name: &str, help: &str, kind: Kind) -> &mut Family {
        self.families
            .entry(name.to_string())
            .or_insert_with(|| Family {
                help: help.to_string(),
                kind,
                samples: Vec::new(),
            })
    }

    /// Adds a sample of family `name` (created with `help` and `kind` if new).
    pub fn add(&mut self, name: &str, help: &str, kind: Kind, labels: &[(&str, &str)], value: f64) {
        let f = self.family(name, help, kind);
        f.samples.push(Sample {
            name: name.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        });
    }

    /// A gauge sample.
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.add(name, help, Kind::Gauge, labels, value);
    }

    /// A counter sample.
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.add(name, help, Kind::Counter, labels, value);
    }

    /// A histogram's series: `buckets` are (upper bound, count in it) with
    /// the last bound `+Inf` implied; written cumulative, as `_bucket{le}`,
    /// `_sum` and `_count`.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        buckets: &[(f64, u64)],
        above: u64,
        sum: f64,
    ) {
        let f = self.family(name, help, Kind::Histogram);
        let owned: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut total = 0u64;
        let mut push = |series: String, le: Option<String>, value: f64| {
            let mut l = owned.clone();
            if let Some(le) = le {
                l.push(("le".into(), le));
            }
            f.samples.push(Sample {
                name: series,
                labels: l,
                value,
            });
        };
        for (bound, n) in buckets {
            total += n;
            push(
                format!("{name}_bucket"),
                Some(format_value(*bound)),
                total as f64,
            );
        }
        total += above;
        push(format!("{name}_bucket"), Some("+Inf".into()), total as f64);
        push(format!("{name}_sum"), None, sum);
        push(format!("{name}_count"), None, total as f64);
    }

    /// Takes every family of `other`, each sample with `extra` labels first
    /// (e.g. `sandbox_id`); a family already here keeps its help and type.
    pub fn merge(&mut self, other: Metrics, extra: &[(&str, &str)]) {
        for (name, f) in other.families {
            let mine = self.family(&name, &f.help, f.kind);
            for mut s in f.samples {
                let mut labels: Vec<(String, String)> = extra
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                labels.extend(
                    s.labels
                        .into_iter()
                        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k)),
                );
                s.labels = labels;
                mine.samples.push(s);
            }
        }
    }

    /// How many series.
    pub fn len(&self) -> usize {
        self.families.values().map(|f| f.samples.len()).sum()
    }

    /// No series at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The family `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Family> {
        self.families.get(name)
    }

    /// The family names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.families.keys().map(String::as_str)
    }

    /// Keeps only the families whose name passes `keep`.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.families.retain(|n, _| keep(n));
    }

    /// The text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, f) in &self.families {
            let _ = writeln!(out, "# HELP {name} {}", escape_help(&f.help));
            let _ = writeln!(out, "# TYPE {name} {}", f.kind.as_str());
            for s in &f.samples {
                out.push_str(&s.name);
                if !s.labels.is_empty() {
                    out.push('{');
                    for (i, (k, v)) in s.labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{k}=\"{}\"", escape_value(v));
                    }
                    out.push('}');
                }
                let _ = writeln!(out, " {}", format_value(s.value));
            }
        }
        out
    }

    /// Parses the text format strictly (what a guest or a pod sent): names
    /// and labels must be valid, values numbers, at most [`MAX_TEXT`] bytes
    /// and [`MAX_SERIES`] series. A sample without a `# TYPE` line is untyped.
    pub fn parse(text: &str) -> Result<Metrics, String> {
        if text.len() > MAX_TEXT {
            return Err(format!(
                "{} bytes of metrics: the limit is {MAX_TEXT}",
                text.len()
            ));
        }
        let mut m = Metrics::new();
        let mut helps: BTreeMap<String, String> = BTreeMap::new();
        let mut kinds: BTreeMap<String, Kind> = BTreeMap::new();
        let mut n = 0usize;
        for (i, line) in text.lines().enumerate() {
            let bad = |why: &str| format!("line {}: {why}", i + 1);
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix('#') {
                let rest = rest.trim_start();
                let (word, rest) = rest.split_once(' ').unwrap_or((rest, ""));
                let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                match word {
                    "HELP" | "TYPE" if !valid_name(name) => {
                        return Err(bad("a metric name that is not one"))
                    }
                    "HELP" => {
                        helps.insert(name.into(), text.into());
                    }
                    "TYPE" => {
                        kinds.insert(name.into(), Kind::parse(text.trim()));
                    }
                    _ => {}
                }
                continue;
            }
            let s = parse_sample(line).map_err(|e| bad(&e))?;
            n += 1;
            if n > MAX_SERIES {
                return Err(format!("more than {MAX_SERIES} series"));
            }
            let family = family_of(&s.name, &kinds);
            let kind = kinds.get(&family).copied().unwrap_or(Kind::Untyped);
            let help = helps.get(&family).cloned().unwrap_or_default();
            m.family(&family, &help, kind).samples.push(s);
        }
        Ok(m)
    }
}

/// The family a series belongs to: a histogram's `_bucket`, `_sum` and
/// `_count` series belong to the histogram.
fn family_of(series: &str, kinds: &BTreeMap<String, Kind>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix) {
            if kinds.get(base) == Some(&Kind::Histogram) {
                return base.to_string();
            }
        }
    }
    series.to_string()
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        && n.len() <= 200
}

fn valid_label(n: &str) -> bool {
    valid_name(n) && !n.contains(':')
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample without a value")?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err(format!("{name:?} is not a metric name"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut r = r;
        loop {
            r = r.trim_start_matches([' ', ',']);
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let (k, after) = r.split_once('=').ok_or("a label without =")?;
            let k = k.trim();
            if !valid_label(k) {
                return Err(format!("{k:?} is not a label name"));
            }
            let after = after
                .strip_prefix('"')
                .ok_or("a label value without quotes")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err("an unterminated label value".into()),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => return Err("an unterminated label value".into()),
                }
            };
            if value.len() > 1024 || labels.len() >= 32 {
                return Err("too many or too long labels".into());
            }
            labels.push((k.to_string(), value));
            r = &after[end + 1..];
        }
    }
    let mut words = rest.split_whitespace();
    let value = words.next().ok_or("a sample without a value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse::<f64>()
            .map_err(|_| format!("{v:?} is not a number"))?,
    };
    // an optional timestamp, nothing else
    if let Some(ts) = words.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("{ts:?} is not a timestamp"))?;
    }
    if words.next().is_some() {
        return Err("text after the value".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// `key: value [kB]` lines (/proc/<pid>/status, /proc/meminfo), kB as bytes.
fn colon_lines(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let mut w = v.split_whitespace();
            let n: f64 = w.next()?.parse().ok()?;
            let scale = if w.next() == Some("kB") { 1024.0 } else { 1.0 };
            Some((k.trim().to_string(), n * scale))
        })
        .collect()
}

/// The fields of /proc/<pid>/stat Kata reports, by their proc(5) position
/// (1-based, after the command name).
const STAT_FIELDS: &[(&str, usize)] = &[
    ("minflt", 10),
    ("cminflt", 11),
    ("majflt", 12),
    ("cmajflt", 13),
    ("utime", 14),
    ("stime", 15),
    ("cutime", 16),
    ("cstime", 17),
    ("priority", 18),
    ("nice", 19),
    ("num_threads", 20),
    ("starttime", 22),
    ("vsize", 23),
    ("rss", 24),
];

/// The /proc/<pid>/status items reported (as Kata's proc_status).
const STATUS_ITEMS: &[&str] = &[
    "FDSize",
    "VmPeak",
    "VmSize",
    "VmLck",
    "VmPin",
    "VmHWM",
    "VmRSS",
    "RssAnon",
    "RssFile",
    "RssShmem",
    "VmData",
    "VmStk",
    "VmExe",
    "VmLib",
    "VmPTE",
    "VmSwap",
    "voluntary_ctxt_switches",
    "nonvoluntary_ctxt_switches",
];

/// Adds the process metrics of `pid` (`/proc/<pid>`; "self" for this one)
/// as `<prefix>_threads`, `_proc_status{item}`, `_proc_stat{item}`,
/// `_io_stat{item}`, `_fds`. A process that is gone adds nothing.
pub fn add_process(m: &mut Metrics, prefix: &str, pid: &str) {
    let dir = format!("/proc/{pid}");
    if let Ok(text) = std::fs::read_to_string(format!("{dir}/status")) {
        let items = colon_lines(&text);
        let name = format!("{prefix}_proc_status");
        for (k, v) in &items {
            if STATUS_ITEMS.contains(&k.as_str()) {
                m.gauge(
                    &name,
                    "Process status (/proc/<pid>/status), sizes in bytes.",
                    &[("item", k)],
                    *v,
                );
            }
        }
        if let Some((_, t)) = items.iter().find(|(k, _)| k == "Threads") {
            m.gauge(
                &format!("{prefix}_threads"),
                "Threads of the process.",
                &[],
                *t,
            );
        }
    }
    if let Ok(text) = std::fs::read_to_string(format!("{dir}/stat")) {
        // the command name is in parentheses and may hold spaces
        if let Some((_, rest)) = text.rsplit_once(')') {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let name = format!("{prefix}_proc_stat");
            for (item, pos) in STAT_FIELDS {
                // `rest` starts at field 3 (state)
                if let Some(v) = fields.get(pos - 3).and_then(|v| v.parse::<f64>().ok()) {
                    m.gauge(
                        &name,
                        "Process statistics (/proc/<pid>/stat): times in clock ticks.",
                        &[("item", item)],
                        v,
                    );
                }
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string(format!("{dir}/io")) {
        let name = format!("{prefix}_io_stat");
        for (k, v) in colon_lines(&text) {
            m.gauge(
                &name,
                "Process I/O statistics (/proc/<pid>/io).",
                &[("item", &k)],
                v,
            );
        }
    }
    if let Ok(d) = std::fs::read_dir(format!("{dir}/fd")) {
        m.gauge(
            &format!("{prefix}_fds"),
            "Open file descriptors of the process.",
            &[],
            d.count() as f64,
        );
    }
}

/// Adds the guest's figures read from `proc` (normally "/proc") and the
/// file systems `mounts` (statvfs): `kata_guest_*`.
pub fn add_guest(m: &mut Metrics, proc: &str, mounts: &[&str]) {
    let read = |f: &str| std::fs::read_to_string(format!("{proc}/{f}")).unwrap_or_default();
    let load = read("loadavg");
    let w: Vec<&str> = load.split_whitespace().collect();
    for (i, item) in ["load1", "load5", "load15"].iter().enumerate() {
        if let Some(v) = w.get(i).and_then(|v| v.parse().ok()) {
            m.gauge(
                "kata_guest_load",
                "Guest load averages.",
                &[("item", item)],
                v,
            );
        }
    }
    if let Some((cur, max)) = w.get(3).and_then(|t| t.split_once('/')) {
        for (item, v) in [("cur", cur), ("max", max)] {
            if let Ok(v) = v.parse() {
                m.gauge(
                    "kata_guest_tasks",
                    "Guest tasks: runnable now (cur) and in total (max).",
                    &[("item", item)],
                    v,
                );
            }
        }
    }
    const CPU: &[&str] = &[
        "user",
        "nice",
        "system",
        "idle",
        "iowait",
        "irq",
        "softirq",
        "steal",
        "guest",
        "guest_nice",
    ];
    for l in read("stat").lines().filter(|l| l.starts_with("cpu")) {
        let mut w = l.split_whitespace();
        let cpu = w.next().unwrap_or("cpu");
        for (item, v) in CPU.iter().zip(w) {
            if let Ok(v) = v.parse() {
                m.gauge(
                    "kata_guest_cpu_time",
                    "Guest CPU time in clock ticks (/proc/stat), per cpu and in total (cpu).",
                    &[("cpu", cpu), ("item", item)],
                    v,
                );
            }
        }
    }
    for l in read("vmstat").lines() {
        if let Some((k, v)) = l.split_once(' ') {
            if let Ok(v) = v.trim().parse() {
                m.gauge(
                    "kata_guest_vm_stat",
                    "Guest virtual memory statistics (/proc/vmstat).",
                    &[("item", k)],
                    v,
                );
            }
        }
    }
    for (k, v) in colon_lines(&read("meminfo")) {
        m.gauge(
            "kata_guest_meminfo",
            "Guest memory (/proc/meminfo), in bytes.",
            &[("item", &k)],
            v,
        );
    }
    add_netdev(
        m,
        "kata_guest_netdev_stat",
        "Guest network devices (/proc/net/dev).",
        &read("net/dev"),
    );
    const DISK: &[&str] = &[
        "reads",
        "reads_merged",
        "sectors_read",
        "time_reading",
        "writes",
        "writes_merged",
        "sectors_written",
        "time_writing",
        "io_in_progress",
        "time_io",
        "weighted_time_io",
    ];
    for l in read("diskstats").lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w.len() < 14 || w[2].starts_with("loop") || w[2].starts_with("ram") {
            continue;
        }
        for (item, v) in DISK.iter().zip(&w[3..]) {
            if let Ok(v) = v.parse() {
                m.gauge(
                    "kata_guest_diskstat",
                    "Guest block devices (/proc/diskstats).",
                    &[("disk", w[2]), ("item", item)],
                    v,
                );
            }
        }
    }
    for mp in mounts {
        if let Ok(s) = nix_statvfs(mp) {
            let (bsize, blocks, bfree, bavail, files, ffree) = s;
            for (item, v) in [
                ("total", blocks * bsize),
                ("free", bfree * bsize),
                ("avail", bavail * bsize),
            ] {
                m.gauge(
                    "kata_guest_fs_bytes",
                    "Guest file systems: bytes.",
                    &[("mountpoint", mp), ("item", item)],
                    v as f64,
                );
            }
            for (item, v) in [("total", files), ("free", ffree)] {
                m.gauge(
                    "kata_guest_fs_inodes",
                    "Guest file systems: inodes.",
                    &[("mountpoint", mp), ("item", item)],
                    v as f64,
                );
            }
        }
    }
}

/// Adds the devices of a /proc/<pid>/net/dev `text` as family `name`,
/// labelled `interface` and `item` (recv_bytes, sent_packets, ...).
pub fn add_netdev(m: &mut Metrics, name: &str, help: &str, text: &str) {
    const ITEMS: &[&str] = &[
        "recv_bytes",
        "recv_packets",
        "recv_errs",
        "recv_drop",
        "recv_fifo",
        "recv_frame",
        "recv_compressed",
        "recv_multicast",
        "sent_bytes",
        "sent_packets",
        "sent_errs",
        "sent_drop",
        "sent_fifo",
        "sent_colls",
        "sent_carrier",
        "sent_compressed",
    ];
    for l in text.lines().skip(2) {
        if let Some((dev, rest)) = l.split_once(':') {
            for (item, v) in ITEMS.iter().zip(rest.split_whitespace()) {
                if let Ok(v) = v.parse() {
                    m.gauge(name, help, &[("interface", dev.trim()), ("item", item)], v);
                }
            }
        }
    }
}

/// statvfs(2): (fragment size, blocks, free, available, inodes, free inodes).
fn nix_statvfs(path: &str) -> std::io::Result<(u64, u64, u64, u64, u64, u64)> {
    let c = std::ffi::CString::new(path).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let mut s: libc::statvfs = unsafe_zeroed();
    // SAFETY: c is a NUL-terminated path, s a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((
        s.f_frsize, s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
    ))
}

fn unsafe_zeroed() -> libc::statvfs {
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_parse_round_trip_and_relabel() {
        let mut m = Metrics::new();
        m.gauge(
            "kata_guest_meminfo",
            "Memory.",
            &[("item", "MemTotal")],
            268435456.0,
        );
        m.counter(
            "kata_shim_calls_total",
            "Calls \"quoted\".",
            &[("method", "Create"), ("v", "a\"b\\c\nd")],
            3.0,
        );
        let text = m.render();
        let back = Metrics::parse(&text).unwrap();
        assert_eq!(back.render(), text);
        let mut all = Metrics::new();
        all.merge(back.clone(), &[("sandbox_id", "p1")]);
        all.merge(back, &[("sandbox_id", "p2")]);
        let t = all.render();
        assert_eq!(
            t.matches("# TYPE kata_guest_meminfo gauge").count(),
            1,
            "{t}"
        );
        assert!(
            t.contains("kata_guest_meminfo{sandbox_id=\"p2\",item=\"MemTotal\"} 268435456"),
            "{t}"
        );
    }

    #[test]
    fn histograms_are_cumulative() {
        let mut m = Metrics::new();
        m.histogram(
            "lat_seconds",
            "Latency.",
            &[("op", "READ")],
            &[(0.001, 2), (0.01, 3)],
            1,
            0.5,
        );
        let t = m.render();
        assert!(
            t.contains("lat_seconds_bucket{op=\"READ\",le=\"0.001\"} 2"),
            "{t}"
        );
        assert!(
            t.contains("lat_seconds_bucket{op=\"READ\",le=\"0.01\"} 5"),
            "{t}"
        );
        assert!(
            t.contains("lat_seconds_bucket{op=\"READ\",le=\"+Inf\"} 6"),
            "{t}"
        );
        assert!(t.contains("lat_seconds_count{op=\"READ\"} 6"), "{t}");
        assert_eq!(Metrics::parse(&t).unwrap(), m);
    }

    #[test]
    fn histograms_stay_one_family() {
        let text = "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n";
        let m = Metrics::parse(text).unwrap();
        assert_eq!(m.names().collect::<Vec<_>>(), vec!["h"]);
        assert_eq!(m.len(), 4);
        assert!(m.render().contains("h_sum 3.5"));
    }

    #[test]
    fn hostile_text_is_refused() {
        for bad in [
            "x{a=\"1\" 1",
            "1x 1",
            "x{a=1} 1",
            "x{a=\"1\"} one",
            "x 1 2 3",
            "x{a-b=\"1\"} 1",
            "x{a=\"unterminated} 1",
        ] {
            assert!(Metrics::parse(bad).is_err(), "{bad}");
        }
        let big = "x 1\n".repeat(MAX_SERIES + 1);
        assert!(Metrics::parse(&big).is_err());
        assert!(Metrics::parse(&"#".repeat(MAX_TEXT + 1)).is_err());
    }

    #[test]
    fn this_process_and_this_machine() {
        let mut m = Metrics::new();
        add_process(&mut m, "kata_test", "self");
        for f in [
            "kata_test_threads",
            "kata_test_proc_status",
            "kata_test_proc_stat",
            "kata_test_fds",
        ] {
            assert!(m.get(f).is_some(), "{f}: {}", m.render());
        }
        let mut g = Metrics::new();
        add_guest(&mut g, "/proc", &["/"]);
        let t = g.render();
        assert!(t.contains("kata_guest_meminfo{item=\"MemTotal\"}"), "{t}");
        assert!(
            t.contains("kata_guest_cpu_time{cpu=\"cpu\",item=\"user\"}"),
            "{t}"
        );
        assert!(
            t.contains("kata_guest_fs_bytes{mountpoint=\"/\",item=\"total\"}"),
            "{t}"
        );
        Metrics::parse(&t).unwrap();
        let mut gone = Metrics::new();
        add_process(&mut gone, "x", "999999999");
        assert!(gone.is_empty());
    }
}

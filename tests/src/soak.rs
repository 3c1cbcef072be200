//! The soak: many pod lifecycles through the private containerd, several at
//! a time, a random fault at a random moment in most of them, and after each
//! one a check that the pod left nothing behind. `make soak` runs 200 and
//! writes docs/reliability.md; `make test` runs a short one.
//!
//! A lifecycle is `ctr run -d` of a busybox container in its own pod, then a
//! random mix of an exec, an exec fed on stdin and a bind mount read back,
//! then a stop and delete as a user would do them. The faults: SIGKILL of
//! the shim, QEMU, kata-virtiofsd or kata-vmm-launcher; the guest powering
//! itself off (through the debug console, as a root process in the guest
//! would); a container that runs out of memory; a delete racing the start.
//! A faulted lifecycle may fail (that is what faults do), but its container
//! must still delete and leave nothing, and containerd must keep answering.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::containerd::{run_bounded, Containerd};
use crate::shim::{pod_process, RUNTIME};

/// How long one ctr call may take before the soak calls it hung.
const CTR_HUNG: Duration = Duration::from_secs(60);
/// containerd must answer `ctr version` within this, all along.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// How long a pod may take to be gone after its container was deleted.
const GONE_WITHIN: Duration = Duration::from_secs(20);
/// Growth of containerd's or a surviving shim's open files that counts as a
/// leak (a few come and go with gRPC connections).
const FD_MARGIN: usize = 8;
/// Host memory (MemAvailable) that may be missing at the end: page cache
/// and slab caches of the file systems the pods used.
pub const MEMORY_MARGIN_MIB: i64 = 128;

/// What a soak run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Pod lifecycles.
    pub lifecycles: usize,
    /// Lifecycles at a time.
    pub parallel: usize,
    /// The random seed (printed, so a run can be repeated).
    pub seed: u64,
}

impl Options {
    /// From `KATA_SOAK_LIFECYCLES`, `KATA_SOAK_PARALLEL` and
    /// `KATA_SOAK_SEED`, else `lifecycles`, 4 and the clock.
    pub fn from_env(lifecycles: usize) -> Options {
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        Options {
            lifecycles: num("KATA_SOAK_LIFECYCLES").map_or(lifecycles, |n| n as usize),
            parallel: num("KATA_SOAK_PARALLEL").map_or(4, |n| n.max(1) as usize),
            seed: num("KATA_SOAK_SEED").unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            }),
        }
    }
}

/// A fault injected into a lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// None: the lifecycle must succeed.
    None,
    /// SIGKILL of containerd-shim-kata-v2.
    KillShim,
    /// SIGKILL of QEMU.
    KillQemu,
    /// SIGKILL of kata-virtiofsd.
    KillVirtiofsd,
    /// SIGKILL of kata-vmm-launcher.
    KillLauncher,
    /// `poweroff -f` as root in the guest.
    GuestPowersOff,
    /// The container runs out of memory.
    Oom,
    /// Kill and delete of the task while `ctr run` is starting the pod.
    DeleteRacesStart,
}

impl Fault {
    const ALL: [Fault; 8] = [
        Fault::None,
        Fault::KillShim,
        Fault::KillQemu,
        Fault::KillVirtiofsd,
        Fault::KillLauncher,
        Fault::GuestPowersOff,
        Fault::Oom,
        Fault::DeleteRacesStart,
    ];

    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::KillShim => "SIGKILL shim",
            Fault::KillQemu => "SIGKILL QEMU",
            Fault::KillVirtiofsd => "SIGKILL kata-virtiofsd",
            Fault::KillLauncher => "SIGKILL kata-vmm-launcher",
            Fault::GuestPowersOff => "guest powers off",
            Fault::Oom => "container OOM",
            Fault::DeleteRacesStart => "delete races start",
        }
    }

    /// The process name a kill fault looks for among the pod's processes.
    fn victim(self) -> Option<&'static str> {
        match self {
            Fault::KillShim => Some("containerd-shim-kata-v2"),
            Fault::KillVirtiofsd => Some("kata-virtiofsd"),
            Fault::KillLauncher => Some("kata-vmm-launcher"),
            _ => None,
        }
    }
}

/// xorshift64*: enough randomness for choosing faults, and repeatable.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded (0 is replaced: xorshift never leaves it).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What one lifecycle does, chosen before it starts.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The container (and pod) id.
    pub id: String,
    /// The fault.
    pub fault: Fault,
    /// Milliseconds after the start of the lifecycle the fault fires.
    pub fault_after_ms: u64,
    /// An exec that prints.
    pub exec: bool,
    /// An exec fed on stdin.
    pub stdin: bool,
    /// A bind mount, read back in the guest.
    pub bind: bool,
}

impl Plan {
    /// A random plan for lifecycle `i`: a fault in 3 of 4.
    pub fn random(i: usize, rng: &mut Rng) -> Plan {
        let fault = if rng.chance(25) {
            Fault::None
        } else {
            Fault::ALL[1 + rng.below(Fault::ALL.len() as u64 - 1) as usize]
        };
        Plan {
            id: format!("soak-{i}"),
            fault,
            fault_after_ms: rng.below(4000),
            exec: rng.chance(50),
            stdin: rng.chance(50),
            bind: rng.chance(50),
        }
    }
}

/// What became of one lifecycle.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What it was to do.
    pub plan: Plan,
    /// `ctr run -d` to running, seconds (if it got there).
    pub start_s: Option<f64>,
    /// Failures: (kind, detail). With a fault, failures of the steps after
    /// it are expected and recorded as such.
    pub failures: Vec<(String, String)>,
    /// Failures no fault explains: (kind, detail).
    pub unexpected: Vec<(String, String)>,
    /// What the pod left behind: (kind, detail).
    pub leaks: Vec<(String, String)>,
    /// ctr calls that did not return within [`CTR_HUNG`].
    pub hung: Vec<String>,
}

/// The whole run.
#[derive(Debug)]
pub struct Report {
    /// What it did.
    pub options: Options,
    /// Every lifecycle.
    pub outcomes: Vec<Outcome>,
    /// Leaks found at the end: (kind, detail).
    pub final_leaks: Vec<(String, String)>,
    /// `ctr version` calls, the slowest answer and how many took longer
    /// than [`ANSWER_WITHIN`].
    pub answers: (usize, Duration, usize),
    /// MemAvailable at the start and the end, MiB.
    pub memory_mib: (i64, i64),
    /// containerd's open files at the start and the end.
    pub containerd_fds: (usize, usize),
    /// The surviving pod's shim's open files at the start and the end.
    pub survivor_fds: (usize, usize),
    /// Wall time.
    pub elapsed: Duration,
}

impl Report {
    /// Everything that makes the run fail: leaks, hangs, unexpected
    /// failures, slow answers.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        for o in &self.outcomes {
            for (k, d) in &o.leaks {
                p.push(format!("{}: leak ({k}): {d}", o.plan.id));
            }
            for h in &o.hung {
                p.push(format!("{}: hung: {h}", o.plan.id));
            }
            for (k, d) in &o.unexpected {
                p.push(format!(
                    "{} (fault: {}): unexpected failure ({k}): {d}",
                    o.plan.id,
                    o.plan.fault.name()
                ));
            }
        }
        for (k, d) in &self.final_leaks {
            p.push(format!("at the end: leak ({k}): {d}"));
        }
        if self.answers.2 > 0 {
            p.push(format!(
                "containerd answered {} of {} calls later than {ANSWER_WITHIN:?} (slowest {:?})",
                self.answers.2, self.answers.0, self.answers.1
            ));
        }
        p
    }

    /// The report as Markdown tables.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let n = self.outcomes.len();
        let count = |f: &dyn Fn(&Outcome) -> usize| self.outcomes.iter().map(f).sum::<usize>();
        let leaks = count(&|o| o.leaks.len()) + self.final_leaks.len();
        let hung = count(&|o| o.hung.len());
        let unexpected = count(&|o| o.unexpected.len());
        let mut starts: Vec<f64> = self.outcomes.iter().filter_map(|o| o.start_s).collect();
        starts.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            if starts.is_empty() {
                f64::NAN
            } else {
                starts[((starts.len() - 1) as f64 * q).round() as usize]
            }
        };
        s.push_str("| figure | value |\n|---|---|\n");
        s.push_str(&format!(
            "| lifecycles ({} at a time, seed {}) | {n} in {:.0} s |\n",
            self.options.parallel,
            self.options.seed,
            self.elapsed.as_secs_f64()
        ));
        s.push_str(&format!(
            "| with an exec / stdin / bind mount | {} / {} / {} |\n",
            count(&|o| usize::from(o.plan.exec)),
            count(&|o| usize::from(o.plan.stdin)),
            count(&|o| usize::from(o.plan.bind))
        ));
        s.push_str(&format!(
            "| start (`ctr run -d` to running), p50 / p99 | {:.2} s / {:.2} s ({} started) |\n",
            pct(0.5),
            pct(0.99),
            starts.len()
        ));
        s.push_str(&format!("| leaks | {leaks} |\n"));
        s.push_str(&format!(
            "| hung ctr calls (over {CTR_HUNG:?}) | {hung} |\n"
        ));
        s.push_str(&format!("| unexpected failures | {unexpected} |\n"));
        s.push_str(&format!(
            "| containerd answers (`ctr version`, all along) | {} calls, slowest {} ms, {} over {} ms |\n",
            self.answers.0,
            self.answers.1.as_millis(),
            self.answers.2,
            ANSWER_WITHIN.as_millis()
        ));
        s.push_str(&format!(
            "| host MemAvailable, start / end | {} / {} MiB (margin {MEMORY_MARGIN_MIB} MiB) |\n",
            self.memory_mib.0, self.memory_mib.1
        ));
        s.push_str(&format!(
            "| containerd's open files, start / end | {} / {} |\n",
            self.containerd_fds.0, self.containerd_fds.1
        ));
        s.push_str(&format!(
            "| open files of a surviving pod's shim, start / end | {} / {} |\n",
            self.survivor_fds.0, self.survivor_fds.1
        ));
        s.push_str("\n| fault | lifecycles | failed as expected | unexpected failures | leaks |\n|---|---|---|---|---|\n");
        for f in Fault::ALL {
            let of: Vec<&Outcome> = self.outcomes.iter().filter(|o| o.plan.fault == f).collect();
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                f.name(),
                of.len(),
                of.iter().filter(|o| !o.failures.is_empty()).count(),
                of.iter().map(|o| o.unexpected.len()).sum::<usize>(),
                of.iter().map(|o| o.leaks.len()).sum::<usize>()
            ));
        }
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for o in &self.outcomes {
            for (k, _) in o.failures.iter() {
                *kinds.entry(format!("{k} (after a fault)")).or_default() += 1;
            }
            for (k, _) in o.unexpected.iter() {
                *kinds.entry(format!("{k} (unexpected)")).or_default() += 1;
            }
            for (k, _) in o.leaks.iter() {
                *kinds.entry(format!("leak: {k}")).or_default() += 1;
            }
        }
        for (k, _) in &self.final_leaks {
            *kinds.entry(format!("leak at the end: {k}")).or_default() += 1;
        }
        if !kinds.is_empty() {
            s.push_str("\n| failure or leak, by kind | count |\n|---|---|\n");
            for (k, n) in kinds {
                s.push_str(&format!("| {k} | {n} |\n"));
            }
        }
        s
    }
}

/// The kata-rs configuration of the soak's containerd: the test defaults
/// plus the debug console (the guest-power-off fault's way in).
pub fn write_config(path: &Path) -> PathBuf {
    crate::shim::write_config(path, "", "debug_console_enabled = true")
}

/// Runs the soak on `c` (which runs kata-rs with [`write_config`]'s
/// configuration) with the busybox `image`.
pub fn run(c: &Containerd, image: &str, options: &Options) -> Report {
    let t0 = Instant::now();
    let bind_dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(bind_dir.path().join("hello"), "bind-ok\n").unwrap();
    // a pod that lives through the whole soak: its shim's files must not grow
    let survivor = "soak-survivor";
    let out = ctr(c, &run_args(image, survivor, None, &[]), None);
    assert!(
        out.as_ref().is_ok_and(|o| o.status.success()),
        "the surviving pod starts: {out:?}"
    );
    let survivor_shim = shim_pid(survivor).expect("the surviving pod's shim");
    let memory_start = mem_available_mib();
    let containerd_fds_start = fd_count(c.pid());
    let survivor_fds_start = fd_count(survivor_shim);

    // containerd answers all along
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new((0usize, Duration::ZERO, 0usize)));
    let watchdog = {
        let stop = stop.clone();
        let answers = answers.clone();
        let cmd = move || {
            let mut cmd = c.ctr_command(c.namespace());
            cmd.arg("version");
            cmd
        };
        // the closure borrows c: run it in this scope's threads below
        move || {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = run_bounded(cmd(), None, CTR_HUNG).is_ok_and(|o| o.status.success());
                let took = t.elapsed();
                let mut a = answers.lock().unwrap();
                a.0 += 1;
                a.1 = a.1.max(took);
                if took > ANSWER_WITHIN || !ok {
                    a.2 += 1;
                }
                drop(a);
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };

    let mut rng = Rng::new(options.seed);
    let plans: Vec<Plan> = (0..options.lifecycles)
        .map(|i| Plan::random(i, &mut rng))
        .collect();
    let next = AtomicUsize::new(0);
    let outcomes = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        s.spawn(watchdog);
        let workers: Vec<_> = (0..options.parallel)
            .map(|_| {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(plan) = plans.get(i) else { break };
                    let o = lifecycle(c, image, bind_dir.path(), plan.clone());
                    eprintln!(
                        "soak: {} fault={} start={:?} failures={:?} unexpected={:?} leaks={:?} hung={:?}",
                        o.plan.id,
                        o.plan.fault.name(),
                        o.start_s.map(|t| format!("{t:.2}s")),
                        o.failures,
                        o.unexpected,
                        o.leaks,
                        o.hung
                    );
                    outcomes.lock().unwrap().push(o);
                })
            })
            .collect();
        for w in workers {
            w.join().expect("soak worker");
        }
        stop.store(true, Ordering::Relaxed);
    });

    let survivor_fds_end = fd_count(survivor_shim);
    let mut final_leaks = Vec::new();
    if survivor_fds_end > survivor_fds_start + FD_MARGIN {
        final_leaks.push((
            "files of a surviving shim".into(),
            format!("{survivor_fds_start} → {survivor_fds_end}"),
        ));
    }
    let _ = ctr(c, &["task", "kill", "-s", "SIGKILL", survivor], None);
    wait_ended(c, survivor, Duration::from_secs(30));
    let _ = ctr(c, &["task", "delete", survivor], None);
    let _ = ctr(c, &["container", "delete", survivor], None);
    final_leaks.extend(wait_gone(survivor));
    // what containerd still knows of
    for what in ["task", "container"] {
        if let Ok(o) = ctr(c, &[what, "ls", "-q"], None) {
            for id in String::from_utf8_lossy(&o.stdout).lines() {
                if id.starts_with("soak-") {
                    final_leaks.push((format!("containerd {what}"), id.to_string()));
                }
            }
        }
    }
    for (kind, what) in run_dir_leftovers() {
        final_leaks.push((kind, what));
    }
    // give the kernel a moment to free the VMs' memory
    let mut memory_end = mem_available_mib();
    for _ in 0..20 {
        if memory_end >= memory_start - MEMORY_MARGIN_MIB {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        memory_end = mem_available_mib();
    }
    if memory_end < memory_start - MEMORY_MARGIN_MIB {
        final_leaks.push((
            "host memory".into(),
            format!("MemAvailable {memory_start} MiB → {memory_end} MiB"),
        ));
    }
    let containerd_fds_end = fd_count(c.pid());
    if containerd_fds_end > containerd_fds_start + FD_MARGIN {
        final_leaks.push((
            "containerd's files".into(),
            format!("{containerd_fds_start} → {containerd_fds_end}"),
        ));
    }
    let mut outcomes = outcomes.into_inner().unwrap();
    outcomes.sort_by_key(|o| o.plan.id[5..].parse::<usize>().unwrap_or(0));
    let answers = *answers.lock().unwrap();
    Report {
        options: options.clone(),
        outcomes,
        final_leaks,
        answers,
        memory_mib: (memory_start, memory_end),
        containerd_fds: (containerd_fds_start, containerd_fds_end),
        survivor_fds: (survivor_fds_start, survivor_fds_end),
        elapsed: t0.elapsed(),
    }
}

/// `ctr run -d` arguments of a soak container.
fn run_args<'a>(
    image: &'a str,
    id: &'a str,
    bind: Option<&'a str>,
    extra: &'a [&'a str],
) -> Vec<&'a str> {
    let mut a = vec!["run", "-d", "--runtime", RUNTIME];
    if let Some(b) = bind {
        a.extend(["--mount", b]);
    }
    a.extend_from_slice(extra);
    a.extend([image, id]);
    a.extend([
        "sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 1; done",
    ]);
    a
}

/// A ctr call bounded by [`CTR_HUNG`]: `Err` if it hung (then killed).
fn ctr(c: &Containerd, args: &[&str], input: Option<&[u8]>) -> Result<Output, String> {
    let mut cmd = c.ctr_command(c.namespace());
    cmd.args(args);
    run_bounded(cmd, input, CTR_HUNG)
}

/// An exec of a lifecycle: wanted, exec id and command, stdin, kind,
/// expected stdout.
type Step<'a> = (bool, &'a [&'a str], Option<&'a [u8]>, &'a str, &'a str);

/// One lifecycle.
fn lifecycle(c: &Containerd, image: &str, bind_dir: &Path, plan: Plan) -> Outcome {
    let mut o = Outcome {
        plan: plan.clone(),
        start_s: None,
        failures: Vec::new(),
        unexpected: Vec::new(),
        leaks: Vec::new(),
        hung: Vec::new(),
    };
    let id = plan.id.as_str();
    let faulted = plan.fault != Fault::None;
    let fail = |o: &mut Outcome, kind: &str, detail: String| {
        if faulted {
            o.failures.push((kind.to_string(), detail));
        } else {
            o.unexpected.push((kind.to_string(), detail));
        }
    };
    let call = |o: &mut Outcome, args: &[&str], input: Option<&[u8]>| -> Option<Output> {
        match ctr(c, args, input) {
            Ok(out) => Some(out),
            Err(e) => {
                o.hung.push(format!("ctr {}: {e}", args.join(" ")));
                None
            }
        }
    };
    let t0 = Instant::now();
    let bind = format!(
        "type=bind,src={},dst=/soak,options=rbind:ro",
        bind_dir.display()
    );
    let oom_flags = ["--memory-limit", "67108864"];
    let extra: &[&str] = if plan.fault == Fault::Oom {
        &oom_flags
    } else {
        &[]
    };
    let args = run_args(image, id, plan.bind.then_some(bind.as_str()), extra);

    std::thread::scope(|s| {
        // the fault, at its moment, from its own thread
        let injector = s.spawn(|| inject(c, &plan, t0));
        match call(&mut o, &args, None) {
            Some(out) if out.status.success() => o.start_s = Some(t0.elapsed().as_secs_f64()),
            Some(out) => fail(&mut o, "ctr run", stderr(&out)),
            None => {}
        }
        if o.start_s.is_some() {
            // (wanted, exec id and command, stdin, kind, expected stdout)
            let steps: [Step; 3] = [
                (
                    plan.exec,
                    &["e1", "echo", "exec-ok"],
                    None,
                    "exec",
                    "exec-ok",
                ),
                (
                    plan.stdin,
                    &["e2", "cat"],
                    Some(b"stdin-ok\n"),
                    "exec with stdin",
                    "stdin-ok",
                ),
                (
                    plan.bind,
                    &["e3", "cat", "/soak/hello"],
                    None,
                    "bind mount",
                    "bind-ok",
                ),
            ];
            for (wanted, exec, input, kind, want) in steps {
                if wanted {
                    let mut args = vec!["task", "exec", "--exec-id", exec[0], id];
                    args.extend_from_slice(&exec[1..]);
                    let r = call(&mut o, &args, input);
                    check_output(&mut o, r, kind, want, &fail);
                }
            }
            if plan.fault == Fault::Oom {
                let r = call(
                    &mut o,
                    &[
                        "task",
                        "exec",
                        "--exec-id",
                        "oom",
                        id,
                        "sh",
                        "-c",
                        "x=0123456789abcdef; while true; do x=$x$x; done",
                    ],
                    None,
                );
                // the hog is killed: the exec fails, nothing else
                if let Some(out) = r {
                    if out.status.success() {
                        o.unexpected
                            .push(("OOM".into(), "the memory hog exited 0".into()));
                    } else {
                        o.failures.push(("OOM kill".into(), stderr(&out)));
                    }
                }
            }
        }
        injector.join().expect("fault injector");
    });

    // stop and delete as a user would: SIGTERM, wait, delete
    let _ = call(&mut o, &["task", "kill", id], None);
    if !wait_ended(c, id, Duration::from_secs(30)) {
        let _ = call(&mut o, &["task", "kill", "-s", "SIGKILL", id], None);
        if !wait_ended(c, id, Duration::from_secs(30)) {
            o.unexpected
                .push(("stop".into(), "the task still runs after SIGKILL".into()));
        }
    }
    if task_exists(c, id) {
        if let Some(out) = call(&mut o, &["task", "delete", id], None) {
            if !out.status.success() {
                fail(&mut o, "task delete", stderr(&out));
                // what a user does next
                let _ = call(&mut o, &["task", "delete", "--force", id], None);
            }
        }
    }
    if let Some(out) = call(&mut o, &["container", "delete", id], None) {
        if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("not found") {
            o.unexpected.push(("container delete".into(), stderr(&out)));
        }
    }
    o.leaks = wait_gone(id);
    o
}

fn stderr(out: &Output) -> String {
    let e = String::from_utf8_lossy(&out.stderr);
    let e = e.trim();
    e.lines().last().unwrap_or("").chars().take(300).collect()
}

fn check_output(
    o: &mut Outcome,
    r: Option<Output>,
    kind: &str,
    want: &str,
    fail: &dyn Fn(&mut Outcome, &str, String),
) {
    if let Some(out) = r {
        let got = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || got.trim() != want {
            fail(
                o,
                kind,
                format!("{} stdout {:?}: {}", out.status, got.trim(), stderr(&out)),
            );
        }
    }
}

/// Fires `plan`'s fault at its moment. The guest power-off and the kills
/// wait for their target (at most until the pod could have started); a
/// target that never came is no error (the start failed before it).
fn inject(c: &Containerd, plan: &Plan, t0: Instant) {
    let at = t0 + Duration::from_millis(plan.fault_after_ms);
    let id = plan.id.as_str();
    match plan.fault {
        Fault::None | Fault::Oom => {}
        Fault::DeleteRacesStart => {
            // the task's kill and delete race its creation; the container
            // record is deleted by the lifecycle's end, after the task is
            // gone (a `ctr container delete` during the task's creation
            // orphans the task inside containerd, whatever the runtime:
            // docs/reliability.md)
            std::thread::sleep(at.saturating_duration_since(Instant::now()) / 2);
            let _ = ctr(c, &["task", "kill", "-s", "SIGKILL", id], None);
            let _ = ctr(c, &["task", "delete", "--force", id], None);
        }
        Fault::GuestPowersOff => {
            let up = || (shim_pid(id).is_some() && task_running(c, id)).then_some(());
            if wait_for_target(c, id, t0, at, up).is_some() {
                // the console's connection ends with the guest: no answer
                let _ = std::panic::catch_unwind(|| crate::shim::guest_shell(id, "poweroff -f"));
            }
        }
        f => {
            let victim = || match f.victim() {
                Some(name) => pod_process(id, name),
                None => kata_vmm_launcher::client::hypervisor_pid(
                    &kata_proto::paths::SandboxPaths::new(id),
                )
                .filter(|p| crate::alive(*p)),
            };
            if let Some(pid) = wait_for_target(c, id, t0, at, victim) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// From `at`, polls `target` until it gives something (at most 60 s);
/// `None` once the task is gone and the pod could have started (30 s).
fn wait_for_target<T>(
    c: &Containerd,
    id: &str,
    t0: Instant,
    at: Instant,
    mut target: impl FnMut() -> Option<T>,
) -> Option<T> {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(t) = target() {
            return Some(t);
        }
        if !task_exists(c, id) && Instant::now() > t0 + Duration::from_secs(30) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The task's line in `ctr task ls`, if containerd has the task.
fn task_line(c: &Containerd, id: &str) -> Option<String> {
    let o = ctr(c, &["task", "ls"], None).ok()?;
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .map(str::to_string)
}

fn task_exists(c: &Containerd, id: &str) -> bool {
    task_line(c, id).is_some()
}

fn task_running(c: &Containerd, id: &str) -> bool {
    task_line(c, id).is_some_and(|l| l.contains("RUNNING"))
}

/// Waits until task `id` is stopped or gone; false if it still runs.
fn wait_ended(c: &Containerd, id: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match task_line(c, id) {
            None => return true,
            Some(l) if l.contains("STOPPED") => return true,
            Some(_) if Instant::now() > deadline => return false,
            Some(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The shim of pod `id`.
fn shim_pid(id: &str) -> Option<u32> {
    pod_process(id, "containerd-shim-kata-v2")
}

/// What pod `id` left: [`crate::shim::pod_leftovers`] and any mount that
/// names it.
fn leftovers(id: &str) -> Vec<(String, String)> {
    let mut left = crate::shim::pod_leftovers(id);
    for m in mounts_naming(id) {
        left.push(("mount".to_string(), m));
    }
    left.sort();
    left.dedup();
    left
}

/// Mount points anywhere that name `id` as a path component (containerd's
/// rootfs and bundle mounts of the pod).
fn mounts_naming(id: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.split('/').any(|c| c == id))
        .map(str::to_string)
        .collect()
}

fn wait_gone(id: &str) -> Vec<(String, String)> {
    let deadline = Instant::now() + GONE_WITHIN;
    loop {
        let left = leftovers(id);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Entries under /run/kata of soak pods that are no longer known.
fn run_dir_leftovers() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(kata_proto::paths::run_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("soak-") {
            v.push(("/run/kata entry".into(), e.path().display().to_string()));
        }
    }
    v
}

fn mem_available_mib() -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok())
        .map_or(0, |kib| kib / 1024)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// What earlier soaks found, kept on the page.
const FOUND: &str = "## Found by the soak

- **An exec's stdin could lose its last bytes**: 3 of 100 execs fed on stdin
  got nothing. ctr sends CloseIO from inside its stdin copy, before it closes
  its FIFO, and the shim stopped its copy there. Now CloseIO makes the copy
  deliver what the FIFO holds, then end the process's stdin. Regression test:
  shim_e2e `exec_stdin_arrives_whole_when_closed_right_after_the_last_write`
  (1 MiB through `wc -c`, five times; before the fix it lost 64 KiB).
- **An exec's stdin could be lost whole under load** (found by the short
  soak later: 1 exec in 20 fed on stdin got none; 3 in 240 with four
  loops of execs at once). When CloseIO came before the shim's stdin copy
  had run once after opening the FIFO, tokio did not know yet that the FIFO
  was readable, and the drain's `try_read` answered \"would block\" without
  reading. The drain now reads the FIFO with read(2) itself: 0 in 800 after
  the fix. Regression test: shim unit test
  `stdin_written_before_close_io_arrives_even_if_the_copy_starts_after_it`
  (it fails with the old drain).
- **A short process's output could be lost**: about 1 exec in 100 printed
  nothing. The shim opened the output FIFO read-write, so writing never
  waited for a reader. containerd opens its reading end from a goroutine;
  when that came late, the whole output was written and the FIFO closed
  before anyone had opened it. Now the shim opens the FIFO write-only once
  the reader is there, waiting at most 5 s (meanwhile the process's output
  waits in the guest). Regression tests: shim unit tests
  `output_waits_for_a_late_reader` and `an_output_nobody_reads_is_dropped_in_time`.
- **Not kata-rs's, and decided**: `ctr container delete` while `ctr run` is
  still creating the task deletes the container record. containerd then
  holds a running task it can neither show through ctr nor delete, because
  its Delete needs the container. The shim and the VM stay until
  containerd stops. This is containerd's, whatever the runtime: the window
  is the shim's Create, about 100 ms with runc and the VM's boot with
  kata-rs. The kubelet never does this. The soak's \"delete races start\"
  fault therefore kills and deletes the task while it is being created, and
  deletes the container after.
";

/// Writes `report` as the page docs/reliability.md: the machine, the
/// command, the tables, and the problems if there were any.
pub fn write_page(path: &Path, report: &Report) -> std::io::Result<()> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let problems = report.problems();
    let mut s = String::from("# Reliability: the soak\n\n");
    s.push_str(
        "`make soak` runs pod lifecycles through a private containerd, several at a \
         time: `ctr run -d` of a busybox container in its own pod, a random mix of an \
         exec, an exec fed on stdin and a read-only bind mount read back, then a stop \
         and delete as a user does them. Three lifecycles in four get a fault at a \
         random moment: SIGKILL of the shim, QEMU, kata-virtiofsd or kata-vmm-launcher, \
         the guest powering itself off (`poweroff -f` as root in the guest, through the \
         debug console), a container that runs out of memory, or a kill and delete \
         racing the start. After every lifecycle it checks that the pod left nothing: \
         processes, mounts (under /run/kata and any naming the pod), the /run/kata \
         entry with its sockets, host cgroups. At the end: containerd's tasks and \
         containers, containerd's open files, the open files of a pod that lived \
         through the whole run, and the host's MemAvailable. A watchdog calls \
         `ctr version` every half second all along. `make test` runs a short soak \
         (20 lifecycles) with the same checks. Pods here have no network: the \
         network's faults (netmon, taps, qdiscs) are covered by the network tests.\n\n",
    );
    s.push_str(&format!(
        "Run of {}: {cpu}, {cpus} CPUs, QEMU under TCG, the test guest with kata-rs's \
         kernel; `KATA_SOAK_SEED={} KATA_SOAK_LIFECYCLES={} KATA_SOAK_PARALLEL={} make soak` \
         repeats it.\n\n",
        chrono_date(),
        report.options.seed,
        report.options.lifecycles,
        report.options.parallel
    ));
    s.push_str(&report.table());
    s.push('\n');
    if problems.is_empty() {
        s.push_str("No leak, no hung call, no unexpected failure.\n\n");
        s.push_str(FOUND);
    } else {
        s.push_str("## Problems\n\n");
        for p in problems {
            s.push_str(&format!("- {p}\n"));
        }
        s.push('\n');
        s.push_str(FOUND);
    }
    std::fs::write(path, s)
}

/// Today's date (UTC), from `date`.
fn chrono_date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_repeatable_and_cover_every_fault() {
        let plans = |seed| {
            let mut r = Rng::new(seed);
            (0..200)
                .map(|i| Plan::random(i, &mut r))
                .map(|p| (p.fault, p.fault_after_ms, p.exec, p.stdin, p.bind))
                .collect::<Vec<_>>()
        };
        assert_eq!(plans(7), plans(7));
        assert_ne!(plans(7), plans(8));
        for f in Fault::ALL {
            assert!(plans(7).iter().any(|p| p.0 == f), "{f:?}");
        }
    }
}

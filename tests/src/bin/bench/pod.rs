//! Pods through containerd (`ctr run --runtime io.containerd.kata.v2`): start
//! time to the first output byte split into host and guest parts, per-pod host
//! memory against runc's shim, parallel starts and stdout throughput.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kata_tests::containerd::Containerd;
use kata_tests::shim::{
    kill_and_delete, pod_processes, run_detached, wait_task_status, write_config, RUNTIME,
};

use super::{machine_busy_secs, pct, pss_kib};

const RUNS: usize = 5;
const PARALLEL: usize = 10;

/// Starts `ctr run` and returns the time to its first stdout byte and to its
/// exit, and everything it printed.
pub(crate) fn timed_run(c: &Containerd, args: &[&str]) -> (f64, f64, Vec<u8>) {
    let mut all = Vec::new();
    let (first, _, total) = timed_output(c, args, |b| all.extend_from_slice(b));
    (first, total, all)
}

/// Starts `ctr` and returns the time to its first stdout byte and to its last
/// (the end of its stdout), and how many bytes it printed, keeping none: the
/// bulk stdout figures, so that the host's reader costs what the raw vsock
/// reader does (it counts too) and not the growing of a 256 MiB buffer.
fn timed_count(c: &Containerd, args: &[&str]) -> (f64, f64, usize) {
    let mut n = 0;
    let (first, last, _) = timed_output(c, args, |b| n += b.len());
    (first, last, n)
}

/// Runs `ctr args`, handing its stdout to `sink`; times (from the start) of
/// the first byte, of the end of stdout and of ctr's exit.
fn timed_output(c: &Containerd, args: &[&str], mut sink: impl FnMut(&[u8])) -> (f64, f64, f64) {
    let mut cmd = c.ctr_command(c.namespace());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("ctr run");
    let mut out = child.stdout.take().unwrap();
    let mut first = None;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = out.read(&mut buf).expect("read ctr stdout");
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        sink(&buf[..n]);
    }
    let last = t0.elapsed().as_secs_f64();
    let st = child.wait().expect("wait ctr");
    let total = t0.elapsed().as_secs_f64();
    if !st.success() {
        let mut e = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut e);
        panic!("ctr {} failed: {st} {e}", args.join(" "));
    }
    (first.unwrap_or(last), last, total)
}

/// The shim's own figures for pod `id` from containerd's log ("pod is up").
pub(crate) fn shim_timings(c: &Containerd, id: &str) -> Option<[f64; 5]> {
    let log = std::fs::read_to_string(c.log_path()).ok()?;
    let line = log
        .lines()
        .find(|l| l.contains(&format!("sandbox={id} ")) && l.contains("pod is up"))?;
    let field = |k: &str| -> Option<f64> {
        let v = line.split(&format!("{k}=")).nth(1)?;
        v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    Some([
        field("host_ms")?,
        field("helpers_ms")?,
        field("qemu_ms")?,
        field("boot_ms")?,
        field("sandbox_ms")?,
    ])
}

fn pss_of(pids: &[u32]) -> u64 {
    pids.iter().map(|p| pss_kib(*p)).sum()
}

/// The section of the report.
pub fn pod_section() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(&tmp.path().join("configuration.toml"), "", "");
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();

    // one pod at a time
    let mut first = vec![];
    let mut host = vec![];
    let mut helpers = vec![];
    let mut qemu = vec![];
    let mut boot = vec![];
    let mut sandbox = vec![];
    let mut cpu = vec![];
    for i in 0..RUNS {
        let id = format!("bench-start-{i}");
        let busy = machine_busy_secs();
        let (f, _, out) = timed_run(
            &c,
            &[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                &image,
                &id,
                "echo",
                "hi",
            ],
        );
        assert_eq!(out, b"hi\n");
        cpu.push(machine_busy_secs() - busy);
        first.push(f);
        if let Some([h, hp, q, b, s]) = shim_timings(&c, &id) {
            host.push(h / 1e3);
            helpers.push(hp / 1e3);
            qemu.push(q / 1e3);
            boot.push(b / 1e3);
            sandbox.push(s / 1e3);
        }
    }
    let mut runc = vec![];
    for i in 0..RUNS {
        let id = format!("bench-runc-{i}");
        let (f, _, _) = timed_run(&c, &["run", "--rm", &image, &id, "echo", "hi"]);
        runc.push(f);
    }
    for v in [
        &mut first,
        &mut host,
        &mut helpers,
        &mut qemu,
        &mut boot,
        &mut sandbox,
        &mut runc,
        &mut cpu,
    ] {
        v.sort_by(f64::total_cmp);
    }
    let med = |v: &[f64]| if v.is_empty() { f64::NAN } else { pct(v, 0.5) };
    let rest = med(&first) - med(&host) - med(&boot) - med(&sandbox);

    // memory of one idle pod: every host process of ours, QEMU excluded
    run_detached(&c, &image, "bench-mem", &["sleep", "1000"]);
    std::thread::sleep(Duration::from_secs(2));
    let procs = pod_processes("bench-mem");
    let mut by_name: Vec<(String, u64)> = Vec::new();
    for (pid, cmd) in &procs {
        let exe = cmd.split(' ').next().unwrap_or("");
        let name = exe.rsplit('/').next().unwrap_or(exe).to_string();
        if name.starts_with("qemu-system") {
            continue;
        }
        let kib = pss_of(&[*pid]);
        match by_name.iter_mut().find(|(n, _)| *n == name) {
            Some((_, k)) => *k += kib,
            None => by_name.push((name, kib)),
        }
    }
    let ours: u64 = by_name.iter().map(|(_, k)| k).sum();
    let qemu_pid = procs
        .iter()
        .find(|(_, cmd)| cmd.contains("qemu-system"))
        .map(|(p, _)| *p)
        .unwrap_or(0);
    let qemu_kib = pss_kib(qemu_pid);
    kill_and_delete(&c, "bench-mem");

    // runc's shim for the same container
    c.ctr_ok(&["run", "-d", &image, "bench-runc-mem", "sleep", "1000"]);
    wait_task_status(&c, "bench-runc-mem", "RUNNING", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let runc_shim = runc_shim_pid("bench-runc-mem");
    let runc_kib = runc_shim.map(pss_kib).unwrap_or(0);
    kill_and_delete(&c, "bench-runc-mem");

    // stdout through the shim: 256 MiB
    let mut args = vec!["run", "--rm", "--runtime", RUNTIME, &image, "bench-dd"];
    args.extend(DD_256_MIB);
    let (first_byte, last_byte, n) = timed_count(&c, &args);
    assert_eq!(n, 256 << 20, "every byte of stdout arrived");
    let dd_mib_s = 256.0 / (last_byte - first_byte);
    let [shim_mib_s, guest_mib_s, raw_mib_s, pipe_mib_s, same_mib_s] =
        stdout_against_raw_vsock(&c, &image);

    // PARALLEL pods at once: with the default boot slots, then with no limit
    let slotted = at_once(&c, &image, None);
    let unlimited_cfg = write_config(
        &tmp.path().join("unlimited.toml"),
        "max_concurrent_boots = 0",
        "",
    );
    let unlimited = at_once(&c, &image, Some(&unlimited_cfg));

    println!("\n## Pods through containerd (kata-bench)\n");
    println!(
        "containerd 1.6 + ctr, `ctr run --rm --runtime {RUNTIME}` of the busybox image, test guest (TCG, 1 vCPU, 256 MiB). Times are medians of {RUNS}.\n"
    );
    println!("| figure | value |\n|---|---|");
    println!(
        "| `ctr run` to the first output byte | median {:.2} s (min {:.2}, max {:.2}) |",
        med(&first),
        first[0],
        first[first.len() - 1]
    );
    println!(
        "| … host side on the critical path: sandbox dir, kata-virtiofsd and launcher up, CreateVm | {:.0} ms |",
        med(&host) * 1e3
    );
    println!(
        "| … … of which kata-virtiofsd and the launcher up (side by side) | {:.0} ms |",
        med(&helpers) * 1e3
    );
    println!(
        "| … … of which QEMU's own start (spawn until QMP answered) | {:.0} ms |",
        med(&qemu) * 1e3
    );
    println!(
        "| … … kata-rs's own host-side work (host side minus QEMU's start) | {:.0} ms |",
        (med(&host) - med(&qemu)) * 1e3
    );
    println!(
        "| … guest boot: StartVm until the agent announced itself | {:.2} s |",
        med(&boot)
    );
    println!(
        "| … agent connection and CreateSandbox (guest mounts the share) | {:.0} ms |",
        med(&sandbox) * 1e3
    );
    println!(
        "| … the rest: ctr, containerd, shim start, CreateContainer/Start in the guest, output | {:.0} ms |",
        rest * 1e3
    );
    println!(
        "| runc (`io.containerd.runc.v2`), same command, for scale | median {:.3} s |",
        med(&runc)
    );
    for (name, kib) in &by_name {
        println!(
            "| PSS of {name} (one idle pod) | {:.1} MiB |",
            *kib as f64 / 1024.0
        );
    }
    println!(
        "| PSS of all kata-rs host processes of one pod (QEMU excluded) | {:.1} MiB |",
        ours as f64 / 1024.0
    );
    println!(
        "| PSS of QEMU (for scale, not ours) | {:.1} MiB |",
        qemu_kib as f64 / 1024.0
    );
    println!(
        "| PSS of containerd-shim-runc-v2 for a runc container (lower bound users know) | {:.1} MiB |",
        runc_kib as f64 / 1024.0
    );
    println!(
        "| stdout through the shim (`dd` 256 MiB to ctr, first byte to last) | {dd_mib_s:.1} MiB/s |"
    );
    println!(
        "| stdout through the shim, `dd` 256 MiB exec'd in one pod, median of {STREAM_RUNS} | {:.1} MiB/s |",
        med(&shim_mib_s)
    );
    println!(
        "| the same `dd` piped into the agent's output copy, to a host vsock port (no shim, no FIFO), median of {STREAM_RUNS} | {:.1} MiB/s |",
        med(&guest_mib_s)
    );
    println!(
        "| raw vsock in the same pod: 256 MiB of zeros from a container process to a host port, median of {STREAM_RUNS} | {:.1} MiB/s |",
        med(&raw_mib_s)
    );
    println!(
        "| the same `dd` into a pipe read by a second `dd` in the guest (the guest pipe alone, nothing leaves the VM), median of {STREAM_RUNS} | {:.1} MiB/s |",
        med(&pipe_mib_s)
    );
    println!(
        "| stdout through the shim / the same without the shim / raw vsock / the guest pipe alone | {:.2}x / {:.2}x / {:.2}x |",
        med(&shim_mib_s) / med(&guest_mib_s),
        med(&shim_mib_s) / med(&raw_mib_s),
        med(&shim_mib_s) / med(&pipe_mib_s)
    );
    println!(
        "| the raw vsock writer's 256 MiB to its stdout through the shim (`kata-test-guest write`), median of {STREAM_RUNS} | {:.1} MiB/s |",
        med(&same_mib_s)
    );
    println!(
        "| stdout through the shim / raw vsock, the same writer | {:.2}x |",
        med(&same_mib_s) / med(&raw_mib_s)
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu_floor = PARALLEL as f64 * med(&cpu) / cores as f64;
    println!(
        "| CPU time of one `ctr run` of a pod, start to exit (the whole machine, /proc/stat) | {:.2} CPU-s |",
        med(&cpu)
    );
    println!(
        "| CPU floor of {PARALLEL} pods at once: {PARALLEL} × that / {cores} cores | {cpu_floor:.2} s |"
    );
    let slots = kata_proto::boot_slots::count(-1, true);
    for (how, r) in [
        (
            format!("default `max_concurrent_boots` ({slots} at once)"),
            &slotted,
        ),
        (
            "`max_concurrent_boots = 0` (no limit)".to_string(),
            &unlimited,
        ),
    ] {
        println!(
            "| {PARALLEL} pods at once, boots: {how} | {}/{PARALLEL} succeeded; to exit: p50 {:.2} s, max {:.2} s; p50 / CPU floor {:.2}x, max / CPU floor {:.2}x |",
            r.ok,
            pct(&r.times, 0.5),
            r.times[r.times.len() - 1],
            pct(&r.times, 0.5) / cpu_floor,
            r.times[r.times.len() - 1] / cpu_floor,
        );
        println!(
            "| … CPU time of the whole machine / {PARALLEL} × one pod's | {:.1} / {:.1} CPU-s; the machine busy {:.0} % of the wall time ({:.2} s) |",
            r.cpu,
            PARALLEL as f64 * med(&cpu),
            100.0 * r.cpu / (r.wall * cores as f64),
            r.wall
        );
    }
    println!(
        "| one pod alone, to exit (for scale) | {:.2} s |",
        med(&first)
    );
}

/// [`PARALLEL`] pods started at once.
struct AtOnce {
    /// How many printed their output and exited 0.
    ok: usize,
    /// Each `ctr run`'s time to exit, sorted.
    times: Vec<f64>,
    /// Until the last exited.
    wall: f64,
    /// The whole machine's CPU time meanwhile.
    cpu: f64,
}

/// Starts [`PARALLEL`] `ctr run --rm ... echo hi` at once (with the shim
/// configuration `config`, else containerd's) and waits for all.
fn at_once(c: &Containerd, image: &str, config: Option<&Path>) -> AtOnce {
    let busy0 = machine_busy_secs();
    let t0 = Instant::now();
    let tag = if config.is_some() { "own" } else { "dflt" };
    let handles: Vec<_> = (0..PARALLEL)
        .map(|i| {
            let addr = c.address().to_path_buf();
            let ns = c.namespace().to_string();
            let image = image.to_string();
            let config = config.map(Path::to_path_buf);
            std::thread::spawn(move || {
                let t = Instant::now();
                let mut cmd = Command::new("ctr");
                cmd.arg("-a")
                    .arg(&addr)
                    .args(["-n", &ns, "run", "--rm", "--runtime", RUNTIME]);
                if let Some(cfg) = &config {
                    cmd.arg("--runtime-config-path").arg(cfg);
                }
                let out = cmd
                    .arg(&image)
                    .arg(format!("bench-par-{tag}-{i}"))
                    .args(["echo", "hi"])
                    .stdin(Stdio::null())
                    .output()
                    .expect("ctr run");
                (
                    out.status.success() && out.stdout == b"hi\n",
                    t.elapsed().as_secs_f64(),
                )
            })
        })
        .collect();
    let results: Vec<(bool, f64)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let wall = t0.elapsed().as_secs_f64();
    let cpu = machine_busy_secs() - busy0;
    let mut times: Vec<f64> = results.iter().map(|(_, t)| *t).collect();
    times.sort_by(f64::total_cmp);
    AtOnce {
        ok: results.iter().filter(|(ok, _)| *ok).count(),
        times,
        wall,
        cpu,
    }
}

/// 256 MiB of zeros to stdout.
const DD_256_MIB: [&str; 4] = ["dd", "if=/dev/zero", "bs=1M", "count=256"];

/// How many times each stream is measured against the other.
const STREAM_RUNS: usize = 3;

/// In one pod, alternated, 256 MiB each way: `dd` stdout through the shim to
/// ctr; the same `dd` piped into the agent's own output copy (the test guest
/// binary, bound in, runs it) to a host vsock port: the guest side of the
/// stdout path without the shim and containerd's FIFO; and a container
/// process writing zeros straight to a host vsock port: the bare vsock path
/// of the same VM; and the same `dd` into a second `dd` through a pipe in
/// the guest, timed by the guest's clock: what a pipe alone allows, before
/// any copy to the host; and the raw vsock writer itself (`kata-test-guest
/// write`) to stdout through the shim: stdout against raw vsock with the
/// same writer, the one difference the destination of its writes (`dd`
/// also fills its buffer from /dev/zero, one more pass over every byte).
/// MiB/s each, sorted.
fn stdout_against_raw_vsock(c: &Containerd, image: &str) -> [Vec<f64>; 5] {
    const PORT: u32 = 5100;
    let id = "bench-stream";
    let bind = format!(
        "type=bind,src={},dst=/kata-test-guest,options=rbind:ro",
        kata_tests::bin("kata-test-guest").display()
    );
    kata_tests::shim::run_detached_with(c, &["--mount", &bind], image, id, &["sleep", "1000"]);
    let uds = kata_proto::paths::SandboxPaths::new(id).vsock_uds();
    let listen_at = kata_proto::paths::hybrid_listener_path(&uds, PORT);
    let _ = std::fs::remove_file(&listen_at);
    let l = std::os::unix::net::UnixListener::bind(&listen_at).expect("bind the raw vsock port");
    // runs `args` in the pod; MiB/s of what arrives on PORT, first byte to last
    let to_port = |exec: &str, args: &[&str]| {
        let mut sender = c.ctr_command(c.namespace());
        sender
            .args(["task", "exec", "--exec-id", exec, id])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut sender = sender.spawn().expect("ctr task exec");
        let (mut s, _) = l.accept().expect("the guest's connection to the raw port");
        let mut buf = vec![0u8; 1 << 20];
        let (mut got, mut t0) = (0usize, None);
        loop {
            let n = s.read(&mut buf).expect("read the raw port");
            if n == 0 {
                break;
            }
            t0.get_or_insert_with(Instant::now);
            got += n;
        }
        let secs = t0.map_or(f64::NAN, |t| t.elapsed().as_secs_f64());
        assert!(
            sender.wait().expect("wait ctr").success(),
            "{args:?} failed"
        );
        assert_eq!(got, 256 << 20, "every byte of {args:?} arrived");
        256.0 / secs
    };
    let port = PORT.to_string();
    let piped = format!(
        "{} 2>/dev/null | /kata-test-guest send {PORT} -",
        DD_256_MIB.join(" ")
    );
    // the guest's clock around `dd | dd`: the pipe alone, nothing leaves the VM
    let in_guest = format!(
        "a=$(cut -d' ' -f1 /proc/uptime); {} 2>/dev/null | dd of=/dev/null bs=1M 2>/dev/null; \
         echo $a $(cut -d' ' -f1 /proc/uptime)",
        DD_256_MIB.join(" ")
    );
    let (mut shim, mut guest, mut raw, mut pipe, mut same) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..STREAM_RUNS {
        let exec = format!("dd-{i}");
        let mut args = vec!["task", "exec", "--exec-id", &exec, id];
        args.extend(DD_256_MIB);
        let (first, last, n) = timed_count(c, &args);
        assert_eq!(n, 256 << 20, "every byte of stdout arrived");
        shim.push(256.0 / (last - first));
        guest.push(to_port(&format!("piped-{i}"), &["sh", "-c", &piped]));
        raw.push(to_port(
            &format!("raw-{i}"),
            &["/kata-test-guest", "send", &port, "256"],
        ));
        let exec = format!("pipe-{i}");
        let out = c.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            &exec,
            id,
            "sh",
            "-c",
            &in_guest,
        ]);
        let t: Vec<f64> = out
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        assert_eq!(t.len(), 2, "two uptimes from the guest: {out:?}");
        pipe.push(256.0 / (t[1] - t[0]).max(0.01));
        let exec = format!("write-{i}");
        let (first, last, n) = timed_count(
            c,
            &[
                "task",
                "exec",
                "--exec-id",
                &exec,
                id,
                "/kata-test-guest",
                "write",
                "256",
            ],
        );
        assert_eq!(n, 256 << 20, "every byte of the writer's stdout arrived");
        same.push(256.0 / (last - first));
    }
    drop(l);
    let _ = std::fs::remove_file(&listen_at);
    kill_and_delete(c, id);
    for v in [&mut shim, &mut guest, &mut raw, &mut pipe, &mut same] {
        v.sort_by(f64::total_cmp);
    }
    [shim, guest, raw, pipe, same]
}

fn runc_shim_pid(id: &str) -> Option<u32> {
    let needle = format!("-id\0{id}\0");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.contains("containerd-shim-runc-v2") && cmd.contains(&needle)).then_some(pid)
    })
}

//! The cost of tracing: `ctr run` to the first byte with tracing off and on
//! (and the shim's host-side part of it), the cost of one span where it is
//! made, kata-trace-forwarder's memory, and the spans per second it sends.

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kata_proto::trace::wire::{self, frame::Body, Frame};
use kata_tests::containerd::Containerd;
use kata_tests::otlp::Receiver;
use kata_tests::shim::{kill_and_delete, pod_processes, run_detached, write_config, RUNTIME};

use super::pct;
use super::pod::{shim_timings, timed_run};

const RUNS: usize = 5;
const SPANS: usize = 100_000;
const FORWARDED: usize = 65_536;

/// First byte (s) and kata-rs's host-side work (s) of `RUNS` runs.
fn runs(c: &Containerd, image: &str, prefix: &str) -> (Vec<f64>, Vec<f64>) {
    let mut first = vec![];
    let mut host = vec![];
    for i in 0..RUNS {
        let id = format!("{prefix}-{i}");
        let (f, _, out) = timed_run(
            c,
            &[
                "run",
                "--rm",
                "--runtime",
                RUNTIME,
                image,
                &id,
                "echo",
                "hi",
            ],
        );
        assert_eq!(out, b"hi\n");
        first.push(f);
        if let Some([h, _, q, _, _]) = shim_timings(c, &id) {
            host.push((h - q) / 1e3);
        }
    }
    first.sort_by(f64::total_cmp);
    host.sort_by(f64::total_cmp);
    (first, host)
}

/// ns per span (created, entered, closed) with the tracing layer installed
/// but tracing off, then on (to a drained span stream).
fn span_cost() -> (f64, f64) {
    use tracing_subscriber::layer::SubscriberExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("spans.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let _ = std::io::copy(&mut s, &mut std::io::sink());
        }
    });
    let sub = tracing_subscriber::registry().with(kata_proto::trace::layer("kata-bench"));
    let _g = tracing::subscriber::set_default(sub);
    let per = |n: usize| {
        let t = Instant::now();
        for _ in 0..n {
            let s = tracing::info_span!("rpc", otel.name = "ExecProcess");
            let _e = s.enter();
        }
        t.elapsed().as_nanos() as f64 / n as f64
    };
    let off = per(SPANS);
    kata_proto::trace::start(kata_proto::trace::Sink::Stream(
        kata_proto::dialer::Address::Unix(sock),
    ))
    .unwrap();
    // in bursts the queue holds, as a busy agent's would be
    let mut on = vec![];
    for _ in 0..SPANS / 1000 {
        on.push(per(1000));
        std::thread::sleep(Duration::from_millis(5));
    }
    kata_proto::trace::flush(Duration::from_secs(5));
    on.sort_by(f64::total_cmp);
    (off, pct(&on, 0.5))
}

/// Spans per second kata-trace-forwarder takes from one stream and sends to
/// an OTLP receiver, and how many arrived.
fn forwarder_rate() -> (f64, usize) {
    let rx = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vsock.sock_10240");
    let mut fwd = Command::new(kata_tests::bin("kata-trace-forwarder"))
        .arg("--socket-path")
        .arg(&sock)
        .arg("--otlp-endpoint")
        .arg(rx.endpoint())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(fwd.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // in bursts of what an agent's queue holds (2048 spans), each sent once
    // the previous one has reached the receiver
    const BURST: usize = 2048;
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(&wire::PREAMBLE).unwrap();
    let t = Instant::now();
    let mut arrived = 0;
    for b in 0..FORWARDED / BURST {
        let mut bytes = Vec::new();
        for i in b * BURST..(b + 1) * BURST {
            let span = wire::Span {
                trace_id: vec![1; 16],
                span_id: (i as u64 + 1).to_be_bytes().to_vec(),
                name: "ExecProcess".into(),
                start_unix_nano: 1,
                end_unix_nano: 2,
                service: "kata-agent".into(),
                ..Default::default()
            };
            wire::encode_frame(
                &Frame {
                    body: Some(Body::Span(span)),
                },
                &mut bytes,
            )
            .unwrap();
        }
        s.write_all(&bytes).unwrap();
        let want = (b + 1) * BURST;
        arrived = rx
            .wait_for(Duration::from_secs(10), |r| r.len() >= want)
            .len();
    }
    let secs = t.elapsed().as_secs_f64();
    drop(s);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fwd.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = fwd.wait();
    (arrived as f64 / secs, arrived)
}

/// The section of the report.
pub fn trace_section() {
    let tmp = tempfile::tempdir().unwrap();
    let off_cfg = write_config(&tmp.path().join("off.toml"), "", "");
    let c = Containerd::builder().kata_config(&off_cfg).start();
    let image = c.import_busybox();
    let (off_first, off_host) = runs(&c, &image, "bt-off");
    drop(c);

    let rx = Receiver::start();
    let on_cfg = write_config(
        &tmp.path().join("on.toml"),
        "",
        &format!(
            "enable_tracing = true\ntrace_forwarder = \"{}\"\n[runtime]\nenable_tracing = true\njaeger_endpoint = \"{}\"\n",
            kata_tests::bin("kata-trace-forwarder").display(),
            rx.endpoint()
        ),
    );
    let c = Containerd::builder().kata_config(&on_cfg).start();
    let image = c.import_busybox();
    let (on_first, on_host) = runs(&c, &image, "bt-on");
    run_detached(&c, &image, "bt-fwd", &["sleep", "600"]);
    for i in 0..20 {
        c.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            &format!("x{i}"),
            "bt-fwd",
            "true",
        ]);
    }
    let fwd = pod_processes("bt-fwd")
        .into_iter()
        .find(|(_, cmd)| cmd.contains("kata-trace-forwarder"))
        .map(|(pid, _)| pid)
        .expect("the pod's forwarder");
    let fwd_pss = super::pss_kib(fwd);
    kill_and_delete(&c, "bt-fwd");
    drop(c);
    let spans = rx.spans().len();
    drop(rx);

    let (span_off, span_on) = span_cost();
    let (rate, arrived) = forwarder_rate();

    let host = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            pct(v, 0.5) * 1e3
        }
    };
    println!("\n## Tracing (kata-bench)\n");
    println!("`ctr run --rm ... echo hi` through the private containerd, n={RUNS} each (TCG guests); tracing on: `[runtime]` and `[agent.kata] enable_tracing`, spans to an OTLP receiver on loopback.\n");
    println!("| figure | tracing off | tracing on |\n|---|---|---|");
    println!(
        "| `ctr run` to the first byte, p50 | {:.0} ms | {:.0} ms |",
        pct(&off_first, 0.5) * 1e3,
        pct(&on_first, 0.5) * 1e3
    );
    println!(
        "| of which kata-rs's host-side work (the shim's host part minus QEMU's start), p50 | {:.1} ms | {:.1} ms |",
        host(&off_host),
        host(&on_host)
    );
    println!("| one span made and closed where it is made (the agent's cost per RPC), p50 | {span_off:.0} ns | {span_on:.0} ns |");
    println!("\n| figure | value |\n|---|---|");
    println!("| spans the receiver got for {RUNS} traced runs, a pod and 20 execs | {spans} |");
    println!("| kata-trace-forwarder PSS, a pod after 20 execs | {fwd_pss} KiB |");
    println!("| kata-trace-forwarder, one stream to OTLP | {rate:.0} spans/s ({arrived} of {FORWARDED} arrived) |");
}

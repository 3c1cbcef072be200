//! Tracing end to end: `ctr run` through the private containerd with
//! `[runtime] enable_tracing` and `[agent.kata] enable_tracing`; an OTLP/gRPC
//! receiver (opentelemetry-proto's service, what Jaeger would get) collects
//! the spans of the shim, the launcher, kata-virtiofsd, and the agent through
//! kata-trace-forwarder; `kata-ctl trace report` reads them. Then tracing on
//! with no collector, and the forwarder killed mid-run.
//! Needs root, containerd and QEMU (`make test` installs them).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use kata_proto::trace::wire::Record;
use kata_tests::containerd::Containerd;
use kata_tests::otlp::{jsonl, Receiver};
use kata_tests::shim::{
    assert_pod_gone, kill_and_delete, pod_processes, run_detached, write_config,
};

const RUNTIME: &str = "io.containerd.kata.v2";
const GONE: Duration = Duration::from_secs(30);

fn traced_config(dir: &std::path::Path, endpoint: &str) -> std::path::PathBuf {
    write_config(
        &dir.join("configuration.toml"),
        "",
        &format!(
            "enable_tracing = true\n\
             trace_forwarder = \"{}\"\n\
             [runtime]\n\
             enable_tracing = true\n\
             jaeger_endpoint = \"{endpoint}\"\n",
            kata_tests::bin("kata-trace-forwarder").display()
        ),
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn find<'a>(spans: &'a [&Record], service: &str, name: &str) -> &'a Record {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name)
        .unwrap_or_else(|| {
            let have: Vec<String> = spans
                .iter()
                .map(|s| format!("{}:{}", s.service, s.name))
                .collect();
            panic!("no {service} span {name} among {have:?}")
        })
}

#[test]
fn one_ctr_run_is_one_trace_across_shim_launcher_virtiofsd_and_agent() {
    kata_tests::require_root();
    let rx = Receiver::start();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = traced_config(tmp.path(), &rx.endpoint());
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let id = "trace-one";
    let t0 = Instant::now();
    let out = c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        &image,
        id,
        "echo",
        "traced",
    ]);
    let ctr_run = t0.elapsed();
    assert!(out.contains("traced"), "{out}");
    assert_pod_gone(id, GONE);

    // the root span ends at Delete; the agent's spans come through the
    // forwarder, which sends what it holds when the pod ends
    let spans = rx.wait_for(Duration::from_secs(20), |s| {
        s.iter().any(|r| r.name == "container")
            && s.iter()
                .any(|r| r.service == "kata-agent" && r.name == "StartContainer")
    });
    let root = spans
        .iter()
        .find(|s| s.name == "container" && s.attributes.get("container_id") == Some(&id.into()))
        .unwrap_or_else(|| panic!("no root span; got {}", jsonl(&spans)));
    assert!(root.parent_span_id.is_empty());
    let trace: Vec<&Record> = spans
        .iter()
        .filter(|s| s.trace_id == root.trace_id)
        .collect();
    let services: HashSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    for s in [
        "containerd-shim-kata-v2",
        "kata-vmm-launcher",
        "kata-virtiofsd",
        "kata-agent",
    ] {
        assert!(services.contains(s), "{s} not in the trace: {services:?}");
    }
    // every span of the trace hangs off a span of the trace: nothing lost
    let ids: HashMap<&str, &Record> = trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    for s in &trace {
        if s.span_id != root.span_id {
            assert!(
                ids.contains_key(s.parent_span_id.as_str()),
                "{}:{} has a parent not in the trace",
                s.service,
                s.name
            );
        }
    }
    // one trace holds the run: no other trace has agent spans of this pod
    let create = find(&trace, "containerd-shim-kata-v2", "Create");
    assert_eq!(create.parent_span_id, root.span_id);
    let agent_create = find(&trace, "kata-agent", "CreateContainer");
    assert_eq!(
        agent_create.parent_span_id, create.span_id,
        "the agent's CreateContainer is a child of the shim's Create"
    );
    assert!(agent_create.parent_is_remote);
    let create_vm = find(&trace, "containerd-shim-kata-v2", "create_vm");
    let launcher_create = find(&trace, "kata-vmm-launcher", "CreateVm");
    assert_eq!(launcher_create.parent_span_id, create_vm.span_id);
    find(&trace, "kata-vmm-launcher", "qmp_connect");
    find(&trace, "kata-virtiofsd", "virtiofsd_startup");
    let start = find(&trace, "containerd-shim-kata-v2", "Start");
    let agent_start = find(&trace, "kata-agent", "StartContainer");
    assert_eq!(agent_start.parent_span_id, start.span_id);
    // the phases of the pod's bring-up, in order, inside Create
    let phases: Vec<&Record> = ["helpers", "create_vm", "boot", "agent_connect"]
        .iter()
        .map(|n| find(&trace, "containerd-shim-kata-v2", n))
        .collect();
    for w in phases.windows(2) {
        assert!(
            w[0].end_unix_nano <= w[1].start_unix_nano,
            "{} ends before {} starts",
            w[0].name,
            w[1].name
        );
    }
    for p in &phases {
        assert_eq!(p.parent_span_id, create.span_id, "{} under Create", p.name);
    }
    let agent_sandbox = find(&trace, "kata-agent", "CreateSandbox");
    assert!(agent_sandbox.start_unix_nano >= phases[3].end_unix_nano);
    // the forwarder lost nothing, and said so when it ended
    let log = std::fs::read_to_string(c.log_path()).unwrap_or_default();
    assert!(
        log.contains("dropped 0 here and 0 by the agent"),
        "the forwarder's summary in containerd's log:\n{}",
        c.log_tail(60)
    );

    // the report: the phases add up to the trace, which is the ctr run
    let file = tmp.path().join("spans.jsonl");
    std::fs::write(&file, jsonl(&spans)).unwrap();
    let o = std::process::Command::new(kata_tests::bin("kata-ctl"))
        .args(["trace", "report", "--container", id, "--json"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let total = r["total_ns"].as_u64().unwrap();
    let sum: u64 = r["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["duration_ns"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, total, "{r}");
    assert_eq!(r["orphans"], 0, "{r}");
    let first = r["first_instruction_ns"].as_u64().unwrap();
    assert!(first > 0 && first < total, "{r}");
    // what the trace cannot cover is ctr's and containerd's own work before
    // the shim's first span: a fixed cost (about 100 ms idle, 280 ms seen
    // with this file's other test running alongside), so the bound is 5% of
    // the run or 400 ms, whichever is larger
    let ratio = total as f64 / ctr_run.as_nanos() as f64;
    let untraced = ctr_run.as_nanos().saturating_sub(total as u128) / 1_000_000;
    let allowed = (ctr_run.as_millis() / 20).max(400);
    assert!(
        ratio <= 1.0 && untraced <= allowed,
        "the trace ({} ms) covers the measured ctr run ({} ms) but for {untraced} ms \
         (at most {allowed} ms): {ratio:.3}",
        total / 1_000_000,
        ctr_run.as_millis()
    );
    let o = std::process::Command::new(kata_tests::bin("kata-ctl"))
        .args(["trace", "report", "--container", id])
        .arg(&file)
        .output()
        .unwrap();
    let report = text(&o.stdout);
    for l in [
        "Create to the container's first instruction",
        "boot",
        "CreateContainer",
    ] {
        assert!(report.contains(l), "{l} in\n{report}");
    }
    println!("{report}");
}

#[test]
fn no_collector_and_a_killed_forwarder_leave_the_pod_serving() {
    kata_tests::require_root();
    // a loopback port nothing listens on
    let port = kata_tests::monitor::free_port();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = traced_config(tmp.path(), &format!("http://127.0.0.1:{port}"));
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let id = "trace-nocoll";
    run_detached(&c, &image, id, &["sleep", "600"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(c.log_path())
        .unwrap_or_default()
        .contains("cannot send spans")
    {
        assert!(
            Instant::now() < deadline,
            "the forwarder says the collector is away:\n{}",
            c.log_tail(60)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = c.ctr_ok(&["task", "exec", "--exec-id", "e1", id, "echo", "still"]);
    assert!(o.contains("still"), "{o}");

    // the forwarder dies: the agent keeps serving, its spans are counted
    let fwd = pod_processes(id)
        .into_iter()
        .find(|(_, cmd)| cmd.contains("kata-trace-forwarder"))
        .map(|(pid, _)| pid)
        .expect("the pod's kata-trace-forwarder");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fwd as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    for i in 0..3 {
        let o = c.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            &format!("k{i}"),
            id,
            "echo",
            "after",
        ]);
        assert!(o.contains("after"), "{o}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = std::process::Command::new(kata_tests::bin("kata-ctl"))
            .args(["metrics", id])
            .output()
            .unwrap();
        let m = text(&o.stdout);
        let dropped = m
            .lines()
            .find(|l| l.starts_with("kata_agent_trace_spans_dropped_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        if dropped.is_some_and(|d| d > 0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent counts the spans it drops: {dropped:?}\n{m}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    kill_and_delete(&c, id);
    assert_pod_gone(id, GONE);
}

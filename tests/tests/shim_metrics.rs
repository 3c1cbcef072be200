//! Metrics end to end: two kata-rs pods and a runc container through the
//! private containerd, each pod's management socket, kata-monitor over the
//! node, and a real Prometheus (Debian's package) scraping kata-monitor.
//! Needs root, containerd, QEMU and prometheus (`make test` installs them).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kata_tests::containerd::Containerd;
use kata_tests::monitor::{free_port, get, raw, start as monitor, Proc};
use kata_tests::shim::{assert_pod_gone, kill_and_delete, run_detached, write_config};

const GONE: Duration = Duration::from_secs(20);

fn value(metrics: &str, series_prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series_prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn kata_monitor_serves_every_pod_and_prometheus_scrapes_it() {
    kata_tests::require_root();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(&tmp.path().join("configuration.toml"), "", "");
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let port = free_port();
    // started before any pod
    let mon = monitor(port);
    let (s, body) = get(port, "/sandboxes");
    assert_eq!(s, 200);
    assert!(!body.contains("met-a"), "{body}");

    run_detached(&c, &image, "met-a", &["sleep", "600"]);
    run_detached(&c, &image, "met-b", &["sleep", "600"]);
    c.ctr_ok(&["run", "-d", &image, "met-runc", "sleep", "600"]);

    let (s, body) = get(port, "/sandboxes");
    assert_eq!(s, 200);
    let pods: Vec<&str> = body.lines().collect();
    assert!(pods.contains(&"met-a") && pods.contains(&"met-b"), "{body}");
    assert!(!body.contains("met-runc"), "{body}");
    let (_, json) = get(port, "/sandboxes?format=json");
    let list: Vec<String> = serde_json::from_str(&json).unwrap();
    assert!(list.contains(&"met-a".to_string()), "{json}");

    let (s, m) = get(port, "/metrics");
    assert_eq!(s, 200);
    for pod in ["met-a", "met-b"] {
        let label = format!("sandbox_id=\"{pod}\"");
        let lines = m.lines().filter(|l| l.contains(&label)).count();
        assert!(lines >= 200, "{pod}: {lines} lines");
        for family in [
            "kata_shim_",
            "kata_hypervisor_",
            "kata_virtiofsd_",
            "kata_agent_",
            "kata_guest_",
            "kata_launcher_",
        ] {
            assert!(
                m.lines()
                    .any(|l| l.starts_with(family) && l.contains(&label)),
                "{family} of {pod}"
            );
        }
    }
    assert_eq!(
        value(&m, "kata_monitor_running_shim_count"),
        Some(2.0),
        "{m}"
    );
    let mem = m
        .lines()
        .find(|l| l.starts_with("kata_guest_meminfo{sandbox_id=\"met-a\",item=\"MemTotal\"}"))
        .unwrap_or_else(|| panic!("MemTotal of met-a"));
    let total: f64 = mem.rsplit(' ').next().unwrap().parse().unwrap();
    // the VM has 256 MiB; the kernel keeps some for itself
    assert!(
        total > 180.0 * 1048576.0 && total <= 256.0 * 1048576.0,
        "{mem}"
    );

    // the agent's address, and bad requests
    let (s, url) = get(port, "/agent-url?sandbox=met-a");
    assert_eq!(s, 200);
    assert!(
        url.starts_with("hvsock://") && url.trim().ends_with(":1024"),
        "{url}"
    );
    let (s, body) = get(port, "/agent-url?sandbox=nope");
    assert_eq!(s, 404, "{body}");
    assert!(body.contains("nope"), "{body}");
    let out = raw(port, b"GARBAGE\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");

    // kata-ctl metrics: one pod without Prometheus
    let o = Command::new(kata_tests::bin("kata-ctl"))
        .args(["metrics", "met-b"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("kata_guest_meminfo{item=\"MemTotal\"}"));

    // Prometheus scrapes kata-monitor
    let prom_port = free_port();
    let prom_dir = tmp.path().join("prometheus");
    std::fs::create_dir(&prom_dir).unwrap();
    let prom_cfg = prom_dir.join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kata\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let prom_bin = ["/usr/bin/prometheus", "/bin/prometheus"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("prometheus is missing: `make deps` installs Debian's prometheus package");
    let _prom = Proc(
        Command::new(prom_bin)
            .arg(format!("--config.file={}", prom_cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts"),
    );
    let promql = |q: &str| -> serde_json::Value {
        let path = format!(
            "/api/v1/query?query={}",
            q.replace('{', "%7B")
                .replace('}', "%7D")
                .replace('"', "%22")
                .replace('=', "%3D")
                .replace(' ', "%20")
        );
        let (s, body) = get(prom_port, &path);
        assert_eq!(s, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let wait_for = |q: &str, ok: &dyn Fn(&serde_json::Value) -> bool| -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", prom_port)).is_ok() {
                let v = promql(q);
                if ok(&v) {
                    return v;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "prometheus: {q}");
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let results =
        |v: &serde_json::Value| v["data"]["result"].as_array().cloned().unwrap_or_default();
    let v = wait_for("kata_guest_meminfo{item=\"MemTotal\"}", &|v| {
        results(v).len() == 2
    });
    for r in results(&v) {
        let n: f64 = r["value"][1].as_str().unwrap().parse().unwrap();
        assert!(n > 180.0 * 1048576.0 && n <= 256.0 * 1048576.0, "{r}");
    }
    let q = "sum(kata_shim_task_calls_total{sandbox_id=\"met-a\"})";
    let before: f64 = results(&wait_for(q, &|v| !results(v).is_empty()))[0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    c.ctr_ok(&["task", "exec", "--exec-id", "x1", "met-a", "true"]);
    wait_for(q, &|v| {
        results(v)
            .first()
            .and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok())
            .is_some_and(|n| n > before)
    });

    // a stopped shim costs its own part only; a killed one is gone
    let shim_b = kata_tests::shim::pod_processes("met-b")
        .into_iter()
        .find(|(_, cmd)| cmd.contains("containerd-shim-kata-v2"))
        .map(|(pid, _)| pid)
        .expect("met-b's shim");
    // SAFETY: kill takes integers only; the shim is this test's pod's.
    unsafe { libc::kill(shim_b as i32, libc::SIGSTOP) };
    let t0 = Instant::now();
    let (s, m) = get(port, "/metrics");
    let took = t0.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(shim_b as i32, libc::SIGCONT) };
    assert_eq!(s, 200);
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert!(m.contains("sandbox_id=\"met-a\""));
    assert!(!m.contains("sandbox_id=\"met-b\""));
    assert!(
        value(&m, "kata_monitor_scrape_failed_count").unwrap_or(0.0) >= 1.0,
        "{m}"
    );

    // a stale socket (a shim killed before it could clean up) is not a pod
    let stale_dir = kata_proto::paths::run_dir().join("met-stale");
    std::fs::create_dir_all(&stale_dir).unwrap();
    drop(std::os::unix::net::UnixListener::bind(stale_dir.join("shim-monitor.sock")).unwrap());
    let (_, body) = get(port, "/sandboxes");
    let (_, m) = get(port, "/metrics");
    std::fs::remove_dir_all(&stale_dir).unwrap();
    assert!(!body.contains("met-stale"), "{body}");
    assert!(!m.contains("met-stale"));
    assert_eq!(
        value(&m, "kata_monitor_running_shim_count"),
        Some(2.0),
        "{m}"
    );

    // restarted while the pods run: it finds them
    drop(mon);
    let mon = monitor(port);
    let (_, body) = get(port, "/sandboxes");
    assert!(body.contains("met-a") && body.contains("met-b"), "{body}");

    kill_and_delete(&c, "met-a");
    kill_and_delete(&c, "met-b");
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", "met-runc"]);
    kata_tests::shim::wait_task_status(&c, "met-runc", "STOPPED", Duration::from_secs(30));
    c.ctr_ok(&["task", "delete", "met-runc"]);
    c.ctr_ok(&["container", "delete", "met-runc"]);
    assert_pod_gone("met-a", GONE);
    assert_pod_gone("met-b", GONE);
    let (_, m) = get(port, "/metrics");
    assert_eq!(
        value(&m, "kata_monitor_running_shim_count"),
        Some(0.0),
        "{m}"
    );
    drop(mon);
}

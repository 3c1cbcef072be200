//! Metrics: kata-monitor's scrape of the node with 1 and 10 pods, one pod's
//! metrics, kata-monitor's PSS and the shim's before and after scrapes.

use std::time::Instant;

use kata_tests::containerd::Containerd;
use kata_tests::monitor::{free_port, get, start};
use kata_tests::shim::{kill_and_delete, pod_processes, run_detached, write_config};

use super::{pct, pss_kib};

const SCRAPES: usize = 20;

fn scrape_ms(port: u16) -> Vec<f64> {
    let mut t = vec![];
    for _ in 0..SCRAPES {
        let t0 = Instant::now();
        let (s, _) = get(port, "/metrics");
        assert_eq!(s, 200);
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    t
}

fn shim_pid(id: &str) -> u32 {
    pod_processes(id)
        .into_iter()
        .find(|(_, cmd)| cmd.contains("containerd-shim-kata-v2"))
        .map(|(pid, _)| pid)
        .expect("the pod's shim")
}

pub fn metrics_section() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(&tmp.path().join("configuration.toml"), "", "");
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let port = free_port();
    let mon = start(port);
    run_detached(&c, &image, "bm-0", &["sleep", "600"]);
    let shim = shim_pid("bm-0");
    let shim_before = pss_kib(shim);
    let one = scrape_ms(port);
    let shim_after = pss_kib(shim);
    let (_, pod_text) = get(port, "/metrics");
    let pod_lines = pod_text
        .lines()
        .filter(|l| l.contains("sandbox_id=\"bm-0\""))
        .count();
    let pod_bytes: usize = pod_text
        .lines()
        .filter(|l| l.contains("sandbox_id=\"bm-0\""))
        .map(|l| l.len() + 1)
        .sum();
    let series = |name: &str| -> f64 {
        pod_text
            .lines()
            .find(|l| l.starts_with(name) && l.contains("sandbox_id=\"bm-0\""))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let guest_ms = series("kata_shim_agent_metrics_duration_seconds_sum") * 1e3
        / series("kata_shim_agent_metrics_duration_seconds_count").max(1.0);
    for i in 1..10 {
        run_detached(&c, &image, &format!("bm-{i}"), &["sleep", "600"]);
    }
    let ten = scrape_ms(port);
    let mon_pss = pss_kib(mon.0.id());
    for i in 0..10 {
        kill_and_delete(&c, &format!("bm-{i}"));
    }
    drop(mon);
    println!("\n## Metrics (kata-bench)\n");
    println!("kata-monitor's `/metrics` over HTTP on loopback, n={SCRAPES} each; pods through the private containerd (TCG guests).\n");
    println!("| figure | value |\n|---|---|");
    println!(
        "| scrape of the node, 1 pod | p50 {:.1} ms, p90 {:.1} ms |",
        pct(&one, 0.5),
        pct(&one, 0.9)
    );
    println!(
        "| scrape of the node, 10 pods | p50 {:.1} ms, p90 {:.1} ms |",
        pct(&ten, 0.5),
        pct(&ten, 0.9)
    );
    println!("| one pod's metrics | {pod_lines} series, {pod_bytes} bytes |");
    println!("| of a 1-pod scrape: the guest's GetMetrics as the shim timed it (mean) | {guest_ms:.1} ms |");
    println!("| kata-monitor PSS after the scrapes of 10 pods | {mon_pss} KiB |");
    println!("| shim PSS, before / after {SCRAPES} scrapes | {shim_before} / {shim_after} KiB |");
}

//! The Kubernetes path: containerd's CRI plugin, a pod with one container
//! from RunPodSandbox to the container's first line in the CRI log file,
//! the `kata` handler against `runc` on the same containerd, and ten kata
//! pods started together through CRI.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kata_tests::containerd::{Containerd, KATA_HANDLER};
use kata_tests::cri::{container_config, pod_config, Cri};
use kata_tests::net::Netns;
use kata_tests::shim::write_config;

use super::pct;

const RUNS: usize = 3;
const AT_ONCE: usize = 10;

/// One pod through CRI: RunPodSandbox, CreateContainer, StartContainer,
/// until the container's first line is in its log file; then the pod is
/// stopped and removed. (seconds to the first line, seconds to remove),
/// or what failed.
fn pod_to_first_line(
    cri: &mut Cri,
    handler: &str,
    name: &str,
    logs: &Path,
) -> Result<(f64, f64), String> {
    let uid = format!(
        "00000000-0000-4000-8000-{:012x}",
        fnv(name) & 0xffff_ffff_ffff
    );
    let dir = logs.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let pod_cfg = pod_config(name, &uid, &dir);
    let t0 = Instant::now();
    let pod = cri
        .run_pod(pod_cfg.clone(), handler)
        .map_err(|e| format!("RunPodSandbox: {e}"))?;
    let mut c = container_config("main", &["sh", "-c", "echo first line; exec sleep inf"]);
    c.log_path = "main.log".into();
    let started = cri.create_and_start(&pod, &pod_cfg, c);
    let first = started.and_then(|_| {
        let log = dir.join("main.log");
        loop {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(" F first line")
            {
                return Ok(t0.elapsed().as_secs_f64());
            }
            if t0.elapsed() > Duration::from_secs(300) {
                return Err("no first line within 300 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let t1 = Instant::now();
    cri.stop_and_remove_pod(&pod)?;
    Ok((first?, t1.elapsed().as_secs_f64()))
}

/// FNV-1a of a name (distinct pod uids).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

pub fn cri_section() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(&tmp.path().join("configuration.toml"), "", "");
    let netns = Netns::new(&format!("kr-bcri-{}", std::process::id() % 100_000));
    let c = Containerd::builder().cri(&cfg).netns(netns.path()).start();
    c.import_cri_images();
    let logs: PathBuf = tmp.path().join("logs");
    let mut cri = Cri::connect(c.address());

    // alternated, the first round of each dropped (caches)
    let (mut kata, mut runc, mut kata_rm, mut runc_rm) = (vec![], vec![], vec![], vec![]);
    for i in 0..=RUNS {
        for (handler, first, rm) in [
            ("runc", &mut runc, &mut runc_rm),
            (KATA_HANDLER, &mut kata, &mut kata_rm),
        ] {
            let (f, r) = pod_to_first_line(&mut cri, handler, &format!("{handler}-{i}"), &logs)
                .unwrap_or_else(|e| panic!("{handler} pod {i}: {e}\n{}", c.log_tail(30)));
            if i > 0 {
                first.push(f);
                rm.push(r);
            }
        }
    }
    for v in [&mut kata, &mut runc, &mut kata_rm, &mut runc_rm] {
        v.sort_by(f64::total_cmp);
    }

    // ten kata pods at once, each on its own CRI connection
    let address = c.address().to_path_buf();
    let t0 = Instant::now();
    let handles: Vec<_> = (0..AT_ONCE)
        .map(|i| {
            let address = address.clone();
            let logs = logs.clone();
            std::thread::spawn(move || {
                let mut cri = Cri::connect(&address);
                pod_to_first_line(&mut cri, KATA_HANDLER, &format!("many-{i}"), &logs)
            })
        })
        .collect();
    let results: Vec<Result<(f64, f64), String>> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
        .collect();
    let wall = t0.elapsed().as_secs_f64();
    let mut many: Vec<f64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|r| r.0))
        .collect();
    many.sort_by(f64::total_cmp);
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();

    println!("\n## The Kubernetes path: CRI (kata-bench)\n");
    println!("containerd 1.6's CRI plugin, runtime handlers `kata` (kata-rs, TCG, the test configuration: 1 vCPU, 256 MiB) and `runc` on the same containerd; the pod network from the CNI bridge plugin. RunPodSandbox + CreateContainer + StartContainer until the container's first line is in its CRI log file (containerd writes it from the task's stdout), n={RUNS} each, alternated, after one warm-up round of each.\n");
    println!("| handler | to the first log line, p50 / max | StopPodSandbox + RemovePodSandbox, p50 |\n|---|---|---|");
    for (name, v, rm) in [("runc", &runc, &runc_rm), ("kata", &kata, &kata_rm)] {
        println!(
            "| {name} | {:.0} / {:.0} ms | {:.0} ms |",
            pct(v, 0.5) * 1e3,
            pct(v, 1.0) * 1e3,
            pct(rm, 0.5) * 1e3
        );
    }
    println!(
        "| kata / runc (p50) | {:.2}x | {:.2}x |",
        pct(&kata, 0.5) / pct(&runc, 0.5),
        pct(&kata_rm, 0.5) / pct(&runc_rm, 0.5)
    );
    println!("\n{AT_ONCE} kata pods started together through CRI (one connection each; the machine has 2 CPUs, every guest boots under TCG):\n");
    println!("| figure | value |\n|---|---|");
    println!("| pods that came up | {}/{AT_ONCE} |", many.len());
    if !many.is_empty() {
        println!(
            "| to the first log line, p50 / max | {:.1} / {:.1} s |",
            pct(&many, 0.5),
            pct(&many, 1.0)
        );
        println!(
            "| p50 against one pod alone | {:.1}x |",
            pct(&many, 0.5) / pct(&kata, 0.5)
        );
    }
    println!("| wall time, all ten up and removed | {wall:.1} s |");
    for f in failures {
        println!("| failure | {f} |");
    }
}

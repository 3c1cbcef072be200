//! The agent policy's cost: CreateContainer and ExecProcess on a host-mode
//! agent without policy support vs the agent with a generated policy, the
//! policy engine alone per check, the agent's PSS with a policy loaded, and
//! the agent binary with and without the feature.

use std::time::Instant;

use kata_agent_policy::Policy;
use kata_tests::agent::{self as ka, HostAgent};
use serde_json::json;

use super::{pct, pss_kib};

const N: usize = 30;

/// Median milliseconds of CreateContainer and of ExecProcess (+ its wait).
async fn calls(a: &HostAgent) -> (f64, f64) {
    let mut c = a.client.clone();
    let spec = ka::spec(&a.rootfs, &["sleep", "600"]);
    let mut create = vec![];
    for i in 0..N {
        let id = format!("b{i}");
        let t = Instant::now();
        ka::create(&mut c, &id, &spec).await.unwrap();
        create.push(t.elapsed().as_secs_f64() * 1e3);
        ka::remove(&mut c, &id).await.unwrap();
    }
    ka::create(&mut c, "x", &spec).await.unwrap();
    ka::start(&mut c, "x").await.unwrap();
    let mut exec = vec![];
    for i in 0..N {
        let e = format!("e{i}");
        let t = Instant::now();
        ka::exec(&mut c, "x", &e, &ka::process(&["true"], false))
            .await
            .unwrap();
        exec.push(t.elapsed().as_secs_f64() * 1e3);
        ka::wait(&mut c, "x", &e).await;
    }
    ka::remove(&mut c, "x").await.unwrap();
    create.sort_by(f64::total_cmp);
    exec.sort_by(f64::total_cmp);
    (pct(&create, 0.5), pct(&exec, 0.5))
}

pub async fn policy_section() {
    let dir = tempfile::tempdir().unwrap();
    let plain = HostAgent::start().await;
    // the generated policy of the benchmark's own container spec
    let spec = ka::spec(&plain.rootfs, &["sleep", "600"]);
    std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
    let gen = std::process::Command::new(kata_tests::bin("kata-ctl"))
        .args(["policy", "generate"])
        .arg(dir.path())
        .args(["--allow-exec", r#"["true"]"#])
        .output()
        .expect("kata-ctl policy generate");
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let text = String::from_utf8(gen.stdout).unwrap();

    let plain_idle = pss_kib(plain.child.id());
    let (pc, pe) = calls(&plain).await;
    let plain_after = pss_kib(plain.child.id());
    drop(plain);
    let checked = HostAgent::start_with_quiet_policy(&text).await;
    let policy_idle = pss_kib(checked.child.id());
    // (the rootfs path differs per agent: the policy does not compare it)
    let (cc, ce) = calls(&checked).await;
    let policy_after = pss_kib(checked.child.id());
    drop(checked);

    // the engine alone, on the inputs the agent gives it
    let mut p = Policy::from_text("generated", &text).unwrap();
    let create_in = json!({"container_id": "b0", "OCI": spec}).to_string();
    let exec_in =
        json!({"container_id": "b0", "exec_id": "e", "process": {"args": ["true"]}}).to_string();
    let mut t_create = vec![];
    let mut t_exec = vec![];
    for _ in 0..200 {
        let t = Instant::now();
        p.check("CreateContainerRequest", &create_in).unwrap();
        t_create.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        p.check("ExecProcessRequest", &exec_in).unwrap();
        t_exec.push(t.elapsed().as_secs_f64() * 1e3);
    }
    t_create.sort_by(f64::total_cmp);
    t_exec.sort_by(f64::total_cmp);
    let size = |b: &str| {
        std::fs::metadata(kata_tests::bin(b))
            .map(|m| m.len() as f64 / (1 << 20) as f64)
            .unwrap_or(0.0)
    };

    println!("\n## Agent policy (kata-bench)\n");
    println!("Host mode; the policy is `kata-ctl policy generate` of the benchmark's container spec ({} bytes), debug log off. Medians of n={N}.\n", text.len());
    println!("| figure | without the feature | with the generated policy |\n|---|---|---|");
    println!("| CreateContainer (create only) | {pc:.2} ms | {cc:.2} ms |");
    println!("| ExecProcess of `true` | {pe:.2} ms | {ce:.2} ms |");
    println!(
        "| one check in the engine (n=200): CreateContainerRequest / ExecProcessRequest | — | p50 {:.3} ms, p99 {:.3} ms / p50 {:.3} ms, p99 {:.3} ms |",
        pct(&t_create, 0.5),
        pct(&t_create, 0.99),
        pct(&t_exec, 0.5),
        pct(&t_exec, 0.99)
    );
    println!(
        "| agent PSS, idle / after the calls | {plain_idle} / {plain_after} KiB | {policy_idle} / {policy_after} KiB |"
    );
    println!(
        "| agent binary (static, stripped) | {:.2} MiB | {:.2} MiB |",
        size("kata-agent"),
        size("kata-agent-policy")
    );
}

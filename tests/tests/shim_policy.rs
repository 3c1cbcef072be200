//! The agent policy end to end: containerd and ctr, the shim, a VM whose
//! agent has policy support (the policy test image, allow-all by default),
//! and policies given as the pod annotation io.katacontainers.config.agent.policy.
//! Needs root, containerd and QEMU (`make test` installs them).

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use kata_tests::containerd::Containerd;
use kata_tests::shim::{
    assert_pod_gone, kill_and_delete, wait_task_status, write_config_for, RUNTIME,
};

const GONE: Duration = Duration::from_secs(20);
const ANNOTATION: &str = "io.katacontainers.config.agent.policy";

fn setup() -> (Containerd, String, tempfile::TempDir) {
    kata_tests::require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = write_config_for(
        &kata_tests::policy_guest_dir(),
        &tmp.path().join("configuration.toml"),
        "kernel_params = \"agent.policy_debug\"",
        "",
    );
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    (c, image, tmp)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The allow-all policy with some rules turned to `false`.
fn allow_all_but(denied: &[&str]) -> String {
    let mut p = kata_agent_policy::ALLOW_ALL.to_string();
    for d in denied {
        let rule = format!("default {d} := true");
        assert!(p.contains(&rule), "{rule}");
        p = p.replace(&rule, &format!("default {d} := false"));
    }
    p
}

fn annotation(policy: &str) -> String {
    format!(
        "{ANNOTATION}={}",
        base64::engine::general_purpose::STANDARD.encode(policy)
    )
}

fn ctl(args: &[&str]) -> std::process::Output {
    std::process::Command::new(kata_tests::bin("kata-ctl"))
        .args(args)
        .output()
        .expect("kata-ctl runs")
}

#[test]
fn an_exec_denying_policy_denies_exec_and_set_policy_and_replays() {
    let (c, image, tmp) = setup();
    let policy = allow_all_but(&["ExecProcessRequest", "SetPolicyRequest"]);
    let id = "pol-exec";
    c.ctr_ok(&[
        "run",
        "-d",
        "--annotation",
        &annotation(&policy),
        "--runtime",
        RUNTIME,
        &image,
        id,
        "sleep",
        "600",
    ]);
    wait_task_status(&c, id, "RUNNING", Duration::from_secs(90));
    let o = c.ctr(&["task", "exec", "--exec-id", "e1", id, "echo", "hi"]);
    let err = text(&o.stderr);
    assert!(
        !o.status.success(),
        "exec went through: {}",
        text(&o.stdout)
    );
    assert!(
        err.contains("ExecProcessRequest is blocked by policy"),
        "ctr says why: {err}"
    );
    // (ctr 1.6 shows any code containerd does not map, PermissionDenied
    // among them, as "unknown": the message is what a user sees)
    // the container runs on
    wait_task_status(&c, id, "RUNNING", Duration::from_secs(5));
    // the host tries to replace the policy behind the pod's back
    let o = ctl(&[
        "agent",
        "--sandbox",
        id,
        "SetPolicy",
        &serde_json::json!({"policy": kata_agent_policy::ALLOW_ALL}).to_string(),
    ]);
    let err = text(&o.stderr);
    assert!(
        !o.status.success() && err.contains("SetPolicyRequest is blocked by policy"),
        "{err}"
    );
    // the decision log of this run, replayed against the same policy
    let o = ctl(&["policy", "log", "--sandbox", id]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let log = text(&o.stdout);
    for r in [
        "\"request\":\"SetPolicyRequest\"",
        "\"request\":\"CreateSandboxRequest\"",
        "\"request\":\"CreateContainerRequest\"",
        "\"request\":\"ReadStreamRequest\"",
    ] {
        assert!(log.contains(r), "{r} in {log}");
    }
    assert!(log.contains("\"allowed\":false"), "{log}");
    let inputs = tmp.path().join("inputs.jsonl");
    std::fs::write(&inputs, &log).unwrap();
    let pfile = tmp.path().join("policy.rego");
    // the annotation's policy was in force from the first request: the
    // records after it replay against it (the first, SetPolicy itself, was
    // judged by the image's allow-all policy)
    let after: String = log.lines().skip(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(&inputs, after).unwrap();
    std::fs::write(&pfile, &policy).unwrap();
    let o = ctl(&[
        "policy",
        "eval",
        pfile.to_str().unwrap(),
        inputs.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "replay differs: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert!(
        text(&o.stdout).contains(" 0 different"),
        "{}",
        text(&o.stdout)
    );
    kill_and_delete(&c, id);
    assert_pod_gone(id, GONE);
}

#[test]
fn a_policy_denying_output_gives_a_silent_container_and_no_hang() {
    let (c, image, _tmp) = setup();
    let id = "pol-quiet";
    let o = c.ctr(&[
        "run",
        "--rm",
        "--annotation",
        &annotation(&allow_all_but(&["ReadStreamRequest"])),
        "--runtime",
        RUNTIME,
        &image,
        id,
        "sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
    assert!(
        !text(&o.stderr).contains("to-stderr"),
        "{}",
        text(&o.stderr)
    );
    assert_pod_gone(id, GONE);
}

#[test]
fn bad_policy_annotations_fail_the_pod_and_leave_nothing() {
    let (c, image, _tmp) = setup();
    let not_rego = annotation("package agent_policy\nx := {\n");
    for (id, ann, want) in [
        (
            "pol-b64",
            format!("{ANNOTATION}=not base64!"),
            "the agent policy (Rego) as base64",
        ),
        ("pol-rego", not_rego, "does not parse"),
    ] {
        let o = c.ctr(&[
            "run",
            "--rm",
            "--annotation",
            &ann,
            "--runtime",
            RUNTIME,
            &image,
            id,
            "echo",
            "never",
        ]);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{id} ran: {}", text(&o.stdout));
        assert!(!text(&o.stdout).contains("never"));
        assert!(err.contains(want), "{id}: {err}");
        let _ = c.ctr(&["container", "delete", id]);
        assert_pod_gone(id, GONE);
    }
}

/// The bundle containerd made for container `id` (its config.json).
fn bundle(c: &Containerd, id: &str) -> std::path::PathBuf {
    let b = c
        .state()
        .join("io.containerd.runtime.v2.task")
        .join(c.namespace())
        .join(id);
    assert!(b.join("config.json").exists(), "{}", b.display());
    b
}

#[test]
fn a_generated_policy_runs_its_container_and_no_other() {
    let (c, image, tmp) = setup();
    let args = ["sleep", "600"];
    // the spec ctr makes, taken from a first run under the allow-all policy
    let mut run = vec!["run", "-d", "--runtime", RUNTIME, &image, "pol-gen0"];
    run.extend_from_slice(&args);
    c.ctr_ok(&run);
    wait_task_status(&c, "pol-gen0", "RUNNING", Duration::from_secs(90));
    let b = bundle(&c, "pol-gen0");
    let gen = tmp.path().join("gen.rego");
    let o = ctl(&[
        "policy",
        "generate",
        b.to_str().unwrap(),
        "--allow-exec",
        r#"["echo", "allowed"]"#,
        "-o",
        gen.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    kill_and_delete(&c, "pol-gen0");
    let ann = annotation(&std::fs::read_to_string(&gen).unwrap());

    let mut ok = vec![
        "run",
        "-d",
        "--annotation",
        &ann,
        "--runtime",
        RUNTIME,
        &image,
        "pol-gen1",
    ];
    ok.extend_from_slice(&args);
    c.ctr_ok(&ok);
    wait_task_status(&c, "pol-gen1", "RUNNING", Duration::from_secs(90));
    let out = c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "pol-gen1",
        "echo",
        "allowed",
    ]);
    assert_eq!(out.trim(), "allowed");
    let o = c.ctr(&["task", "exec", "--exec-id", "e2", "pol-gen1", "sh"]);
    assert!(
        text(&o.stderr).contains("ExecProcessRequest is blocked by policy"),
        "{}",
        text(&o.stderr)
    );
    kill_and_delete(&c, "pol-gen1");

    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:ro",
        data.display()
    );
    let variants: [(&str, &[&str], &[&str]); 4] = [
        ("args", &[], &["sleep", "601"]),
        ("env", &["--env", "X=1"], &args),
        ("a mount", &["--mount", &mount], &args),
        ("the read-only rootfs", &["--read-only"], &args),
    ];
    for (n, (what, opts, argv)) in variants.iter().enumerate() {
        let id = format!("pol-gen-v{n}");
        let mut a = vec!["run", "--rm", "--annotation", &ann];
        a.extend_from_slice(opts);
        a.extend_from_slice(&["--runtime", RUNTIME, &image, &id]);
        a.extend_from_slice(argv);
        let o = c.ctr(&a);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{what}: the changed container ran");
        assert!(
            err.contains("CreateContainerRequest is blocked by policy"),
            "{what}: {err}"
        );
        let _ = c.ctr(&["container", "delete", &id]);
        assert_pod_gone(&id, GONE);
    }
    assert!(Path::new(&data).exists());
}

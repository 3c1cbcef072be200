//! `kata-ctl agent` against a host-mode agent, as a developer runs it: every
//! step through the command line, JSON in and out. Needs root.

use std::process::{Output, Stdio};

use kata_tests::agent::{spec, HostAgent};
use kata_tests::bin;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

fn addr(a: &HostAgent) -> String {
    a.addr.to_string()
}

fn ctl(a: &HostAgent, args: &[&str]) -> Command {
    let mut c = Command::new(bin("kata-ctl"));
    c.arg("agent").arg("--addr").arg(addr(a)).args(args);
    c.kill_on_drop(true);
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `kata-ctl agent --addr ... <args>`, optionally feeding `stdin`.
async fn run(a: &HostAgent, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut c = ctl(a, args);
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().expect("kata-ctl starts");
    if let Some(data) = stdin {
        let mut i = child.stdin.take().unwrap();
        i.write_all(data).await.unwrap();
        drop(i);
    }
    child.wait_with_output().await.unwrap()
}

/// An RPC that must succeed: its reply.
async fn ok(a: &HostAgent, rpc: &str, req: &Value) -> Value {
    let o = run(a, &[rpc, &req.to_string()], None).await;
    assert!(
        o.status.success(),
        "{rpc} {req} failed ({}): {}",
        o.status,
        text(&o.stderr)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{rpc}: not JSON ({e}): {}", text(&o.stdout)))
}

/// An RPC that must fail: its stderr.
async fn fails(a: &HostAgent, args: &[&str]) -> String {
    let o = run(a, args, None).await;
    assert!(
        !o.status.success(),
        "{args:?} succeeded: {}",
        text(&o.stdout)
    );
    assert!(o.stdout.is_empty(), "{args:?}: {}", text(&o.stdout));
    text(&o.stderr)
}

/// `attach <stream> <ids...>` in the background, its stdout collected.
fn attach(a: &HostAgent, args: &[&str]) -> Child {
    let mut all = vec!["attach"];
    all.extend_from_slice(args);
    ctl(a, &all)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kata-ctl attach starts")
}

async fn finished(c: Child, what: &str) -> String {
    let o = c.wait_with_output().await.unwrap();
    assert!(
        o.status.success(),
        "{what} failed ({}): {}",
        o.status,
        text(&o.stderr)
    );
    text(&o.stdout)
}

#[tokio::test]
async fn guest_details_and_health_in_any_spelling() {
    let a = HostAgent::start().await;
    for name in ["GetGuestDetails", "get_guest_details", "getguestdetails"] {
        let d = ok(&a, name, &json!({})).await;
        assert_eq!(d["agent_details"]["version"], kata_proto::VERSION, "{d}");
    }
    // no request at all means {}
    let o = run(&a, &["Check"], None).await;
    assert!(o.status.success(), "{}", text(&o.stderr));
    let h: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(h["status"], 1, "SERVING: {h}");
    let v = ok(&a, "version", &json!({})).await;
    assert_eq!(v["agent_version"], kata_proto::VERSION, "{v}");
}

#[tokio::test]
async fn a_container_through_the_cli_only() {
    let a = HostAgent::start().await;
    let id = "cli-echo";
    // the spec as an object, from a file
    let req = a.dir.path().join("create.json");
    std::fs::write(
        &req,
        json!({"container_id": id, "oci_spec_json": spec(&a.rootfs, &["echo", "hi"])}).to_string(),
    )
    .unwrap();
    let o = run(
        &a,
        &["CreateContainer", &format!("@{}", req.display())],
        None,
    )
    .await;
    assert!(o.status.success(), "CreateContainer: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), "{}");

    let out = attach(&a, &["stdout", id]);
    ok(&a, "StartContainer", &json!({"container_id": id})).await;
    let w = ok(&a, "wait_process", &json!({"container_id": id})).await;
    assert_eq!(
        (w["status"].as_i64(), w["signal"].as_i64()),
        (Some(0), Some(0)),
        "{w}"
    );
    assert_eq!(finished(out, "attach stdout").await, "hi\n");
    ok(
        &a,
        "RemoveContainer",
        &json!({"container_id": id, "timeout": 10}),
    )
    .await;
    let e = fails(
        &a,
        &["StartContainer", &json!({"container_id": id}).to_string()],
    )
    .await;
    assert!(e.contains("NotFound"), "{e}");
}

#[tokio::test]
async fn stdin_through_attach_and_the_process_list() {
    let a = HostAgent::start().await;
    let id = "cli-cat";
    let create = json!({"container_id": id, "oci_spec_json": spec(&a.rootfs, &["cat"])});
    let o = run(
        &a,
        &["CreateContainer", "-"],
        Some(create.to_string().as_bytes()),
    )
    .await;
    assert!(o.status.success(), "CreateContainer -: {}", text(&o.stderr));
    let mut out = attach(&a, &["stdout", id]);
    let mut input = attach(&a, &["stdin", id]);
    ok(&a, "StartContainer", &json!({"container_id": id})).await;

    // a line through: cat runs
    let mut to_cat = input.stdin.take().unwrap();
    let mut from_cat = out.stdout.take().unwrap();
    to_cat.write_all(b"one\n").await.unwrap();
    let mut first = [0u8; 4];
    from_cat.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"one\n");

    let l = ok(&a, "ListProcesses", &json!({"container_id": id})).await;
    let table = l["process_list"].as_str().unwrap_or_default();
    assert!(
        table.starts_with("PID CMD\n") && table.contains("cat"),
        "{l}"
    );
    assert_eq!(l["pids"].as_array().map(Vec::len), Some(1), "{l}");
    let l = ok(
        &a,
        "ListProcesses",
        &json!({"container_id": id, "format": "json"}),
    )
    .await;
    assert_eq!(l["process_list"][0]["cmd"], "cat", "{l}");

    // our end of file is the process's: cat ends
    to_cat.write_all(b"two").await.unwrap();
    drop(to_cat);
    assert_eq!(finished(input, "attach stdin").await, "");
    let w = ok(&a, "WaitProcess", &json!({"container_id": id})).await;
    assert_eq!(w["status"], 0, "{w}");
    let mut rest = String::new();
    from_cat.read_to_string(&mut rest).await.unwrap();
    assert_eq!(rest, "two");
    assert_eq!(finished(out, "attach stdout").await, "");

    // a stream already taken is refused with the agent's code
    let o = attach(&a, &["stdout", id])
        .wait_with_output()
        .await
        .unwrap();
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("attach stdout cli-cat: AlreadyExists: "), "{e}");
    ok(&a, "remove_container", &json!({"container_id": id})).await;
}

#[tokio::test]
async fn bad_names_bad_json_and_agent_errors() {
    let a = HostAgent::start().await;
    let e = fails(&a, &["NoSuchRpc"]).await;
    assert!(
        e.contains("NoSuchRpc") && e.contains("CreateContainer") && e.contains("GetGuestDetails"),
        "{e}"
    );

    let e = fails(&a, &["StartContainer", "{\"container_id\": "]).await;
    assert!(
        e.contains("StartContainer") && e.contains("not valid JSON"),
        "{e}"
    );
    let e = fails(&a, &["StartContainer", "{\"container_id\": 7}"]).await;
    assert!(e.contains("field container_id: invalid type"), "{e}");
    let e = fails(&a, &["StartContainer", "{\"containerId\": \"x\"}"]).await;
    assert!(
        e.contains("unknown field `containerId`") && e.contains("container_id"),
        "{e}"
    );
    let e = fails(&a, &["StartContainer", "[]"]).await;
    assert!(e.contains("must be a JSON object"), "{e}");

    let e = fails(&a, &["StartContainer", "{\"container_id\": \"missing\"}"]).await;
    assert!(
        e.starts_with("kata-ctl agent: StartContainer: NotFound: "),
        "{e}"
    );
    let e = fails(&a, &["attach", "stderr", "missing"]).await;
    assert!(e.contains("attach stderr missing: NotFound: "), "{e}");
}

//! The agent policy against a host-mode agent built with policy support
//! (`kata-agent-policy`): every request of agent.proto is checked, SetPolicy
//! follows the policy in force, a policy keeps state, the debug log replays
//! with `kata-ctl policy eval`, and a generated policy allows exactly its
//! container. Needs root (the agent runs real containers).

use std::path::Path;
use std::process::Output;

use kata_tests::agent::{self, process, spec, HostAgent};
use kata_tests::bin;
use serde_json::{json, Value};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ctl(args: &[&str]) -> Output {
    std::process::Command::new(bin("kata-ctl"))
        .args(args)
        .output()
        .expect("kata-ctl runs")
}

fn ctl_agent(a: &HostAgent, args: &[&str]) -> Output {
    let addr = a.addr.to_string();
    let mut all = vec!["agent", "--addr", &addr];
    all.extend_from_slice(args);
    ctl(&all)
}

/// The AgentService RPCs of agent.proto: (RPC name, request message).
fn agent_rpcs() -> Vec<(String, String)> {
    let proto = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/protos/agent.proto"),
    )
    .unwrap();
    kata_agent_policy::agent_rpcs(&proto)
}

fn denied(o: &Output, request: &str, what: &str) {
    let err = text(&o.stderr);
    assert!(
        !o.status.success(),
        "{what} went through: {}",
        text(&o.stdout)
    );
    assert!(
        err.contains("PermissionDenied")
            && err.contains(&format!("{request} is blocked by policy")),
        "{what}: {err}"
    );
}

/// Kata's CI check, through the running agent: with a policy that has no
/// rule at all, every AgentService request of agent.proto is refused by the
/// policy before it acts, and so is the attachment of every stdio stream.
#[tokio::test]
async fn every_agent_request_is_checked() {
    let a = HostAgent::start_with_policy("package agent_policy\n").await;
    let rpcs = agent_rpcs();
    assert!(rpcs.len() >= 34, "{rpcs:?}");
    let create = json!({"container_id": "c1", "oci_spec_json": spec(&a.rootfs, &["true"])});
    for (rpc, request) in &rpcs {
        let req = if rpc == "CreateContainer" {
            create.to_string()
        } else {
            "{}".to_string()
        };
        denied(&ctl_agent(&a, &[rpc, &req]), request, rpc);
    }
    for (stream, request) in [
        ("stdout", "ReadStreamRequest"),
        ("stderr", "ReadStreamRequest"),
        ("stdin", "WriteStreamRequest"),
    ] {
        denied(
            &ctl_agent(&a, &["attach", stream, "c1"]),
            request,
            &format!("attach {stream}"),
        );
    }
    // nothing acted: the agent is alive, no container exists
    let o = ctl_agent(&a, &["Check"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(!a.dir.path().join("state/c1").exists());
    // the debug log has one denied record per check
    let o = ctl(&["policy", "log", "--file", a.log().to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let records: Vec<Value> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), rpcs.len() + 3, "{records:?}");
    assert!(records.iter().all(|r| r["allowed"] == false));
    let c = records
        .iter()
        .find(|r| r["request"] == "CreateContainerRequest")
        .unwrap();
    assert_eq!(
        c["input"]["OCI"]["process"]["args"],
        json!(["true"]),
        "the policy sees the spec as an object"
    );
}

/// A policy that remembers containers (a decision's ops) and allows only
/// `echo` in them.
const STATEFUL: &str = r#"package agent_policy

default CreateContainerRequest := false
default ExecProcessRequest := false
default StartContainerRequest := true
default RemoveContainerRequest := true
default WaitProcessRequest := true
default SignalProcessRequest := true
default ReadStreamRequest := true
default WriteStreamRequest := true
default SetPolicyRequest := true

CreateContainerRequest := {"allowed": true, "ops": ops} {
    not data.pstate.ids[input.container_id]
    ops := [{"op": "add", "path": "/pstate", "value": {"ids": {input.container_id: true}}}]
}

ExecProcessRequest {
    data.pstate.ids[input.container_id]
    input.process.args[0] == "echo"
}
"#;

#[tokio::test]
async fn set_policy_state_and_replay() {
    let mut a = HostAgent::start_with_policy(STATEFUL).await;
    let mut c = a.client.clone();
    agent::create(&mut c, "c1", &spec(&a.rootfs, &["sleep", "600"]))
        .await
        .unwrap();
    agent::start(&mut c, "c1").await.unwrap();
    agent::exec(&mut c, "c1", "e1", &process(&["echo", "hi"], false))
        .await
        .unwrap();
    let e = agent::exec(&mut c, "c1", "e2", &process(&["cat", "/etc/secret"], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message()
            .contains("ExecProcessRequest is blocked by policy"),
        "{e}"
    );
    // the state: a second create of c1 is refused by the policy itself
    let e = agent::create(&mut c, "c1", &spec(&a.rootfs, &["true"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    // an unparsable policy: InvalidArgument with the parser's message, the
    // old policy stays
    let o = ctl_agent(
        &a,
        &["SetPolicy", r#"{"policy": "package agent_policy\nx := {"}"#],
    );
    let err = text(&o.stderr);
    assert!(
        !o.status.success() && err.contains("InvalidArgument"),
        "{err}"
    );
    assert!(err.contains("does not parse"), "{err}");
    let e = agent::exec(&mut c, "c1", "e3", &process(&["cat", "/etc/secret"], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // an oversized one: the limit, by name
    let big = json!({"policy": format!("package agent_policy\n#{}", "x".repeat(9 << 20))});
    let f = a.dir.path().join("big.json");
    std::fs::write(&f, big.to_string()).unwrap();
    let o = ctl_agent(&a, &["SetPolicy", &format!("@{}", f.display())]);
    let err = text(&o.stderr);
    assert!(!o.status.success() && err.contains("limit"), "{err}");

    // replay: the same policy gives the recorded decisions, another does not
    let inputs = a.dir.path().join("inputs.jsonl");
    let o = ctl(&["policy", "log", "--file", a.log().to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    std::fs::write(&inputs, &o.stdout).unwrap();
    let n = text(&o.stdout).lines().count();
    assert!(n >= 8, "{}", text(&o.stdout));
    let policy = a.dir.path().join("policy.rego");
    let o = ctl(&[
        "policy",
        "eval",
        policy.to_str().unwrap(),
        inputs.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    assert!(
        text(&o.stdout).contains(&format!("{n} decisions as recorded, 0 different")),
        "{}",
        text(&o.stdout)
    );
    let open = a.dir.path().join("open.rego");
    std::fs::write(&open, kata_agent_policy::ALLOW_ALL).unwrap();
    let o = ctl(&[
        "policy",
        "eval",
        open.to_str().unwrap(),
        inputs.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stdout));
    assert!(text(&o.stdout).contains("ExecProcessRequest allowed (recorded: denied) DIFFERS"));

    // a policy without SetPolicy: the next SetPolicy is refused
    let closed = "package agent_policy\ndefault ExecProcessRequest := false\n\
                  default RemoveContainerRequest := true\ndefault SignalProcessRequest := true\n\
                  default WaitProcessRequest := true\n";
    let o = ctl_agent(&a, &["SetPolicy", &json!({"policy": closed}).to_string()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    denied(
        &ctl_agent(
            &a,
            &[
                "SetPolicy",
                &json!({"policy": kata_agent_policy::ALLOW_ALL}).to_string(),
            ],
        ),
        "SetPolicyRequest",
        "a second SetPolicy",
    );
    let e = agent::exec(&mut c, "c1", "e4", &process(&["echo", "hi"], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    agent::remove(&mut c, "c1").await.unwrap();
    a.stop().await;
}

/// `kata-ctl policy generate`: the container of the spec is allowed; the
/// same spec with any one of args, env, user, a capability, a mount or a
/// read-only flag changed is not; ExecProcess only for the listed command.
#[tokio::test]
async fn a_generated_policy_allows_exactly_its_container() {
    let d = tempfile::tempdir().unwrap();
    // the rootfs path is rewritten by the shim: any path will do here
    let base = spec(Path::new("/placeholder/rootfs"), &["sleep", "600"]);
    std::fs::write(d.path().join("config.json"), base.to_string()).unwrap();
    let out = d.path().join("gen.rego");
    let o = ctl(&[
        "policy",
        "generate",
        d.path().to_str().unwrap(),
        "--allow-exec",
        r#"["echo", "hi"]"#,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let gen = std::fs::read_to_string(&out).unwrap();
    let mut a = HostAgent::start_with_policy(&gen).await;
    let mut c = a.client.clone();
    let with_root = |mut s: Value| {
        s["root"]["path"] = json!(a.rootfs);
        s
    };
    agent::create(&mut c, "c1", &with_root(base.clone()))
        .await
        .unwrap();
    agent::start(&mut c, "c1").await.unwrap();
    agent::exec(&mut c, "c1", "e1", &process(&["echo", "hi"], false))
        .await
        .unwrap();
    let e = agent::exec(&mut c, "c1", "e2", &process(&["sh"], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");

    type Change = fn(&mut Value);
    let changes: [(&str, Change); 7] = [
        ("args", |s| s["process"]["args"] = json!(["sleep", "601"])),
        ("env", |s| {
            s["process"]["env"]
                .as_array_mut()
                .unwrap()
                .push(json!("X=1"))
        }),
        ("user", |s| s["process"]["user"]["uid"] = json!(1000)),
        ("capability", |s| {
            s["process"]["capabilities"]["bounding"]
                .as_array_mut()
                .unwrap()
                .push(json!("CAP_SYS_ADMIN"))
        }),
        ("mount", |s| {
            s["mounts"]
                .as_array_mut()
                .unwrap()
                .push(json!({"destination": "/data", "type": "tmpfs", "source": "tmpfs"}))
        }),
        ("a mount's read-only flag", |s| {
            s["mounts"][5]["options"] = json!(["nosuid", "noexec", "nodev"])
        }),
        ("the rootfs read-only flag", |s| {
            s["root"]["readonly"] = json!(true)
        }),
    ];
    for (n, (what, change)) in changes.iter().enumerate() {
        let mut s = with_root(base.clone());
        change(&mut s);
        let e = agent::create(&mut c, &format!("v{n}"), &s)
            .await
            .expect_err(what);
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{what}: {e}");
        assert!(
            e.message()
                .contains("CreateContainerRequest is blocked by policy"),
            "{what}: {e}"
        );
    }
    denied(
        &ctl_agent(
            &a,
            &[
                "SetPolicy",
                &json!({"policy": kata_agent_policy::ALLOW_ALL}).to_string(),
            ],
        ),
        "SetPolicyRequest",
        "SetPolicy under a generated policy",
    );
    agent::remove(&mut c, "c1").await.unwrap();
    a.stop().await;
}

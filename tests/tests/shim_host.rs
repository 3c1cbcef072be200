//! The shim's task logic without QEMU: containerd's task API driven directly
//! on the shim's service, whose pod is a real kata-agent running on this host
//! (`kata-agent --listen unix://...`). The share, the mounts, the agent calls,
//! stdio, exit codes, events and error codes are the shim's real ones; only
//! the VM is missing. Needs root (mounts, the agent's containers).

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kata_shim::api;
use kata_shim::protos::ttrpc::r#async::TtrpcContext;
use kata_shim::protos::ttrpc::Code;
use kata_shim::service::{Events, PodSource, Service};
use kata_shim::Task;
use kata_tests::agent::{spec, HostAgent};
use serde_json::Value;

type Recorded = Arc<Mutex<Vec<(String, String)>>>;

struct Harness {
    svc: Service,
    events: Recorded,
    agent: HostAgent,
    dir: tempfile::TempDir,
    pod: String,
}

impl Drop for Harness {
    /// A test that panicked before `finish` leaves no pod directory and no
    /// mounts behind (deepest mounts first).
    fn drop(&mut self) {
        let dir = kata_proto::paths::SandboxPaths::new(&self.pod).dir;
        if !dir.exists() {
            return;
        }
        let mut ms = kata_tests::containerd::mounts_under(&dir);
        ms.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in ms {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn ctx() -> TtrpcContext {
    TtrpcContext {
        mh: Default::default(),
        metadata: Default::default(),
        timeout_nano: 0,
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, kata_shim::protos::ttrpc::Error>) -> (Code, String) {
    match r.expect_err("the call must fail") {
        kata_shim::protos::ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        e => panic!("not a status: {e:?}"),
    }
}

impl Harness {
    /// A service whose pod `pod` is the host agent; `config` is the kata-rs
    /// configuration TOML the pod is created with.
    async fn start(pod: &str, config: &str) -> Harness {
        let agent = HostAgent::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("configuration.toml"), config).unwrap();
        let events: Recorded = Arc::default();
        let svc = Service::with(
            "kata-rs-test",
            Events::Recorded(events.clone()),
            PodSource::HostAgent(agent.addr.clone()),
            Arc::default(),
        );
        Harness {
            svc,
            events,
            agent,
            dir,
            pod: pod.into(),
        }
    }

    /// A bundle for container `id` running `args`; its stdout is a FIFO the
    /// harness reads (returned).
    fn bundle(&self, id: &str, args: &[&str]) -> (api::CreateTaskRequest, std::fs::File) {
        let b = self.dir.path().join(id);
        std::fs::create_dir_all(&b).unwrap();
        let mut s: Value = spec(&self.agent.rootfs, args);
        if id != self.pod {
            s["annotations"] = serde_json::json!({
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.sandbox-id": self.pod,
            });
        }
        std::fs::write(b.join("config.json"), s.to_string()).unwrap();
        let out = fifo(&b.join("stdout"));
        let mut options = kata_shim::protos::protobuf::well_known_types::any::Any::new();
        options.type_url = "type.googleapis.com/runtimeoptions.v1.Options".into();
        let path = self.dir.path().join("configuration.toml");
        let p = path.display().to_string();
        options.value = [vec![0x12, p.len() as u8], p.into_bytes()].concat();
        let req = api::CreateTaskRequest {
            id: id.into(),
            bundle: b.display().to_string(),
            stdout: b.join("stdout").display().to_string(),
            options: Some(options).into(),
            ..Default::default()
        };
        (req, out)
    }

    async fn run(&self, id: &str, args: &[&str]) -> std::fs::File {
        let (req, out) = self.bundle(id, args);
        self.svc.create(&ctx(), req).await.expect("create");
        self.svc.start(&ctx(), start(id, "")).await.expect("start");
        out
    }

    async fn wait(&self, id: &str, exec_id: &str) -> u32 {
        let r = self
            .svc
            .wait(
                &ctx(),
                api::WaitRequest {
                    id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                },
            )
            .await
            .expect("wait");
        r.exit_status
    }

    async fn kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
    ) -> Result<api::Empty, kata_shim::protos::ttrpc::Error> {
        self.svc
            .kill(
                &ctx(),
                api::KillRequest {
                    id: id.into(),
                    exec_id: exec_id.into(),
                    signal,
                    ..Default::default()
                },
            )
            .await
    }

    async fn delete(
        &self,
        id: &str,
    ) -> Result<api::DeleteResponse, kata_shim::protos::ttrpc::Error> {
        self.svc
            .delete(
                &ctx(),
                api::DeleteRequest {
                    id: id.into(),
                    ..Default::default()
                },
            )
            .await
    }

    fn topics(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Deletes the pod owner; the pod's directory and mounts must be gone.
    async fn finish(self) {
        let _ = self.kill(&self.pod, "", 9).await;
        let _ = self.wait(&self.pod, "").await;
        self.delete(&self.pod).await.expect("delete the pod owner");
        let paths = kata_proto::paths::SandboxPaths::new(&self.pod);
        assert!(!paths.dir.exists(), "{} is left", paths.dir.display());
        assert!(
            kata_tests::containerd::mounts_under(&paths.dir).is_empty(),
            "mounts left under {}",
            paths.dir.display()
        );
    }
}

fn start(id: &str, exec_id: &str) -> api::StartRequest {
    api::StartRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    }
}

/// A FIFO at `p`, opened read-write and non-blocking (never blocks the
/// writer's open, reads what is there).
fn fifo(p: &Path) -> std::fs::File {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
        .unwrap()
}

/// What the FIFO holds once `until` is in it (or 10 s passed).
async fn read_until(f: &mut std::fs::File, until: &str) -> String {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !String::from_utf8_lossy(&got).contains(until) {
        let mut buf = [0u8; 4096];
        match f.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn unique(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

#[tokio::test]
async fn run_exec_kill_wait_delete_and_events() {
    let pod = unique("shost1");
    let h = Harness::start(&pod, "").await;
    let mut out = h
        .run(
            &pod,
            &["sh", "-c", "echo hello-from-$(hostname); sleep 600"],
        )
        .await;
    let got = read_until(&mut out, "hello").await;
    assert!(got.contains("hello-from-kata-test"), "{got:?}");

    // an exec: its output and exit code
    let exec_out = h.dir.path().join("exec.out");
    let mut eout = fifo(&exec_out);
    let process = serde_json::json!({
        "args": ["sh", "-c", "echo exec-out; exit 3"], "cwd": "/",
        "env": ["PATH=/bin:/usr/bin"], "user": {"uid": 0, "gid": 0}
    });
    let mut spec_any = kata_shim::protos::protobuf::well_known_types::any::Any::new();
    spec_any.value = process.to_string().into_bytes();
    h.svc
        .exec(
            &ctx(),
            api::ExecProcessRequest {
                id: pod.clone(),
                exec_id: "e1".into(),
                stdout: exec_out.display().to_string(),
                spec: Some(spec_any).into(),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    h.svc
        .start(&ctx(), start(&pod, "e1"))
        .await
        .expect("start e1");
    assert_eq!(h.wait(&pod, "e1").await, 3);
    assert!(read_until(&mut eout, "exec-out").await.contains("exec-out"));

    // error paths, each with containerd's code
    let (c, m) = code(h.svc.start(&ctx(), start(&pod, "")).await);
    assert_eq!(c, Code::FAILED_PRECONDITION, "{m}");
    let (c, m) = code(h.kill("nosuch", "", 9).await);
    assert_eq!(c, Code::NOT_FOUND, "{m}");
    let (c, m) = code(h.kill(&pod, "nosuch", 9).await);
    assert_eq!(c, Code::NOT_FOUND, "{m}");
    let (c, m) = code(h.delete(&pod).await);
    assert_eq!(c, Code::FAILED_PRECONDITION, "{m}");

    // SIGKILL of the init: 137
    h.kill(&pod, "", 9).await.expect("kill");
    assert_eq!(h.wait(&pod, "").await, 137);
    let topics = h.topics();
    for t in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
    ] {
        assert!(topics.iter().any(|x| x == t), "{t} not in {topics:?}");
    }
    h.finish().await;
}

#[tokio::test]
async fn a_member_container_a_missing_program_and_an_agent_not_found() {
    let pod = unique("shost2");
    let h = Harness::start(&pod, "").await;
    let _out = h.run(&pod, &["sleep", "600"]).await;

    // a program that is not in the rootfs: refused at create, nothing left
    let (req, _o) = h.bundle("m-bad", &["/no/such/program"]);
    let (c, m) = code(h.svc.create(&ctx(), req).await);
    assert_ne!(c, Code::OK);
    assert!(
        m.contains("guest agent:") && m.contains("/no/such/program"),
        "{m}"
    );
    let paths = kata_proto::paths::SandboxPaths::new(&pod);
    assert!(!paths.host_mounts_dir().join("m-bad").exists());

    // a member; then the agent forgets it behind the shim's back: the
    // agent's NotFound reaches containerd as NotFound
    let mut out = h.run("m1", &["sh", "-c", "echo member; sleep 600"]).await;
    assert!(read_until(&mut out, "member").await.contains("member"));
    let mut agent = h.agent.client.clone();
    agent
        .signal_process(kata_proto::agent::SignalProcessRequest {
            container_id: "m1".into(),
            exec_id: String::new(),
            signal: 9,
            all: true,
        })
        .await
        .unwrap();
    assert_eq!(h.wait("m1", "").await, 137);
    agent
        .remove_container(kata_proto::agent::RemoveContainerRequest {
            container_id: "m1".into(),
            timeout: 0,
        })
        .await
        .unwrap();
    let (c, m) = code(
        h.svc
            .stats(
                &ctx(),
                api::StatsRequest {
                    id: "m1".into(),
                    ..Default::default()
                },
            )
            .await,
    );
    assert_eq!(c, Code::NOT_FOUND, "{m}");
    assert!(m.starts_with("guest agent:"), "{m}");
    h.delete("m1").await.expect("delete m1");
    assert!(!paths.host_mounts_dir().join("m1").exists());
    h.finish().await;
}

/// A guest whose agent stops answering: every call fails with
/// DeadlineExceeded within `agent.kata.request_timeout_ms`, and delete
/// leaves nothing once the agent is back.
#[tokio::test]
async fn a_silent_agent_gives_deadline_exceeded_within_the_bound() {
    let pod = unique("shost3");
    let h = Harness::start(&pod, "[agent.kata]\nrequest_timeout_ms = 1000\n").await;
    let _out = h.run(&pod, &["sleep", "600"]).await;
    let (req, _o) = h.bundle("m2", &["sleep", "600"]);
    let agent_pid = nix::unistd::Pid::from_raw(h.agent.child.id() as i32);
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let t0 = Instant::now();
    let (c_create, m_create) = code(h.svc.create(&ctx(), req).await);
    let create_took = t0.elapsed();
    let t1 = Instant::now();
    let (c_kill, m_kill) = code(h.kill(&pod, "", 15).await);
    let kill_took = t1.elapsed();
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(c_create, Code::DEADLINE_EXCEEDED, "{m_create}");
    assert_eq!(c_kill, Code::DEADLINE_EXCEEDED, "{m_kill}");
    // the bound plus the rollback's own (equally bounded) call, with slack
    assert!(create_took < Duration::from_secs(5), "{create_took:?}");
    assert!(kill_took < Duration::from_secs(3), "{kill_took:?}");
    let paths = kata_proto::paths::SandboxPaths::new(&pod);
    assert!(
        !paths.host_mounts_dir().join("m2").exists(),
        "the failed create left its mounts"
    );
    h.finish().await;
}

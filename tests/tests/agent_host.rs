//! The agent API through a host-mode agent (`kata-agent --listen unix://...`):
//! real namespaces, cgroups, pipes and terminals on the host, no VM. Needs
//! root.

use std::time::Duration;

use kata_proto::agent::*;
use kata_proto::stdio::Which;
use kata_tests::agent::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

fn with_args(mut s: Value, args: &[&str]) -> Value {
    s["process"]["args"] = json!(args);
    s
}

/// Children of the agent that are still alive (anything but zombies).
fn agent_children(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
            for p in c.split_whitespace() {
                if let Ok(p) = p.parse::<u32>() {
                    if kata_tests::alive(p) {
                        let cmd = std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                            .unwrap_or_default();
                        out.push(format!("{p} {}", cmd.replace('\0', " ")));
                    }
                }
            }
        }
    }
    out
}

fn assert_clean(a: &HostAgent, ids: &[&str]) {
    let pid = a.child.id();
    let left = agent_children(pid);
    assert!(left.is_empty(), "processes left behind: {left:?}");
    for id in ids {
        let cg = format!("kata-rs-agent-{pid}/{id}");
        assert!(!cgroup_exists(&cg), "cgroup {cg} left behind");
    }
}

#[tokio::test]
async fn run_echo_exit_codes_stdin_stderr_and_sigkill() {
    let a = HostAgent::start().await;
    let mut c = a.client.clone();
    let base = spec(&a.rootfs, &["true"]);

    let o = run(
        &mut c,
        &a.addr,
        "echo",
        &with_args(base.clone(), &["echo", "hello", "world"]),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        (o.status, o.signal, o.stdout.as_str()),
        (0, 0, "hello world\n")
    );

    let o = run(
        &mut c,
        &a.addr,
        "exit1",
        &with_args(base.clone(), &["sh", "-c", "echo oops >&2; exit 1"]),
        None,
    )
    .await
    .unwrap();
    assert_eq!((o.status, o.stderr.as_str()), (1, "oops\n"));

    let input = b"line one\nline two\n".repeat(1000);
    let o = run(
        &mut c,
        &a.addr,
        "cat",
        &with_args(base.clone(), &["cat"]),
        Some(&input),
    )
    .await
    .unwrap();
    assert_eq!(o.status, 0);
    assert_eq!(o.stdout.as_bytes(), &input[..], "cat echoes stdin exactly");

    // output written just before exit is never lost
    let o = run(
        &mut c,
        &a.addr,
        "burst",
        &with_args(base.clone(), &["sh", "-c", "seq 1 20000; echo last"]),
        None,
    )
    .await
    .unwrap();
    assert!(
        o.stdout.ends_with("20000\nlast\n"),
        "tail of output: {:?}",
        &o.stdout[o.stdout.len().saturating_sub(30)..]
    );

    // SIGKILL gives 137
    create(
        &mut c,
        "killed",
        &with_args(base.clone(), &["sleep", "1000"]),
    )
    .await
    .unwrap();
    let out = collect(stream(&a.addr, Which::Stdout, "killed", "").await);
    start(&mut c, "killed").await.unwrap();
    signal(&mut c, "killed", "", libc::SIGKILL, false)
        .await
        .unwrap();
    assert_eq!(wait(&mut c, "killed", "").await, (137, libc::SIGKILL));
    assert!(out.await.unwrap().is_empty());
    // signalling an exited process is NotFound
    let e = signal(&mut c, "killed", "", libc::SIGTERM, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    remove(&mut c, "killed").await.unwrap();
    assert_clean(&a, &["echo", "exit1", "cat", "burst", "killed"]);
}

#[tokio::test]
async fn terminal_with_resize() {
    let a = HostAgent::start().await;
    let mut c = a.client.clone();
    let mut s = with_args(spec(&a.rootfs, &[]), &["sh"]);
    s["process"]["terminal"] = json!(true);
    create(&mut c, "tty", &s).await.unwrap();
    // a terminal has no separate stderr
    let e = kata_proto::stdio::attach(&a.addr, Which::Stderr, "tty", "", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("InvalidArgument"), "{e}");
    let out = collect(stream(&a.addr, Which::Stdout, "tty", "").await);
    let mut input = stream(&a.addr, Which::Stdin, "tty", "").await;
    start(&mut c, "tty").await.unwrap();
    c.tty_win_resize(TtyWinResizeRequest {
        container_id: "tty".into(),
        exec_id: String::new(),
        row: 37,
        column: 101,
    })
    .await
    .unwrap();
    input.write_all(b"stty size; tty; exit 3\n").await.unwrap();
    assert_eq!(wait(&mut c, "tty", "").await, (3, 0));
    let text = String::from_utf8_lossy(&out.await.unwrap()).into_owned();
    assert!(
        text.contains("37 101"),
        "stty size sees the resize: {text:?}"
    );
    // runc's convention: the terminal is also /dev/console
    assert!(
        text.contains("\n/dev/console") || text.contains("\n/dev/pts/"),
        "the process has a terminal: {text:?}"
    );
    // resizing a process without a terminal is refused
    create(&mut c, "notty", &with_args(spec(&a.rootfs, &[]), &["true"]))
        .await
        .unwrap();
    let e = c
        .tty_win_resize(TtyWinResizeRequest {
            container_id: "notty".into(),
            exec_id: String::new(),
            row: 1,
            column: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    remove(&mut c, "notty").await.unwrap();
    remove(&mut c, "tty").await.unwrap();
    assert_clean(&a, &["tty", "notty"]);
}

#[tokio::test]
async fn exec_signals_and_process_list() {
    let a = HostAgent::start().await;
    let mut c = a.client.clone();
    create(
        &mut c,
        "box",
        &with_args(spec(&a.rootfs, &[]), &["sleep", "1000"]),
    )
    .await
    .unwrap();
    let e = exec(&mut c, "box", "early", &process(&["true"], false))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "exec before start: {e:?}"
    );
    start(&mut c, "box").await.unwrap();

    // exec sees the container's namespaces and rootfs
    exec(
        &mut c,
        "box",
        "e1",
        &process(
            &["sh", "-c", "echo $$; hostname; cat /etc/passwd | head -1"],
            false,
        ),
    )
    .await
    .unwrap();
    let out = collect(stream(&a.addr, Which::Stdout, "box", "e1").await);
    assert_eq!(wait(&mut c, "box", "e1").await, (0, 0));
    let text = String::from_utf8_lossy(&out.await.unwrap()).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].parse::<u32>().unwrap() > 1,
        "exec is not the container's pid 1: {text}"
    );
    assert_eq!(lines[1], "kata-test");
    assert_eq!(lines[2], "root:x:0:0:root:/root:/bin/sh");

    // an exec id in use is AlreadyExists; a missing program is NotFound
    exec(&mut c, "box", "long", &process(&["sleep", "1000"], false))
        .await
        .unwrap();
    let e = exec(&mut c, "box", "long", &process(&["true"], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = exec(&mut c, "box", "nope", &process(&["no-such-program"], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // exec with a terminal
    exec(
        &mut c,
        "box",
        "t",
        &process(&["sh", "-c", "test -t 0 && echo tty"], true),
    )
    .await
    .unwrap();
    let out = collect(stream(&a.addr, Which::Stdout, "box", "t").await);
    assert_eq!(wait(&mut c, "box", "t").await, (0, 0));
    assert!(String::from_utf8_lossy(&out.await.unwrap()).contains("tty"));

    // the process list
    let l = c
        .list_processes(ListProcessesRequest {
            container_id: "box".into(),
            format: "table".into(),
            args: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        l.pids.len(),
        2,
        "init and the long exec: {:?}",
        String::from_utf8_lossy(&l.process_list)
    );
    assert!(String::from_utf8_lossy(&l.process_list).contains("sleep 1000"));

    // a signal to one process
    signal(&mut c, "box", "long", libc::SIGTERM, false)
        .await
        .unwrap();
    assert_eq!(
        wait(&mut c, "box", "long").await,
        (128 + libc::SIGTERM, libc::SIGTERM)
    );
    // a signal to all: init and a new exec both die
    exec(&mut c, "box", "e2", &process(&["sleep", "1000"], false))
        .await
        .unwrap();
    signal(&mut c, "box", "", libc::SIGKILL, true)
        .await
        .unwrap();
    assert_eq!(wait(&mut c, "box", "e2").await, (137, libc::SIGKILL));
    assert_eq!(wait(&mut c, "box", "").await, (137, libc::SIGKILL));
    // exec into a stopped container
    let e = exec(&mut c, "box", "late", &process(&["true"], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    remove(&mut c, "box").await.unwrap();
    let e = start(&mut c, "box").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_clean(&a, &["box"]);
}

#[tokio::test]
async fn pause_resume_stats_update_and_pids_limit() {
    let a = HostAgent::start().await;
    let mut c = a.client.clone();
    let mut s = with_args(
        spec(&a.rootfs, &[]),
        &["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; usleep 20000 2>/dev/null || sleep 0.02; done"],
    );
    s["linux"]["resources"]["pids"] = json!({"limit": 20});
    create(&mut c, "p", &s).await.unwrap();
    start(&mut c, "p").await.unwrap();
    let counter = a.rootfs.join("tmp/n");
    let read = || {
        std::fs::read_to_string(&counter)
            .unwrap_or_default()
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    // the first count can take a while on a loaded machine: poll, bounded
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while read() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(read() > 0, "the container counts");

    let st1 = c
        .stats_container(StatsContainerRequest {
            container_id: "p".into(),
        })
        .await
        .unwrap()
        .into_inner();
    c.pause_container(PauseContainerRequest {
        container_id: "p".into(),
    })
    .await
    .unwrap();
    let e = exec(&mut c, "p", "x", &process(&["true"], false))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "exec into a paused container"
    );
    let frozen = read();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(read(), frozen, "a paused container does not run");
    let e = c
        .pause_container(PauseContainerRequest {
            container_id: "p".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    c.resume_container(ResumeContainerRequest {
        container_id: "p".into(),
    })
    .await
    .unwrap();
    // it counts again; on a loaded machine that can take a while: poll, bounded
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while read() <= frozen && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(read() > frozen, "a resumed container runs again");

    let st2 = c
        .stats_container(StatsContainerRequest {
            container_id: "p".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let cpu = |s: &StatsContainerResponse| {
        s.cgroup_stats
            .as_ref()
            .unwrap()
            .cpu_stats
            .as_ref()
            .unwrap()
            .cpu_usage
            .as_ref()
            .unwrap()
            .total_usage
    };
    assert!(
        cpu(&st2) > cpu(&st1),
        "cpu usage moves: {} then {}",
        cpu(&st1),
        cpu(&st2)
    );
    let cg = st2.cgroup_stats.as_ref().unwrap();
    let mem = cg
        .memory_stats
        .as_ref()
        .unwrap()
        .usage
        .as_ref()
        .unwrap()
        .usage;
    assert!(mem > 0, "memory usage is reported");
    let pids = cg.pids_stats.as_ref().unwrap();
    assert!(pids.current >= 1 && pids.limit == 20, "pids: {pids:?}");

    // UpdateContainer changes the limit; the limit is enforced
    c.update_container(UpdateContainerRequest {
        container_id: "p".into(),
        resources: Some(LinuxResources {
            oci_resources_json: json!({"pids": {"limit": 5}}).to_string(),
        }),
    })
    .await
    .unwrap();
    let st3 = c
        .stats_container(StatsContainerRequest {
            container_id: "p".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st3.cgroup_stats.unwrap().pids_stats.unwrap().limit, 5);
    assert_pids_limit_holds(&mut c, &a.addr, "p", 5).await;
    wait(&mut c, "p", "").await;
    // bad resources are refused
    let e = c
        .update_container(UpdateContainerRequest {
            container_id: "p".into(),
            resources: Some(LinuxResources {
                oci_resources_json: "{not json".into(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    remove(&mut c, "p").await.unwrap();
    assert_clean(&a, &["p"]);
}

#[tokio::test]
async fn memory_limit_oom_kills_and_reports() {
    let a = HostAgent::start().await;
    let mut c = a.client.clone();
    let mut oom = a.client.clone();
    let events = tokio::spawn(async move {
        oom.get_oom_event(GetOomEventRequest {})
            .await
            .map(|r| r.into_inner().container_id)
    });
    let mut s = with_args(
        spec(&a.rootfs, &[]),
        &[
            "sh",
            "-c",
            "head -c 300000000 /dev/zero | tail -c 200000000 > /dev/null",
        ],
    );
    s["linux"]["resources"]["memory"] = json!({"limit": 32 << 20});
    let o = run(&mut c, &a.addr, "hog", &s, None).await.unwrap();
    assert_ne!(o.status, 0, "a process over the memory limit is killed");
    let id = tokio::time::timeout(Duration::from_secs(20), events)
        .await
        .expect("an OOM event within 20 s")
        .unwrap()
        .expect("GetOOMEvent");
    assert_eq!(id, "hog");
    assert_clean(&a, &["hog"]);
}

#[tokio::test]
async fn isolation_readonly_masked_user_seccomp_and_process_settings() {
    let a = HostAgent::start().await;
    let mut c = a.client.clone();
    let base = spec(&a.rootfs, &[]);

    // read-only rootfs
    let mut s = with_args(base.clone(), &["sh", "-c", "touch /x"]);
    s["root"]["readonly"] = json!(true);
    let o = run(&mut c, &a.addr, "ro", &s, None).await.unwrap();
    assert_ne!(o.status, 0);
    assert!(o.stderr.contains("Read-only file system"), "{:?}", o.stderr);

    // masked paths read as empty
    let o = run(
        &mut c,
        &a.addr,
        "mask",
        &with_args(
            base.clone(),
            &[
                "sh",
                "-c",
                "cat /etc/secret; cat /proc/kcore | wc -c; ls /sys/firmware | wc -l",
            ],
        ),
        None,
    )
    .await
    .unwrap();
    assert_eq!(o.stdout, "0\n0\n", "masked: {o:?}");

    // read-only paths
    let o = run(
        &mut c,
        &a.addr,
        "rop",
        &with_args(
            base.clone(),
            &["sh", "-c", "echo 1 > /proc/sys/kernel/panic"],
        ),
        None,
    )
    .await
    .unwrap();
    assert_ne!(o.status, 0, "/proc/sys is read-only: {o:?}");

    // a non-root user, groups, umask, cwd, env, rlimits, no_new_privs, oom score
    let mut s = with_args(
        base.clone(),
        &["sh", "-c", "id; umask; pwd; echo $FOO $HOME; ulimit -n; grep NoNewPrivs /proc/self/status; cat /proc/self/oom_score_adj; touch /root/x"],
    );
    s["process"]["user"] =
        json!({"uid": 1000, "gid": 1000, "additionalGids": [65534], "umask": 63});
    s["process"]["cwd"] = json!("/tmp");
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar"]);
    s["process"]["oomScoreAdj"] = json!(500);
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 256, "soft": 200}]);
    let o = run(&mut c, &a.addr, "user", &s, None).await.unwrap();
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(
        lines[0], "uid=1000(user) gid=1000(user) groups=65534(nogroup)",
        "{o:?}"
    );
    assert_eq!(
        &lines[1..],
        &[
            "0077",
            "/tmp",
            "bar /home/user",
            "200",
            "NoNewPrivs:\t1",
            "500"
        ],
        "{o:?}"
    );
    assert!(
        o.stderr.contains("Permission denied"),
        "a non-root user cannot write /root: {o:?}"
    );

    // capabilities: the default set, effective, as runc gives
    let o = run(
        &mut c,
        &a.addr,
        "caps",
        &with_args(base.clone(), &["grep", "Cap", "/proc/self/status"]),
        None,
    )
    .await
    .unwrap();
    assert!(
        o.stdout.contains("CapEff:\t00000000a80425fb"),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("CapBnd:\t00000000a80425fb"),
        "{}",
        o.stdout
    );

    // seccomp: mkdir denied with EPERM, everything else allowed
    let mut s = with_args(
        base.clone(),
        &["sh", "-c", "mkdir /tmp/d; echo status $?; echo still alive"],
    );
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let o = run(&mut c, &a.addr, "seccomp", &s, None).await.unwrap();
    assert!(
        o.stdout.contains("status 1") && o.stdout.contains("still alive"),
        "{o:?}"
    );
    assert!(o.stderr.contains("Operation not permitted"), "{o:?}");
    assert!(!a.rootfs.join("tmp/d").exists());

    // hostname and a namespaced sysctl
    let mut s = with_args(
        base.clone(),
        &["sh", "-c", "hostname; cat /proc/sys/kernel/msgmax"],
    );
    s["linux"]["sysctl"] = json!({"kernel.msgmax": "12345"});
    let o = run(&mut c, &a.addr, "sysctl", &s, None).await.unwrap();
    assert_eq!(o.stdout, "kata-test\n12345\n", "{o:?}");
    assert_clean(
        &a,
        &["ro", "mask", "rop", "user", "caps", "seccomp", "sysctl"],
    );
}

#[tokio::test]
async fn bad_input_is_refused_and_leaves_nothing() {
    let a = HostAgent::start().await;
    let mut c = a.client.clone();
    let good = with_args(spec(&a.rootfs, &[]), &["sleep", "1000"]);
    let refused = |r: Result<(), tonic::Status>, code: Code, needle: &str| {
        let e = r.expect_err("must be refused");
        assert_eq!(e.code(), code, "{e:?}");
        assert!(
            e.message().contains(needle),
            "the message names the problem ({needle}): {}",
            e.message()
        );
    };

    let mut s = good.clone();
    s["root"]["path"] = json!("/no/such/rootfs");
    refused(
        create(&mut c, "b1", &s).await,
        Code::InvalidArgument,
        "/no/such/rootfs",
    );

    let mut s = good.clone();
    s["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "bogus"}]);
    refused(
        create(&mut c, "b2", &s).await,
        Code::InvalidArgument,
        "bogus",
    );

    for dest in ["../../etc", "/a/../../etc", "relative"] {
        let mut s = good.clone();
        s["mounts"] = json!([{"destination": dest, "type": "tmpfs", "source": "tmpfs"}]);
        refused(create(&mut c, "b3", &s).await, Code::InvalidArgument, dest);
    }

    let mut s = good.clone();
    s["process"]["user"]["uid"] = json!(4294967295u64);
    refused(create(&mut c, "b4", &s).await, Code::InvalidArgument, "uid");
    let mut s = good.clone();
    s["process"]["user"]["uid"] = json!(99999999999u64);
    refused(
        create(&mut c, "b5", &s).await,
        Code::InvalidArgument,
        "does not parse",
    );

    refused(
        create(&mut c, "bad id!", &good).await,
        Code::InvalidArgument,
        "bad id!",
    );
    refused(
        create(&mut c, "b6", &json!({"ociVersion": "1.0.2"})).await,
        Code::InvalidArgument,
        "root",
    );
    let mut s = good.clone();
    s["process"]["args"] = json!([]);
    refused(
        create(&mut c, "b7", &s).await,
        Code::InvalidArgument,
        "args",
    );
    let mut s = good.clone();
    s["mounts"] = json!([{"destination": "/data", "type": "bind", "source": "/no/such/source", "options": ["rbind"]}]);
    refused(
        create(&mut c, "b8", &s).await,
        Code::InvalidArgument,
        "/no/such/source",
    );
    // a program that does not exist fails at create (as runc), with NotFound,
    // by absolute path and by name
    let s = with_args(good.clone(), &["/bin/nope"]);
    refused(create(&mut c, "b9", &s).await, Code::NotFound, "/bin/nope");
    let s = with_args(good.clone(), &["nope-in-path"]);
    refused(
        create(&mut c, "b9", &s).await,
        Code::NotFound,
        "nope-in-path",
    );

    // duplicate ids
    create(&mut c, "dup", &good).await.unwrap();
    refused(
        create(&mut c, "dup", &good).await,
        Code::AlreadyExists,
        "dup",
    );
    start(&mut c, "dup").await.unwrap();
    refused(
        start(&mut c, "dup").await,
        Code::FailedPrecondition,
        "Running",
    );
    refused(
        exec(&mut c, "ghost", "e", &process(&["true"], false)).await,
        Code::NotFound,
        "ghost",
    );
    refused(
        exec(&mut c, "dup", "e", &json!({"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0, "additionalGids": [4294967295u64]}})).await,
        Code::InvalidArgument,
        "additionalGids",
    );
    remove(&mut c, "dup").await.unwrap();
    assert_clean(
        &a,
        &["b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9", "dup"],
    );
    // the stdio port refuses unknown processes and garbage
    let e = kata_proto::stdio::attach(&a.addr, Which::Stdout, "ghost", "", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("NotFound"), "{e}");
    let mut raw = kata_proto::dialer::dial(
        &a.addr.with_port(kata_proto::paths::ports::STDIO),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    raw.write_all(&[b'x'; 2000]).await.unwrap();
    let mut reply = String::new();
    raw.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("ERR InvalidArgument"), "{reply}");
    // the agent of the test image is built without policy support
    refused(
        c.set_policy(kata_proto::agent::SetPolicyRequest {
            policy: "package agent_policy\n".into(),
        })
        .await
        .map(|_| ()),
        Code::Unimplemented,
        "built without policy support",
    );
}

#[tokio::test]
async fn sandbox_storages_and_sigterm_cleanup() {
    let mut a = HostAgent::start().await;
    let mut c = a.client.clone();
    // storages live below the agent's state directory (or /run/kata-containers)
    let mnt = a.dir.path().join("state/scratch");
    c.create_sandbox(CreateSandboxRequest {
        hostname: "ignored-in-host-mode".into(),
        dns: vec!["nameserver 192.0.2.1".into()],
        storages: vec![Storage {
            driver: "ephemeral".into(),
            source: "tmpfs".into(),
            fstype: "tmpfs".into(),
            options: vec!["size=1m".into()],
            mount_point: mnt.display().to_string(),
            ..Default::default()
        }],
        sandbox_id: "sbx1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mounts.contains(&mnt.display().to_string()),
        "the storage is mounted"
    );
    let resolv = std::fs::read_to_string(a.dir.path().join("state/sandbox/resolv.conf")).unwrap();
    assert_eq!(resolv, "nameserver 192.0.2.1\n");
    let e = c
        .create_sandbox(CreateSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = c
        .create_container(CreateContainerRequest {
            container_id: "s".into(),
            storages: vec![Storage {
                driver: "nfs".into(),
                mount_point: a.dir.path().join("state/x").display().to_string(),
                ..Default::default()
            }],
            oci_spec_json: with_args(spec(&a.rootfs, &[]), &["true"]).to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("nfs"), "{e:?}");
    // a create that fails after its storage was mounted unmounts it again
    let s2 = a.dir.path().join("state/s2");
    let mut bad = with_args(spec(&a.rootfs, &[]), &["true"]);
    bad["mounts"] = json!([{"destination": "/data", "type": "bind", "source": "/no/such/source", "options": ["rbind"]}]);
    let e = c
        .create_container(CreateContainerRequest {
            container_id: "s2".into(),
            storages: vec![Storage {
                driver: "ephemeral".into(),
                source: "tmpfs".into(),
                mount_point: s2.display().to_string(),
                ..Default::default()
            }],
            oci_spec_json: bad.to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&s2.display().to_string()),
        "the failed create's storage is unmounted"
    );
    assert!(
        !cgroup_exists("kata-rs-sbx1/s2"),
        "the failed create's cgroup is removed"
    );

    // a running container, then SIGTERM to the agent: everything ends
    create(
        &mut c,
        "long",
        &with_args(spec(&a.rootfs, &[]), &["sleep", "1000"]),
    )
    .await
    .unwrap();
    start(&mut c, "long").await.unwrap();
    assert!(cgroup_exists("kata-rs-sbx1/long"));
    a.stop().await;
    assert!(
        !cgroup_exists("kata-rs-sbx1/long"),
        "the container cgroup is removed"
    );
    assert!(
        !cgroup_exists("kata-rs-sbx1"),
        "the sandbox cgroup is removed"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&mnt.display().to_string()),
        "the storage is unmounted"
    );
}

#[tokio::test]
async fn close_stdin_rpc_and_destroy_sandbox() {
    let mut a = HostAgent::start().await;
    let mut c = a.client.clone();
    create(&mut c, "cat", &with_args(spec(&a.rootfs, &[]), &["cat"]))
        .await
        .unwrap();
    let out = collect(stream(&a.addr, Which::Stdout, "cat", "").await);
    let mut input = stream(&a.addr, Which::Stdin, "cat", "").await;
    start(&mut c, "cat").await.unwrap();
    input.write_all(b"before close\n").await.unwrap();
    input.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // CloseStdin ends the input even while the stream stays open
    c.close_stdin(CloseStdinRequest {
        container_id: "cat".into(),
        exec_id: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(wait(&mut c, "cat", "").await, (0, 0));
    assert_eq!(out.await.unwrap(), b"before close\n");
    drop(input);

    // DestroySandbox ends every container and the (host-mode) agent itself
    create(
        &mut c,
        "long",
        &with_args(spec(&a.rootfs, &[]), &["sleep", "1000"]),
    )
    .await
    .unwrap();
    start(&mut c, "long").await.unwrap();
    let pid = a.child.id();
    c.destroy_sandbox(DestroySandboxRequest {}).await.unwrap();
    let mut ended = false;
    for _ in 0..300 {
        if let Ok(Some(_)) = a.child.try_wait() {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ended, "the agent ends after DestroySandbox");
    assert!(!cgroup_exists(&format!("kata-rs-agent-{pid}/long")));
    assert!(!cgroup_exists(&format!("kata-rs-agent-{pid}")));
}

/// The host as an adversary (the agent-policy threat model): storages outside
/// the agent's bases, and symlinks swapped in where the agent mounts or
/// CopyFile writes, are refused; nothing is created, written, chowned or
/// mounted outside.
#[tokio::test]
async fn host_named_paths_never_lead_out_through_symlinks() {
    let a = HostAgent::start().await;
    let mut c = a.client.clone();
    let state = a.dir.path().join("state");
    let outside = a.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(state.join("shared")).unwrap();
    std::os::unix::fs::symlink(&outside, state.join("evil")).unwrap();
    std::os::unix::fs::symlink(&outside, state.join("shared/evil")).unwrap();
    let storage = |mount_point: &std::path::Path| Storage {
        driver: "ephemeral".into(),
        source: "tmpfs".into(),
        fstype: "tmpfs".into(),
        mount_point: mount_point.display().to_string(),
        ..Default::default()
    };
    // a mount point outside the bases
    let e = c
        .create_sandbox(CreateSandboxRequest {
            storages: vec![storage(&outside.join("m"))],
            sandbox_id: "hostile".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // a mount point through a symlink planted in the state directory
    let e = c
        .create_sandbox(CreateSandboxRequest {
            storages: vec![storage(&state.join("evil/m"))],
            sandbox_id: "hostile".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // a bind source through a symlink
    let e = c
        .create_sandbox(CreateSandboxRequest {
            storages: vec![Storage {
                driver: "bind".into(),
                source: state.join("evil").display().to_string(),
                mount_point: state.join("b").display().to_string(),
                ..Default::default()
            }],
            sandbox_id: "hostile".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&outside.display().to_string()),
        "nothing mounted outside: {mounts}"
    );
    assert!(
        !outside.join("m").exists(),
        "no mount point created outside"
    );

    // CopyFile through a symlinked directory, and onto a symlink
    let file = |path: std::path::PathBuf| CopyFileRequest {
        path: path.display().to_string(),
        file_size: 4,
        file_mode: libc::S_IFREG | 0o644,
        dir_mode: 0o755,
        uid: 1234,
        gid: 1234,
        offset: 0,
        data: b"pwnd".to_vec(),
    };
    let e = c
        .copy_file(file(state.join("shared/evil/x")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    std::fs::write(outside.join("victim"), b"host").unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), state.join("shared/link")).unwrap();
    let e = c
        .copy_file(file(state.join("shared/link")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // a symlink entry is replaced by a link, never followed by the chown
    c.copy_file(CopyFileRequest {
        file_mode: libc::S_IFLNK | 0o777,
        data: outside.join("victim").display().to_string().into_bytes(),
        ..file(state.join("shared/link"))
    })
    .await
    .unwrap();
    use std::os::unix::fs::MetadataExt;
    let victim = std::fs::metadata(outside.join("victim")).unwrap();
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"host");
    assert_eq!(victim.uid(), 0, "the chown did not follow the link");
    let link = std::fs::symlink_metadata(state.join("shared/link")).unwrap();
    assert_eq!(link.uid(), 1234, "the link itself is chowned");
    assert!(!outside.join("x").exists());
    // an ordinary file still works, owner and mode as asked
    c.copy_file(file(state.join("shared/d/ok"))).await.unwrap();
    let ok = std::fs::metadata(state.join("shared/d/ok")).unwrap();
    assert_eq!((ok.uid(), ok.mode() & 0o7777), (1234, 0o644));
    assert_eq!(std::fs::read(state.join("shared/d/ok")).unwrap(), b"pwnd");
}

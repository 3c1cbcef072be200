//! End to end: the real launcher boots the real guest under TCG; the host talks
//! to the agent (and to the vsock test peer) through our hybrid vsock backend.
//! Needs root and the test image (`make test`).

use std::time::Duration;

use kata_proto::agent::agent_service_client::AgentServiceClient;
use kata_proto::agent::health_client::HealthClient;
use kata_proto::agent::{
    CheckRequest, CreateSandboxRequest, GetOomEventRequest, GuestDetailsRequest,
    PauseContainerRequest, ResumeContainerRequest, StatsContainerRequest, TtyWinResizeRequest,
};
use kata_proto::dialer::{self, DialError};
use kata_proto::launcher::StopVmRequest;
use kata_tests::{alive, assert_nothing_left, bin, guest_dir, TestVm};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const DIAL: Duration = Duration::from_secs(10);

fn manifest_kernel() -> String {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(guest_dir().join("manifest.json")).unwrap()).unwrap();
    let k = m["kernel_version"]
        .as_str()
        .or_else(|| m["kver"].as_str())
        .unwrap_or_default();
    assert!(!k.is_empty(), "manifest.json names no kernel version: {m}");
    k.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_answers_from_the_guest_and_powers_off() {
    let mut vm = TestVm::boot("e2e-agent", None).await;
    let ch = dialer::channel(&vm.addr(kata_proto::paths::ports::AGENT), DIAL)
        .await
        .expect("dial the agent");
    let health = HealthClient::new(ch.clone())
        .check(CheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");
    let mut agent = AgentServiceClient::new(ch);
    let d = agent
        .get_guest_details(GuestDetailsRequest {
            mem_block_size: true,
            mem_hotplug_probe: false,
        })
        .await
        .unwrap()
        .into_inner();
    let host = nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        d.kernel_release,
        manifest_kernel(),
        "the guest's kernel, from the image manifest"
    );
    assert_ne!(d.kernel_release, host, "not the host's kernel");
    assert_eq!(d.online_vcpus, 1);
    assert!(
        d.mem_total_bytes > 128 << 20 && d.mem_total_bytes <= 256 << 20,
        "{}",
        d.mem_total_bytes
    );
    assert_eq!(d.agent_details.unwrap().version, kata_proto::VERSION);

    // pause and resume through QMP: the state follows, the agent answers again after
    vm.launcher.client.pause_vm(()).await.expect("PauseVm");
    let st = vm.launcher.client.vm_status(()).await.unwrap().into_inner();
    assert_eq!((st.state.as_str(), st.agent_ready), ("paused", true));
    vm.launcher.client.resume_vm(()).await.expect("ResumeVm");
    assert_eq!(
        vm.launcher
            .client
            .vm_status(())
            .await
            .unwrap()
            .into_inner()
            .state,
        "running"
    );
    let again = agent
        .get_guest_details(GuestDetailsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(again.uptime_seconds >= d.uptime_seconds);

    vm.destroy_through_agent(&mut agent).await;
}

async fn echo_once(vm: &TestVm, msg: &[u8]) {
    let mut s = dialer::dial(&vm.addr(5000), DIAL).await.expect("dial echo");
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsock_backend_under_stress() {
    let mut vm = TestVm::boot("e2e-vsock", Some("/usr/bin/kata-test-guest")).await;
    echo_once(&vm, b"first").await;

    // nobody listens on 1024 in the test guest: refused, cleanly
    let e = dialer::dial(&vm.addr(1024), DIAL).await.unwrap_err();
    assert!(matches!(e, DialError::Refused { .. }), "{e:?}");

    // clients that close before the guest answers, and garbage instead of CONNECT
    let uds = vm.created.vsock_uds_path.clone();
    for i in 0..50 {
        let mut s = tokio::net::UnixStream::connect(&uds).await.unwrap();
        if i % 2 == 0 {
            s.write_all(b"CONNECT 5000\n").await.unwrap();
        } else {
            let junk: Vec<u8> = (0..(i * 97 % 300 + 1))
                .map(|b| (b * 31 + i) as u8)
                .collect();
            let _ = s.write_all(&junk).await;
        }
        drop(s);
    }
    echo_once(&vm, b"still alive").await;

    // half-close: the host's FIN reaches the guest, which finishes and closes back
    let mut s = dialer::dial(&vm.addr(5000), DIAL).await.unwrap();
    s.write_all(b"half").await.unwrap();
    let dialer::Stream::Unix(mut u) = s else {
        panic!("hybrid is a unix stream")
    };
    u.shutdown().await.unwrap();
    let mut all = vec![];
    tokio::time::timeout(Duration::from_secs(20), u.read_to_end(&mut all))
        .await
        .expect("EOF after half-close")
        .unwrap();
    assert_eq!(all, b"half");

    // 100 concurrent host-initiated connections
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let addr = vm.addr(5000);
            tokio::spawn(async move {
                let mut s = dialer::dial(&addr, Duration::from_secs(30))
                    .await
                    .expect("dial");
                let msg = format!("conn {i} ").repeat(100);
                s.write_all(msg.as_bytes()).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                s.read_exact(&mut back).await.unwrap();
                assert_eq!(back, msg.as_bytes());
            })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("no wedge")
            .unwrap();
    }

    // 100 concurrent guest-initiated connections to host port 6000
    let listen = kata_proto::paths::hybrid_listener_path(std::path::Path::new(&uds), 6000);
    let l = tokio::net::UnixListener::bind(&listen).unwrap();
    let server = tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut line = String::new();
                BufReader::new(r).read_line(&mut line).await.unwrap();
                w.write_all(line.as_bytes()).await.unwrap();
            });
        }
    });
    let mut ctl = BufReader::new(dialer::dial(&vm.addr(5002), DIAL).await.unwrap());
    ctl.get_mut().write_all(b"100 6000\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(120), ctl.read_line(&mut answer))
        .await
        .expect("dial-back answers")
        .unwrap();
    assert_eq!(answer.trim(), "ok 100");
    server.abort();
    std::fs::remove_file(&listen).unwrap();

    // 64 MiB full duplex through echo, checked by hash
    const SIZE: usize = 64 << 20;
    let s = dialer::dial(&vm.addr(5000), DIAL).await.unwrap();
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut chunk = vec![0u8; 256 * 1024];
        for i in 0..SIZE / chunk.len() {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = (i * 7 + j * 13) as u8;
            }
            h.update(&chunk);
            w.write_all(&chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
        h.finalize()
    });
    let t0 = std::time::Instant::now();
    let mut h = Sha256::new();
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    while got < SIZE {
        let n = tokio::time::timeout(Duration::from_secs(60), r.read(&mut buf))
            .await
            .expect("no stall")
            .unwrap();
        assert!(n > 0, "EOF after {got} bytes");
        h.update(&buf[..n]);
        got += n;
    }
    assert_eq!(
        writer.await.unwrap(),
        h.finalize(),
        "the echoed bytes are the sent bytes"
    );
    eprintln!("64 MiB echoed in {:?}", t0.elapsed());
    echo_once(&vm, b"after bulk").await;

    let exit = vm
        .launcher
        .client
        .stop_vm(StopVmRequest { timeout_seconds: 5 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(exit.reason, "stopped", "{exit:?}");
    let dir = vm.dir();
    vm.launcher.client.shutdown(()).await.unwrap();
    vm.launcher.child.wait().await.unwrap();
    assert_nothing_left(&dir, &vm.cgroup, vm.created.hypervisor_pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_after_sigkill_of_qemu_or_launcher() {
    // QEMU killed: the launcher reports it, Shutdown removes everything
    let mut vm = TestVm::boot("e2e-kill-qemu", Some("/usr/bin/kata-test-guest")).await;
    let pid = vm.created.hypervisor_pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let exit = vm.launcher.client.wait_vm(()).await.unwrap().into_inner();
    assert_eq!(exit.reason, "killed", "{exit:?}");
    assert_eq!(exit.signal, 9);
    let dir = vm.dir();
    vm.launcher.client.shutdown(()).await.unwrap();
    vm.launcher.child.wait().await.unwrap();
    assert_nothing_left(&dir, &vm.cgroup, pid);

    // the launcher killed: QEMU dies with it, `cleanup` removes the rest
    let mut vm = TestVm::boot("e2e-kill-launcher", Some("/usr/bin/kata-test-guest")).await;
    let pid = vm.created.hypervisor_pid;
    vm.launcher.child.start_kill().unwrap();
    vm.launcher.child.wait().await.unwrap();
    for _ in 0..200 {
        if !alive(pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(!alive(pid), "QEMU outlived its launcher");
    let dir = vm.dir();
    assert!(
        dir.join("launcher.json").exists(),
        "a dead launcher leaves its state for cleanup"
    );
    let out = std::process::Command::new(bin("kata-vmm-launcher"))
        .args(["--sandbox-id", &vm.id, "--sandbox-dir"])
        .arg(&dir)
        .arg("cleanup")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_nothing_left(&dir, &vm.cgroup, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_run_in_the_guest() {
    use kata_proto::stdio::Which;
    use kata_tests::agent::*;
    use serde_json::json;

    let vm = TestVm::boot("e2e-ctr", None).await;
    let addr = vm.addr(kata_proto::paths::ports::AGENT);
    let mut c = connect(&addr).await;
    // the rootfs reaches the guest through CopyFile (no shared filesystem yet)
    let local = tempfile::tempdir().unwrap();
    let rootfs_local = busybox_rootfs(local.path());
    let rootfs = std::path::Path::new("/run/kata-agent/shared/busybox");
    copy_tree(&mut c, &rootfs_local, rootfs)
        .await
        .expect("CopyFile the rootfs");
    c.create_sandbox(CreateSandboxRequest {
        sandbox_id: "e2e-ctr".into(),
        hostname: "guest-host".into(),
        ..Default::default()
    })
    .await
    .expect("CreateSandbox");
    let base = spec(rootfs, &["true"]);
    let with = |args: &[&str]| {
        let mut s = base.clone();
        s["process"]["args"] = json!(args);
        s
    };

    let o = run(
        &mut c,
        &addr,
        "echo",
        &with(&["sh", "-c", "echo hello from $(hostname); uname -r"]),
        None,
    )
    .await
    .expect("run echo");
    assert_eq!(o.status, 0, "{o:?}");
    let mut lines = o.stdout.lines();
    assert_eq!(lines.next(), Some("hello from kata-test"));
    assert_eq!(
        lines.next().map(str::to_string),
        Some(manifest_kernel()),
        "runs on the guest kernel"
    );

    let o = run(&mut c, &addr, "exit", &with(&["sh", "-c", "exit 7"]), None)
        .await
        .unwrap();
    assert_eq!(o.status, 7);

    let o = run(
        &mut c,
        &addr,
        "cat",
        &with(&["cat"]),
        Some(b"piped through the guest\n"),
    )
    .await
    .unwrap();
    assert_eq!(o.stdout, "piped through the guest\n");

    // a terminal, resized
    let mut s = with(&["sh"]);
    s["process"]["terminal"] = json!(true);
    create(&mut c, "tty", &s).await.unwrap();
    let out = collect(stream(&addr, Which::Stdout, "tty", "").await);
    let mut input = stream(&addr, Which::Stdin, "tty", "").await;
    start(&mut c, "tty").await.unwrap();
    c.tty_win_resize(TtyWinResizeRequest {
        container_id: "tty".into(),
        exec_id: String::new(),
        row: 24,
        column: 132,
    })
    .await
    .unwrap();
    input.write_all(b"stty size; exit\n").await.unwrap();
    assert_eq!(wait(&mut c, "tty", "").await, (0, 0));
    let text = String::from_utf8_lossy(&out.await.unwrap()).into_owned();
    assert!(text.contains("24 132"), "{text:?}");
    remove(&mut c, "tty").await.unwrap();

    // exec into a running container; SIGKILL gives 137
    create(&mut c, "box", &with(&["sleep", "1000"]))
        .await
        .unwrap();
    start(&mut c, "box").await.unwrap();
    exec(
        &mut c,
        "box",
        "e1",
        &process(&["sh", "-c", "echo exec in $(hostname)"], false),
    )
    .await
    .unwrap();
    let out = collect(stream(&addr, Which::Stdout, "box", "e1").await);
    assert_eq!(wait(&mut c, "box", "e1").await, (0, 0));
    assert_eq!(
        String::from_utf8_lossy(&out.await.unwrap()),
        "exec in kata-test\n"
    );
    signal(&mut c, "box", "", libc::SIGKILL, false)
        .await
        .unwrap();
    assert_eq!(wait(&mut c, "box", "").await, (137, libc::SIGKILL));
    remove(&mut c, "box").await.unwrap();

    // cgroup v2 in the guest: a memory limit that OOM-kills and reports it,
    // a pids limit, stats, pause and resume
    let mut oom = c.clone();
    let events = tokio::spawn(async move {
        oom.get_oom_event(GetOomEventRequest {})
            .await
            .map(|r| r.into_inner().container_id)
    });
    let mut s = with(&[
        "sh",
        "-c",
        "head -c 100000000 /dev/zero | tail -c 60000000 > /dev/null",
    ]);
    s["linux"]["resources"]["memory"] = json!({"limit": 16 << 20});
    let o = run(&mut c, &addr, "hog", &s, None).await.unwrap();
    assert_ne!(o.status, 0, "over the memory limit: {o:?}");
    let id = tokio::time::timeout(Duration::from_secs(30), events)
        .await
        .expect("an OOM event from the guest within 30 s")
        .unwrap()
        .expect("GetOOMEvent");
    assert_eq!(id, "hog");

    let mut s = with(&["sh", "-c", "while true; do sleep 0.05; done"]);
    s["linux"]["resources"]["pids"] = json!({"limit": 8});
    create(&mut c, "v2", &s).await.unwrap();
    start(&mut c, "v2").await.unwrap();
    let stats = |c: &Client| {
        let mut c = c.clone();
        async move {
            c.stats_container(StatsContainerRequest {
                container_id: "v2".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .cgroup_stats
            .unwrap()
        }
    };
    let st = stats(&c).await;
    assert_eq!(st.pids_stats.as_ref().unwrap().limit, 8, "{st:?}");
    assert!(
        st.memory_stats
            .as_ref()
            .unwrap()
            .usage
            .as_ref()
            .unwrap()
            .usage
            > 0,
        "{st:?}"
    );
    let cpu1 = st.cpu_stats.unwrap().cpu_usage.unwrap().total_usage;
    c.pause_container(PauseContainerRequest {
        container_id: "v2".into(),
    })
    .await
    .expect("pause in the guest");
    c.resume_container(ResumeContainerRequest {
        container_id: "v2".into(),
    })
    .await
    .expect("resume in the guest");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu2 = stats(&c)
        .await
        .cpu_stats
        .unwrap()
        .cpu_usage
        .unwrap()
        .total_usage;
    assert!(
        cpu2 > cpu1,
        "cpu usage moves in the guest: {cpu1} then {cpu2}"
    );
    assert_pids_limit_holds(&mut c, &addr, "v2", 8).await;
    wait(&mut c, "v2", "").await;
    remove(&mut c, "v2").await.unwrap();

    vm.destroy_through_agent(&mut c).await;
}

/// Bytes the hostile guest writes to its serial console: 8x the launcher's
/// console cap. The emulated UART under TCG moves about 0.3 MiB/s here, so
/// 200 MiB would take over ten minutes; 200 MiB through the same pipe and
/// writer is the launcher's unit test `console_flood_stays_within_the_cap`.
const CONSOLE_FLOOD: u64 = 8 * kata_vmm_launcher::client::CONSOLE_CAP;

/// A guest root writing megabytes to /dev/ttyS0 (`cat /dev/zero >
/// /dev/ttyS0`) leaves the host's console log within its cap while it
/// writes and after, and the VM still answers on vsock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_guest_console_flood_stays_capped() {
    use kata_vmm_launcher::client::{console_rotated_path as rotated_path, CONSOLE_CAP};
    let vm = TestVm::boot("e2e-console", Some("/usr/bin/kata-test-guest")).await;
    let log = vm.dir().join("console.log");
    let on_disk = {
        let log = log.clone();
        move || -> u64 {
            [log.clone(), rotated_path(&log)]
                .iter()
                .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
                .sum()
        }
    };
    let mut ctl = BufReader::new(dialer::dial(&vm.addr(5004), DIAL).await.unwrap());
    ctl.get_mut()
        .write_all(format!("{CONSOLE_FLOOD}\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    let mut max_seen = 0;
    let t0 = std::time::Instant::now();
    {
        let read = ctl.read_line(&mut answer);
        tokio::pin!(read);
        loop {
            tokio::select! {
                r = &mut read => { r.unwrap(); break; }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    max_seen = max_seen.max(on_disk());
                    assert!(t0.elapsed() < Duration::from_secs(600), "the flood did not end in 10 min");
                }
            }
        }
    }
    let w: Vec<u64> = answer
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(w[0], CONSOLE_FLOOD, "{answer:?}");
    eprintln!(
        "guest console: {} MiB written in {} ms ({:.2} MiB/s); on disk at most {} KiB",
        CONSOLE_FLOOD >> 20,
        w[1],
        (CONSOLE_FLOOD as f64 / 1048576.0) / (w[1].max(1) as f64 / 1000.0),
        max_seen.max(on_disk()) >> 10
    );
    assert!(max_seen <= CONSOLE_CAP, "{max_seen}");
    assert!(on_disk() <= CONSOLE_CAP, "{}", on_disk());
    assert!(rotated_path(&log).exists(), "the cap was reached");
    let tail = std::fs::read_to_string(&log).unwrap();
    assert!(tail.starts_with("[kata-vmm-launcher: console log rotated"));
    echo_once(&vm, b"after the console flood").await;

    let mut vm = vm;
    let exit = vm
        .launcher
        .client
        .stop_vm(StopVmRequest { timeout_seconds: 5 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(exit.reason, "stopped", "{exit:?}");
    let dir = vm.dir();
    vm.launcher.client.shutdown(()).await.unwrap();
    vm.launcher.child.wait().await.unwrap();
    assert_nothing_left(&dir, &vm.cgroup, vm.created.hypervisor_pid);
}

/// What the launcher leaves on the host for a running VM is root's alone by
/// explicit mode (not the umask): sockets and state files 0600, directories
/// 0700; the one directory the jailed QEMU reaches (vm/) and its sockets
/// belong to QEMU's own uid, allocated from the reserved range (outside every
/// subordinate id range of the host) and held by a lock file until the VM
/// is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_files_are_private_and_qemu_has_a_reserved_uid() {
    use std::os::unix::fs::MetadataExt;
    // a permissive umask in the caller must not widen anything
    // SAFETY: umask(2) only changes this test process's file mode mask.
    let old = unsafe { libc::umask(0) };
    let mut vm = TestVm::boot("e2e-modes", Some("/usr/bin/kata-test-guest")).await;
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let dir = vm.dir();
    let pid = vm.created.hypervisor_pid;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap()
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    let uid = ids("Uid:")[0];
    assert!(
        ids("Uid:").iter().chain(&ids("Gid:")).all(|&u| u == uid),
        "{status}"
    );
    use kata_vmm_launcher::client::{hypervisor_uid_lock, uids};
    assert!(
        uids::reserved_range().contains(&u64::from(uid)),
        "QEMU's uid {uid} is in the reserved range"
    );
    assert!(!uids::used_by_host(uid));
    let lock = uids::lock_dir().join(uid.to_string());
    assert!(lock.exists(), "{} holds the uid", lock.display());
    assert_eq!(
        hypervisor_uid_lock(&vm.launcher.paths).as_deref(),
        Some(lock.as_path())
    );

    let vm_dir = dir.join("vm");
    let expect = [
        (dir.clone(), 0o700, 0),
        (dir.join("root"), 0o700, 0),
        (vm_dir.clone(), 0o700, uid),
        (dir.join("launcher.sock"), 0o600, 0),
        (dir.join("launcher.json"), 0o600, 0),
        (dir.join("console.log"), 0o600, 0),
        (dir.join("vsock.sock"), 0o600, 0),
        (dir.join("vsock.sock_1028"), 0o600, 0),
        (vm_dir.join("qmp.sock"), 0o600, uid),
        (vm_dir.join("vhost-vsock.sock"), 0o600, uid),
    ];
    for (p, mode, owner) in &expect {
        let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(
            (m.mode() & 0o7777, m.uid()),
            (*mode, *owner),
            "{}: mode {:o}",
            p.display(),
            m.mode() & 0o7777
        );
    }
    echo_once(&vm, b"private").await;
    vm.launcher
        .client
        .stop_vm(StopVmRequest { timeout_seconds: 2 })
        .await
        .unwrap();
    vm.launcher.client.shutdown(()).await.unwrap();
    vm.launcher.child.wait().await.unwrap();
    assert_nothing_left(&dir, &vm.cgroup, pid);
    assert!(!lock.exists(), "the uid is released with the VM");
}

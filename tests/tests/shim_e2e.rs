//! End to end: real containerd 1.6 and ctr start containerd-shim-kata-v2,
//! which runs every container in a VM (QEMU under TCG, the test guest image).
//! Needs root, containerd and QEMU (`make test` installs them).

use std::time::Duration;

use kata_tests::containerd::Containerd;
use kata_tests::shim::{
    assert_pod_gone, guest_kernel, kill_and_delete, pod_process, pod_processes, run_detached,
    wait_task_ended, wait_task_status, write_config, RUNTIME,
};

const GONE: Duration = Duration::from_secs(20);

fn setup(qemu_extra: &str) -> (Containerd, String, tempfile::TempDir) {
    kata_tests::require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = write_config(&tmp.path().join("configuration.toml"), qemu_extra, "");
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    (c, image, tmp)
}

fn run<'a>(image: &'a str, id: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["run", "--rm", "--runtime", RUNTIME, image, id];
    v.extend_from_slice(args);
    v
}

/// Runs `ctr ... <ctr_args>` in a pty of `rows`x`cols` (ctr -t needs a
/// terminal of its own; `script` gives it one); returns what it printed.
fn in_pty(c: &Containerd, rows: u32, cols: u32, ctr_args: &str) -> String {
    let out = std::process::Command::new("script")
        .arg("-qec")
        .arg(format!(
            "stty rows {rows} cols {cols}; ctr -a {} -n {} {ctr_args}",
            c.address().display(),
            c.namespace()
        ))
        .arg("/dev/null")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script (bsdutils)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "ctr {ctr_args} in a pty: {out:?}");
    text
}

fn status(o: &std::process::Output) -> Option<i32> {
    o.status.code()
}

#[test]
fn run_prints_the_guest_kernel_propagates_exit_codes_and_stdin() {
    let (c, image, _tmp) = setup("");
    let out = c.ctr_ok(&run(&image, "k1", &["uname", "-r"]));
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(out.trim(), guest_kernel(), "the container ran in the guest");
    assert_ne!(out.trim(), host.trim(), "not the host's kernel");
    assert_pod_gone("k1", GONE);

    let o = c.ctr(&run(
        &image,
        "k2",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    ));
    assert_eq!(status(&o), Some(3), "exit code: {o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "out");
    assert_eq!(String::from_utf8_lossy(&o.stderr).trim(), "err");
    assert_pod_gone("k2", GONE);

    // ctr run -t: the container's terminal has the caller's size
    let text = in_pty(
        &c,
        30,
        100,
        &format!("run -t --rm --runtime {RUNTIME} {image} k4 sh -c 'stty size; tty'"),
    );
    assert!(text.contains("30 100"), "{text:?}");
    assert!(text.contains("/dev/console"), "{text:?}");
    assert_pod_gone("k4", GONE);

    let o = c.ctr_input(&run(&image, "k3", &["cat"]), Some(b"hi from stdin\n"));
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi from stdin\n");
    assert_pod_gone("k3", GONE);
}

#[test]
fn a_detached_task_execs_lists_pauses_reports_metrics_and_dies_by_signal() {
    let (c, image, _tmp) = setup("");
    let id = "d1";
    run_detached(
        &c,
        &image,
        id,
        &[
            "sh",
            "-c",
            "trap 'exit 42' TERM; while true; do sleep 1; done",
        ],
    );
    // one VM: one launcher, one kata-virtiofsd, one hypervisor
    let procs = pod_processes(id);
    assert!(procs.len() >= 3, "{procs:?}");
    // the configuration's default firmware reaches QEMU
    let qemu = kata_vmm_launcher::client::hypervisor_pid(&kata_proto::paths::SandboxPaths::new(id))
        .and_then(|pid| procs.iter().find(|(p, _)| *p == pid))
        .map(|(_, cmd)| cmd.clone())
        .expect("the hypervisor is among the pod's processes");
    assert!(
        qemu.contains(&format!(" -bios {} ", kata_proto::config::QBOOT)),
        "{qemu}"
    );

    let out = c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        id,
        "sh",
        "-c",
        "echo exec-ok; cat /proc/1/cmdline | tr '\\0' ' '",
    ]);
    assert!(out.starts_with("exec-ok\n"), "{out}");
    assert!(
        out.contains("trap"),
        "the exec sees the container's pid 1: {out}"
    );

    // bulk output leaves the guest byte for byte and in order: on the
    // kata-rs kernel the pipe's pages go to the device by reference, in
    // packets gathered across pages, with stderr spliced at the same time
    let out = c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "bulk",
        id,
        "sh",
        "-c",
        "seq 1 400000; seq 1 1000 >&2; seq 400001 500000",
    ]);
    let want: String = (1..=500_000).map(|i| format!("{i}\n")).collect();
    assert!(
        out == want,
        "stdout of seq arrived whole: {} bytes, {} expected, first difference at {:?}",
        out.len(),
        want.len(),
        out.bytes().zip(want.bytes()).position(|(a, b)| a != b)
    );
    // random bytes in writes of 1001: pipe pages that a splice sends in part
    // (short credit) and finishes in the next packet; the guest's sha256 of
    // the file against the host's of what arrived
    let sum = c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "rnd",
        id,
        "sh",
        "-c",
        "head -c 3000001 /dev/urandom > /tmp/rnd && sha256sum /tmp/rnd",
    ]);
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "rnd-out",
        id,
        "dd",
        "if=/tmp/rnd",
        "bs=1001",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(o.stdout.len(), 3_000_001, "every random byte arrived");
    {
        use sha2::Digest;
        let host = format!("{:x}", sha2::Sha256::digest(&o.stdout));
        assert_eq!(
            sum.split_whitespace().next(),
            Some(host.as_str()),
            "the random bytes arrived unchanged"
        );
    }
    let o = c.ctr(&["task", "exec", "--exec-id", "e2", id, "sh", "-c", "exit 7"]);
    assert_eq!(status(&o), Some(7), "{o:?}");

    let ps = c.ctr_ok(&["task", "ps", id]);
    assert!(
        ps.lines().count() >= 2,
        "ctr task ps lists the guest processes: {ps}"
    );

    let m = c.ctr_ok(&["task", "metrics", id]);
    assert!(
        m.contains("memory.usage_in_bytes") || m.contains("memory"),
        "{m}"
    );
    let usage = m
        .lines()
        .find(|l| l.starts_with("memory.usage_in_bytes"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(usage > 0, "memory usage reported: {m}");

    c.ctr_ok(&["task", "pause", id]);
    wait_task_status(&c, id, "PAUSED", Duration::from_secs(10));
    c.ctr_ok(&["task", "resume", id]);
    wait_task_status(&c, id, "RUNNING", Duration::from_secs(10));

    let text = in_pty(
        &c,
        24,
        80,
        &format!("task exec -t --exec-id t1 {id} sh -c 'stty size; ls -l /proc/self/fd/0'"),
    );
    assert!(
        text.contains("24 80"),
        "a terminal of the caller's size in the guest: {text:?}"
    );
    assert!(
        text.contains("/dev/pts/"),
        "a terminal in the guest: {text:?}"
    );

    c.ctr_ok(&["task", "kill", "-s", "SIGTERM", id]);
    let ls = wait_task_status(&c, id, "STOPPED", Duration::from_secs(30));
    assert!(ls.contains(id));
    c.ctr_ok(&["task", "delete", id]);
    c.ctr_ok(&["container", "delete", id]);
    assert_pod_gone(id, GONE);
}

#[test]
fn two_containers_of_one_pod_share_one_vm() {
    let (c, image, _tmp) = setup("");
    let pod = "pod1";
    let sandbox_ann = [
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
    ];
    let member_ann = [
        "--annotation",
        "io.kubernetes.cri.container-type=container",
        "--annotation",
        "io.kubernetes.cri.sandbox-id=pod1",
    ];
    let mut a = vec!["run", "-d", "--runtime", RUNTIME];
    a.extend_from_slice(&sandbox_ann);
    a.extend_from_slice(&[&image, pod, "sleep", "1000"]);
    c.ctr_ok(&a);
    let mut b = vec!["run", "-d", "--runtime", RUNTIME];
    b.extend_from_slice(&member_ann);
    b.extend_from_slice(&[&image, "app1", "sleep", "1000"]);
    c.ctr_ok(&b);
    wait_task_status(&c, "app1", "RUNNING", Duration::from_secs(30));

    let boot = |id: &str, e: &str| {
        c.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            e,
            id,
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ])
    };
    assert_eq!(
        boot(pod, "b1"),
        boot("app1", "b2"),
        "both containers run in one guest kernel"
    );
    let launchers: Vec<_> = pod_processes(pod)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("kata-vmm-launcher"))
        .collect();
    assert_eq!(launchers.len(), 1, "one VM for the pod: {launchers:?}");
    assert!(
        !kata_proto::paths::SandboxPaths::new("app1").dir.exists(),
        "no second sandbox"
    );

    kill_and_delete(&c, "app1");
    // the pod lives on without its member
    c.ctr_ok(&["task", "exec", "--exec-id", "b3", pod, "true"]);

    // the pod deleted before its member (ctr allows it; CRI never does it):
    // the member's task ends with the VM (255, as after a crash) and can be
    // deleted, and nothing is left
    let mut b = vec!["run", "-d", "--runtime", RUNTIME];
    b.extend_from_slice(&member_ann);
    b.extend_from_slice(&[&image, "app2", "sleep", "1000"]);
    c.ctr_ok(&b);
    wait_task_status(&c, "app2", "RUNNING", Duration::from_secs(30));
    kill_and_delete(&c, pod);
    wait_task_status(&c, "app2", "STOPPED", Duration::from_secs(10));
    c.ctr_ok(&["task", "delete", "app2"]);
    c.ctr_ok(&["container", "delete", "app2"]);
    assert_pod_gone(pod, GONE);
}

#[test]
fn bind_mounts_reach_the_guest_and_read_only_stays_read_only() {
    let (c, image, tmp) = setup("");
    let ro = tmp.path().join("ro");
    let rw = tmp.path().join("rw");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::write(ro.join("f"), "from the host\n").unwrap();
    let ro_m = format!("type=bind,src={},dst=/ro,options=rbind:ro", ro.display());
    let rw_m = format!("type=bind,src={},dst=/rw,options=rbind:rw", rw.display());
    let o = c.ctr(&[
        "run", "--rm", "--runtime", RUNTIME, "--mount", &ro_m, "--mount", &rw_m, &image, "m1", "sh", "-c",
        "cat /ro/f; echo guest > /rw/out; if echo x > /ro/new; then echo WROTE; fi; echo x > /ro/f || echo refused",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("from the host"), "{o:?}");
    assert!(out.contains("refused") && !out.contains("WROTE"), "{o:?}");
    assert!(
        !ro.join("new").exists(),
        "a file appeared in the read-only volume"
    );
    assert_eq!(
        std::fs::read_to_string(ro.join("f")).unwrap(),
        "from the host\n"
    );
    assert_eq!(std::fs::read_to_string(rw.join("out")).unwrap(), "guest\n");
    assert_pod_gone("m1", GONE);
}

/// Found by the soak: ctr closes an exec's stdin (CloseIO) right after its
/// last write, and the shim used to drop what it had not copied yet.
#[test]
fn exec_stdin_arrives_whole_when_closed_right_after_the_last_write() {
    let (c, image, _tmp) = setup("");
    let id = "stdin-whole";
    run_detached(&c, &image, id, &["sleep", "1000"]);
    let input = vec![b'x'; 1 << 20];
    let t0 = std::time::Instant::now();
    for i in 0..5 {
        let exec_id = format!("s{i}");
        let o = c.ctr_input(
            &["task", "exec", "--exec-id", &exec_id, id, "wc", "-c"],
            Some(&input),
        );
        assert!(o.status.success(), "exec {i}: {o:?}");
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            "1048576",
            "exec {i}: every byte written before CloseIO reaches the process"
        );
    }
    // not a speed figure: ctr keeps its FIFO open until CloseIO returns, so
    // a CloseIO waiting for the FIFO's end would hold each exec 10 s
    assert!(
        t0.elapsed() < Duration::from_secs(25),
        "CloseIO waited for a FIFO end that comes only after it: {:?}",
        t0.elapsed()
    );
    kill_and_delete(&c, id);
    assert_pod_gone(id, GONE);
}

#[test]
fn bad_input_is_a_clear_error_and_leaves_nothing() {
    let (c, image, tmp) = setup("");
    let bad_type = tmp.path().join("bad-type.toml");
    std::fs::write(&bad_type, "[hypervisor.qemu]\ndefault_memory = \"big\"\n").unwrap();
    let no_kernel = write_config(&tmp.path().join("no-kernel.toml"), "", "");
    let text = std::fs::read_to_string(&no_kernel).unwrap();
    let no_kernel_text = text.replacen("vmlinuz\"", "vmlinuz-missing\"", 1);
    std::fs::write(&no_kernel, no_kernel_text).unwrap();
    let no_firmware = write_config(
        &tmp.path().join("no-firmware.toml"),
        "firmware = \"/usr/share/qemu/no-such-firmware.rom\"",
        "",
    );
    let firmware_outside = write_config(
        &tmp.path().join("firmware-outside.toml"),
        "firmware = \"/opt/qboot.rom\"",
        "",
    );

    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "b1",
            vec![
                "--runtime-config-path".into(),
                bad_type.display().to_string(),
            ],
            "default_memory",
        ),
        (
            "b2",
            vec![
                "--runtime-config-path".into(),
                no_kernel.display().to_string(),
            ],
            "vmlinuz-missing",
        ),
        (
            "b7",
            vec![
                "--runtime-config-path".into(),
                no_firmware.display().to_string(),
            ],
            "hypervisor.qemu.firmware",
        ),
        (
            "b8",
            vec![
                "--runtime-config-path".into(),
                firmware_outside.display().to_string(),
            ],
            "must be under /usr",
        ),
        (
            "b3",
            vec![
                "--annotation".into(),
                "io.katacontainers.config.hypervisor.default_memory=1024".into(),
            ],
            "not allowed",
        ),
        (
            "b5",
            vec!["--cgroup".into(), "/kata-rs-test/../../escape".into()],
            "cgroupsPath \"/kata-rs-test/../../escape\": no '.' or '..' components",
        ),
        (
            "b6",
            vec!["--cgroup".into(), "kubepods:cri-containerd:b6".into()],
            "the slice must be a systemd slice name ending in .slice",
        ),
    ];
    for (id, extra, want) in cases {
        let mut a: Vec<&str> = vec!["run", "--rm", "--runtime", RUNTIME];
        a.extend(extra.iter().map(String::as_str));
        a.extend_from_slice(&[&image, id, "true"]);
        let o = c.ctr(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{id} should fail: {o:?}");
        assert!(err.contains(want), "{id}: the error names {want:?}: {err}");
        let _ = c.ctr(&["container", "delete", id]);
        assert_pod_gone(id, GONE);
    }

    // an entrypoint that does not exist: the guest says so
    let o = c.ctr(&run(&image, "b4", &["/no/such/program"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{o:?}");
    assert!(err.contains("/no/such/program"), "{err}");
    let _ = c.ctr(&["container", "delete", "b4"]);
    assert_pod_gone("b4", GONE);
}

/// Kills one of the pod's host processes while a container runs: containerd
/// sees the task exit and delete leaves nothing.
fn crash(c: &Containerd, image: &str, id: &str, victim: &str) {
    run_detached(c, image, id, &["sleep", "1000"]);
    let pid = match victim {
        "qemu" => {
            kata_vmm_launcher::client::hypervisor_pid(&kata_proto::paths::SandboxPaths::new(id))
                .expect("launcher state")
        }
        name => pod_process(id, name)
            .unwrap_or_else(|| panic!("no {name} for {id}: {:?}", pod_processes(id))),
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");
    wait_task_ended(c, id, Duration::from_secs(30));
    let _ = c.ctr(&["task", "delete", id]);
    c.ctr_ok(&["container", "delete", id]);
    assert_pod_gone(id, GONE);
}

#[test]
fn a_killed_shim_qemu_or_virtiofsd_ends_the_task_and_delete_cleans_up() {
    let (c, image, _tmp) = setup("");
    crash(&c, &image, "x-qemu", "qemu");
    crash(&c, &image, "x-fs", "kata-virtiofsd");
    crash(&c, &image, "x-shim", "containerd-shim-kata-v2");
}

/// `ctr events` in the background, stopped (by PID) when dropped.
struct Events {
    child: std::process::Child,
    out: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Events {
    fn start(c: &Containerd) -> Events {
        use std::io::BufRead;
        let mut cmd = c.ctr_command(c.namespace());
        cmd.arg("events")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("ctr events");
        let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let o2 = out.clone();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let mut g = o2.lock().unwrap();
                g.push_str(&l);
                g.push('\n');
            }
        });
        // ctr subscribes before it prints anything: give it a moment
        std::thread::sleep(Duration::from_millis(300));
        Events { child, out }
    }

    /// Waits until every topic was seen for `id`; returns the log.
    fn wait_for(&self, id: &str, topics: &[&str]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.out.lock().unwrap().clone();
            let missing: Vec<_> = topics
                .iter()
                .filter(|t| !log.lines().any(|l| l.contains(*t) && l.contains(id)))
                .collect();
            if missing.is_empty() {
                return log;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "events {missing:?} of {id} never came:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn vm_size_follows_limits_and_allowed_annotations_and_events_reach_containerd() {
    let (c, image, tmp) =
        setup("enable_annotations = [\"default_memory\"]\ndefault_maxvcpus = 4\n");
    let ev = Events::start(&c);
    // memory = default_memory (256) + the limit (128); vCPUs = 1 + ceil(1.5)
    let o = c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--memory-limit",
        "134217728",
        "--cpus",
        "1.5",
        &image,
        "s1",
        "sh",
        "-c",
        "grep MemTotal /proc/meminfo; nproc",
    ]);
    let mut lines = o.lines();
    let kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("MemTotal: {o}"));
    assert!(
        (300 * 1024..=384 * 1024).contains(&kib),
        "a 384 MiB guest: {o}"
    );
    assert_eq!(lines.next(), Some("3"), "1 + 2 vCPUs: {o}");
    ev.wait_for(
        "s1",
        &[
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete",
        ],
    );
    assert_pod_gone("s1", GONE);

    // an annotation that enable_annotations allows
    let o = c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.katacontainers.config.hypervisor.default_memory=512",
        &image,
        "s2",
        "grep",
        "MemTotal",
        "/proc/meminfo",
    ]);
    let kib: u64 = o
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        (420 * 1024..=512 * 1024).contains(&kib),
        "a 512 MiB guest: {o}"
    );
    assert_pod_gone("s2", GONE);

    // OOM in the guest: exit 137 and a TaskOOM event
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--memory-limit",
        "16777216",
        &image,
        "s3",
        "sh",
        "-c",
        "head -c 100000000 /dev/zero | tail -c 60000000 > /dev/null",
    ]);
    assert_eq!(o.status.code(), Some(137), "OOM-killed: {o:?}");
    ev.wait_for("s3", &["/tasks/oom", "/tasks/exit"]);
    assert_pod_gone("s3", GONE);

    // exec and pause events
    run_detached(&c, &image, "s4", &["sleep", "1000"]);
    c.ctr_ok(&["task", "exec", "--exec-id", "x", "s4", "true"]);
    c.ctr_ok(&["task", "pause", "s4"]);
    c.ctr_ok(&["task", "resume", "s4"]);
    ev.wait_for(
        "s4",
        &[
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/paused",
            "/tasks/resumed",
        ],
    );
    kill_and_delete(&c, "s4");
    assert_pod_gone("s4", GONE);
    drop(tmp);
}

/// `max_concurrent_boots = 1`: pods started together boot one after
/// another (each waits for the node's single boot slot), all of them run,
/// and no slot stays taken afterwards.
#[test]
fn boot_slots_let_one_guest_boot_at_a_time() {
    let (c, image, _tmp) = setup("max_concurrent_boots = 1");
    let ids = ["slot-a", "slot-b", "slot-c"];
    let runs: Vec<_> = ids
        .iter()
        .map(|id| {
            let (addr, ns, image, id) = (
                c.address().to_path_buf(),
                c.namespace().to_string(),
                image.clone(),
                id.to_string(),
            );
            std::thread::spawn(move || {
                std::process::Command::new("ctr")
                    .arg("-a")
                    .arg(addr)
                    .args(["-n", &ns])
                    .args(run(&image, &id, &["echo", "hi"]))
                    .stdin(std::process::Stdio::null())
                    .output()
                    .expect("ctr run")
            })
        })
        .collect();
    for (id, r) in ids.iter().zip(runs) {
        let out = r.join().unwrap();
        assert!(out.status.success(), "{id}: {out:?}");
        assert_eq!(out.stdout, b"hi\n", "{id}");
    }
    let log = std::fs::read_to_string(c.log_path()).unwrap();
    let ours = |l: &&str| ids.iter().any(|id| l.contains(&format!("sandbox={id} ")));
    let waited: Vec<&str> = log
        .lines()
        .filter(ours)
        .filter(|l| l.contains("every boot slot is taken"))
        .collect();
    assert!(
        !waited.is_empty(),
        "three pods at once with one slot: at least one waited; log:\n{}",
        c.log_tail(60)
    );
    let took: Vec<u64> = log
        .lines()
        .filter(ours)
        .filter(|l| l.contains("boot slot taken"))
        .filter_map(|l| {
            l.split("waited_ms=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        took.iter().any(|ms| *ms >= 100),
        "a waiting pod got the slot only after another guest booted: {took:?}"
    );
    assert!(
        !log.lines()
            .filter(ours)
            .any(|l| l.contains("booting without one")),
        "every pod got the slot in time"
    );
    for id in ids {
        assert_pod_gone(id, GONE);
    }
    // the slot is free again (a pod of a test running beside this one may
    // hold it for a boot at a time, never for long): the shims' own
    // acquire, with one slot, gets slot-0 within GONE
    use kata_proto::boot_slots::{acquire, dir, Acquired};
    assert!(dir().join("slot-0").exists(), "the slot file exists");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let got = rt.block_on(acquire(&dir(), 1, GONE, || {})).unwrap();
    assert!(
        matches!(&got, Acquired::Slot(s, _) if s.index == 0),
        "slot-0 is still taken {GONE:?} after the pods are gone: {got:?}"
    );
}

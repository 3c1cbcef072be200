//! The private containerd of the end-to-end tests ([`kata_tests::containerd`]),
//! proven with runc: the locally built busybox image imports and runs, output
//! and exit codes come through, and dropping it leaves nothing behind (no
//! process, no mount, no directory). Needs root, containerd 1.6 and ctr
//! (`make deps`), and kata-ctl (`make build`).

use std::path::Path;
use std::time::Instant;

use kata_tests::alive;
use kata_tests::containerd::{mounts_under, Containerd, RUNC_RUNTIME};

fn assert_gone(dir: &Path, pid: u32) {
    assert!(!alive(pid), "containerd (pid {pid}) still runs after drop");
    let m = mounts_under(dir);
    assert!(m.is_empty(), "still mounted after drop: {m:?}");
    assert!(!dir.exists(), "{} is still there after drop", dir.display());
}

#[test]
fn runc_runs_busybox_and_exit_codes_propagate() {
    let t0 = Instant::now();
    let c = Containerd::start();
    let (dir, pid) = (c.dir().to_path_buf(), c.pid());
    let started = t0.elapsed();
    let img = c.import_busybox();
    let imported = t0.elapsed();

    let run = |id: &str, cmd: &[&str]| {
        let mut args = vec!["run", "--rm", "--runtime", RUNC_RUNTIME, img.as_str(), id];
        args.extend_from_slice(cmd);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let args = run("kata-rs-runc-hello", &["echo", "hello"]);
    let out = c.ctr_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out, "hello\n");

    // the image's content: applets, passwd, /tmp
    let args = run(
        "kata-rs-runc-id",
        &["sh", "-c", "id -un; stat -c %a /tmp; ls /bin/ls; uname -s"],
    );
    let out = c.ctr_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out, "root\n1777\n/bin/ls\nLinux\n");

    // stdin goes in (one line: ctr run never closes the container's stdin
    // at EOF, so `cat` would wait for ever), exit codes come out
    let args = run("kata-rs-runc-read", &["sh", "-c", "read l; echo got $l"]);
    let o = c.ctr_input(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        Some(b"from-stdin\n"),
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "got from-stdin\n");
    let args = run("kata-rs-runc-exit", &["sh", "-c", "exit 3"]);
    let o = c.ctr(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    let args = run("kata-rs-runc-none", &["/no/such/binary"]);
    let o = c.ctr(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no such file"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // --rm left no container behind
    let left = c.ctr_ok(&["containers", "ls", "-q"]);
    assert_eq!(left.trim(), "", "containers left: {left}");
    let ran = t0.elapsed();
    drop(c);
    assert_gone(&dir, pid);
    eprintln!(
        "containerd up in {started:?}, image imported at {imported:?}, 5 runc containers done at {ran:?}, dropped at {:?}",
        t0.elapsed()
    );
}

#[test]
fn drop_cleans_up_a_running_container() {
    let c = Containerd::builder().namespace("kata-rs-test-drop").start();
    let (dir, pid) = (c.dir().to_path_buf(), c.pid());
    let img = c.import_busybox();
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNC_RUNTIME,
        &img,
        "kata-rs-runc-sleeper",
        "sleep",
        "1000",
    ]);
    let tasks = c.ctr_ok(&["tasks", "ls"]);
    let task_pid: u32 = tasks
        .lines()
        .find(|l| l.starts_with("kata-rs-runc-sleeper"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no sleeper task in:\n{tasks}"));
    assert!(alive(task_pid));
    assert!(
        !mounts_under(&dir).is_empty(),
        "the running container's rootfs is not mounted under {}",
        dir.display()
    );
    drop(c);
    assert!(
        !alive(task_pid),
        "the container's process {task_pid} survived"
    );
    assert_gone(&dir, pid);
}

//! `ctr run --cni` end to end: containerd's ctr runs Debian's CNI plugins
//! (bridge, host-local) in the pod's network namespace after Create, through
//! the task's pid (QEMU's, in the netns the shim made); kata-netmon sees the
//! veth appear, the launcher hot-plugs a NIC for it, and the guest has the
//! address before the container starts. Both internetworking models.
//! ctr and the plugins run in a namespace the test made (the node's
//! stand-in), so the bridge and its traffic stay there.

use std::time::{Duration, Instant};

use kata_tests::containerd::Containerd;
use kata_tests::net::{ip_in_pid, Cni};
use kata_tests::shim::{assert_pod_gone, kill_and_delete, wait_task_status, write_config, RUNTIME};

const GONE: Duration = Duration::from_secs(20);

/// The task's pid as ctr reports it (QEMU's).
fn task_pid(c: &Containerd, id: &str) -> u32 {
    let out = c.ctr_ok(&["task", "ls"]);
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid of {id} in {out}"))
}

/// Polls `cmd` in container `id` until its output satisfies `ok`.
fn wait_exec(c: &Containerd, id: &str, cmd: &str, ok: impl Fn(&str) -> bool, what: &str) -> String {
    let t0 = Instant::now();
    loop {
        let o = c.ctr(&["task", "exec", "--exec-id", "look", id, "sh", "-c", cmd]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if ok(&text) {
            return text;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{what}: {text}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn cni_pod(model: &str, tag: &str, net: u8) {
    kata_tests::require_root();
    let cni = Cni::new(tag, net);
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from the node\n").unwrap();
    let _server = cni.host.httpd("8080", &www);
    let cfg = write_config(
        &tmp.path().join("configuration.toml"),
        "",
        &format!("[runtime]\ninternetworking_model = \"{model}\"\n"),
    );
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let gw = cni.gateway();
    let prefix = format!("10.202.{net}.");

    // the address host-local gave, the default route, the gateway, a server
    let id = format!("{tag}1");
    let out = c.ctr_ok_in_netns(
        &cni.host.name,
        &[
            "run",
            "--rm",
            "--cni",
            "--runtime",
            RUNTIME,
            &image,
            &id,
            "sh",
            "-c",
            &format!(
                "ip -o -4 addr show eth0; ip route; ping -c 1 -W 10 {gw}; wget -q -O - http://{gw}:8080/hello.txt"
            ),
        ],
    );
    assert!(
        out.lines()
            .any(|l| l.contains("eth0") && l.contains(&prefix) && l.contains("/24")),
        "eth0 has the IPAM address: {out}"
    );
    assert!(out.contains(&format!("default via {gw}")), "{out}");
    assert!(
        out.contains("1 packets received"),
        "ping the gateway: {out}"
    );
    assert!(out.contains("hello from the node"), "{out}");
    assert_pod_gone(&id, GONE);
    assert_eq!(
        cni.leases(),
        Vec::<String>::new(),
        "ctr's CNI DEL released the address"
    );
    let left: Vec<String> = cni
        .host
        .links()
        .into_iter()
        .filter(|l| l.starts_with("veth"))
        .collect();
    assert!(left.is_empty(), "veths left on the bridge: {left:?}");

    // a second interface moved into the running pod's netns becomes a
    // hot-plugged NIC; removing it unplugs it
    let id = format!("{tag}2");
    c.ctr_ok_in_netns(
        &cni.host.name,
        &[
            "run",
            "-d",
            "--cni",
            "--runtime",
            RUNTIME,
            &image,
            &id,
            "sleep",
            "600",
        ],
    );
    wait_task_status(&c, &id, "RUNNING", Duration::from_secs(90));
    let pid = task_pid(&c, &id);
    let (a, b) = (format!("kr{net}x{pid}"), format!("kr{net}y{pid}"));
    let (a, b) = (&a[..a.len().min(15)], &b[..b.len().min(15)]);
    kata_tests::net::ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
    kata_tests::net::ip(&["link", "set", b, "netns", &cni.host.name]);
    cni.host
        .ip(&["addr", "add", &format!("10.203.{net}.1/24"), "dev", b]);
    cni.host.ip(&["link", "set", b, "up"]);
    kata_tests::net::ip(&["link", "set", a, "netns", &pid.to_string()]);
    ip_in_pid(
        pid,
        &["addr", "add", &format!("10.203.{net}.2/24"), "dev", a],
    );
    ip_in_pid(pid, &["link", "set", a, "up"]);
    let mac = ip_in_pid(pid, &["-o", "link", "show", a])
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("the new veth's MAC")
        .to_string();
    let want = format!("10.203.{net}.2/24");
    let seen = wait_exec(
        &c,
        &id,
        "ip -o link; ip -o -4 addr",
        |t| t.contains(&want),
        "the hot-plugged NIC with its address",
    );
    // macvtap: the guest's NIC carries the veth's original MAC
    if model == "tcfilter" {
        assert!(
            seen.contains(&mac),
            "the NIC has the veth's MAC {mac}: {seen}"
        );
    }
    let out = c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "ping",
        &id,
        "ping",
        "-c",
        "1",
        "-W",
        "10",
        &format!("10.203.{net}.1"),
    ]);
    assert!(
        out.contains("1 packets received"),
        "over the hot-plugged NIC: {out}"
    );
    ip_in_pid(pid, &["link", "del", a]);
    wait_exec(
        &c,
        &id,
        "ip -o -4 addr",
        |t| !t.is_empty() && !t.contains(&want),
        "the unplugged NIC's address is gone from the guest",
    );
    // the pod's first NIC still works
    let out = c.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "get",
        &id,
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://{gw}:8080/hello.txt"),
    ]);
    assert!(out.contains("hello from the node"), "{out}");
    kill_and_delete(&c, &id);
    assert_pod_gone(&id, GONE);
}

#[test]
fn ctr_run_cni_tcfilter() {
    cni_pod("tcfilter", "ct", 91);
}

#[test]
fn ctr_run_cni_macvtap() {
    cni_pod("macvtap", "cm", 92);
}

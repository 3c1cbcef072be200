//! Pod networking end to end: real containerd and ctr, a pod network
//! namespace and a peer namespace the test makes (joined by a veth pair, as
//! a CNI plugin would), kata-netmon, QEMU under TCG and the guest.

use std::time::{Duration, Instant};

use kata_tests::containerd::Containerd;
use kata_tests::net::PodNet;
use kata_tests::shim::{assert_pod_gone, kill_and_delete, wait_task_status, write_config, RUNTIME};

const GONE: Duration = Duration::from_secs(20);

fn no_plumbing_left(net: &PodNet) {
    let links = net.pod.links();
    assert!(
        !links.iter().any(|l| l.ends_with("_kata")),
        "taps left in the pod netns: {links:?}"
    );
    let qd = net.pod.tc(&["qdisc", "show", "dev", "eth0"]);
    assert!(!qd.contains("ingress"), "qdisc left: {qd}");
}

#[test]
fn a_container_has_the_pod_address_reaches_a_peer_and_follows_changes() {
    kata_tests::require_root();
    let net = PodNet::new("sn", 81);
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from the peer\n").unwrap();
    let _server = net.peer.httpd(&format!("{}:8080", net.addr(1)), &www);
    let cfg = write_config(&tmp.path().join("configuration.toml"), "", "");
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let with_ns = format!("network:{}", net.pod.path().display());

    // the pod's address, route and a peer over TCP
    let out = c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--with-ns",
        &with_ns,
        &image,
        "net1",
        "sh",
        "-c",
        &format!(
            "ip -o addr show eth0; ip -o link show eth0; ip route; ip -o link show lo; wget -q -O - http://{}:8080/hello.txt",
            net.addr(1)
        ),
    ]);
    assert!(out.contains(&format!("{}/24", net.addr(2))), "{out}");
    assert!(
        out.contains(&format!("default via {}", net.addr(1))),
        "{out}"
    );
    assert!(
        out.contains(&net.pod.mac("eth0")),
        "the guest NIC has the pod's MAC: {out}"
    );
    assert!(out.contains("hello from the peer"), "{out}");
    assert!(
        out.lines().any(|l| l.contains(": lo:") && l.contains("UP")),
        "lo is up in the guest: {out}"
    );
    assert_pod_gone("net1", GONE);
    no_plumbing_left(&net);

    // follow: an address and a route added in the netns reach the guest
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--with-ns",
        &with_ns,
        &image,
        "net3",
        "sleep",
        "600",
    ]);
    wait_task_status(&c, "net3", "RUNNING", Duration::from_secs(60));
    net.pod
        .ip(&["addr", "add", &format!("{}/24", net.addr(3)), "dev", "eth0"]);
    net.pod.ip(&[
        "route",
        "add",
        "10.250.0.0/16",
        "via",
        &net.addr(1),
        "dev",
        "eth0",
    ]);
    let t0 = Instant::now();
    loop {
        let o = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "look",
            "net3",
            "sh",
            "-c",
            "ip -o addr show eth0; ip route",
        ]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if text.contains(&format!("{}/24", net.addr(3))) && text.contains("10.250.0.0/16") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the new address and route did not reach the guest: {text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    kill_and_delete(&c, "net3");
    assert_pod_gone("net3", GONE);
    no_plumbing_left(&net);
}

#[test]
fn a_missing_netns_is_named_and_leaves_nothing() {
    kata_tests::require_root();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(&tmp.path().join("configuration.toml"), "", "");
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let o = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--with-ns",
        "network:/var/run/netns/kr-no-such-netns",
        &image,
        "netbad",
        "true",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("/var/run/netns/kr-no-such-netns"), "{err}");
    assert_pod_gone("netbad", GONE);
}

/// The PID of pod `id`'s process whose program name ends with `name`.
fn pid_of(id: &str, name: &str) -> u32 {
    kata_tests::shim::pod_processes(id)
        .into_iter()
        .find(|(_, cmd)| cmd.split(' ').next().is_some_and(|a| a.ends_with(name)))
        .unwrap_or_else(|| panic!("no {name} for {id}"))
        .0
}

fn sigkill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");
}

/// A SIGKILLed kata-netmon: the pod keeps running and its traffic flows
/// (the plumbing is the kernel's), delete removes the plumbing. A SIGKILLed
/// shim: the task ends and delete removes the plumbing too.
#[test]
fn killed_netmon_or_shim_leave_no_plumbing() {
    kata_tests::require_root();
    let net = PodNet::new("sk", 83);
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("ping.txt"), "pong\n").unwrap();
    let _server = net.peer.httpd(&format!("{}:8080", net.addr(1)), &www);
    let cfg = write_config(&tmp.path().join("configuration.toml"), "", "");
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let with_ns = format!("network:{}", net.pod.path().display());
    let url = format!("http://{}:8080/ping.txt", net.addr(1));
    for (id, victim) in [("nk1", "kata-netmon"), ("nk2", "containerd-shim-kata-v2")] {
        c.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--with-ns",
            &with_ns,
            &image,
            id,
            "sleep",
            "600",
        ]);
        wait_task_status(&c, id, "RUNNING", Duration::from_secs(60));
        sigkill(pid_of(id, victim));
        if victim == "kata-netmon" {
            let out = c.ctr_ok(&[
                "task",
                "exec",
                "--exec-id",
                "w",
                id,
                "wget",
                "-q",
                "-O",
                "-",
                &url,
            ]);
            assert_eq!(out.trim(), "pong", "traffic flows without netmon");
            kill_and_delete(&c, id);
        } else {
            kata_tests::shim::wait_task_ended(&c, id, Duration::from_secs(30));
            let _ = c.ctr(&["task", "delete", id]);
            c.ctr_ok(&["container", "delete", id]);
        }
        assert_pod_gone(id, GONE);
        no_plumbing_left(&net);
    }
}

/// Two kata-rs pods and a runc container on one bridge: 64 MiB over TCP
/// each way between the kata pods with matching sha256 sums, and the runc
/// container reaches a kata pod.
#[test]
fn kata_pods_and_runc_share_a_bridge() {
    kata_tests::require_root();
    let br = kata_tests::net::BridgeNet::new("br", 85, 3);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(&tmp.path().join("configuration.toml"), "", "");
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let ns = |i: usize| format!("network:{}", br.pods[i].path().display());
    // each kata pod serves 64 MiB of random bytes and prints their sum
    let serve = "mkdir /www && dd if=/dev/urandom of=/www/blob bs=1M count=64 2>/dev/null \
                 && echo hello > /www/hello && sha256sum /www/blob > /sum \
                 && exec httpd -f -p 8080 -h /www";
    for (i, id) in [(0, "bra"), (1, "brb")] {
        c.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--with-ns",
            &ns(i),
            &image,
            id,
            "sh",
            "-c",
            serve,
        ]);
    }
    for id in ["bra", "brb"] {
        wait_task_status(&c, id, "RUNNING", Duration::from_secs(90));
    }
    let sum_of = |id: &str| -> String {
        let t0 = Instant::now();
        loop {
            let o = c.ctr(&["task", "exec", "--exec-id", "sum", id, "cat", "/sum"]);
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            if let Some(w) = s.split_whitespace().next() {
                return w.to_string();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "{id} never wrote its blob"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let (sa, sb) = (sum_of("bra"), sum_of("brb"));
    assert_ne!(sa, sb);
    // b fetches a's blob, a fetches b's
    for (from, to, want) in [("brb", 0, &sa), ("bra", 1, &sb)] {
        let out = c.ctr_ok(&[
            "task",
            "exec",
            "--exec-id",
            "get",
            from,
            "sh",
            "-c",
            &format!(
                "wget -q -O - http://{}:8080/blob | sha256sum",
                br.pod_addr(to)
            ),
        ]);
        assert_eq!(
            out.split_whitespace().next(),
            Some(want.as_str()),
            "{from} got {}'s 64 MiB intact",
            br.pod_addr(to)
        );
    }
    // a runc container on the same bridge reaches a kata pod
    let out = c.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.runc.v2",
        "--with-ns",
        &ns(2),
        &image,
        "brr",
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://{}:8080/hello", br.pod_addr(0)),
    ]);
    assert_eq!(out.trim(), "hello");
    for id in ["bra", "brb"] {
        kill_and_delete(&c, id);
        assert_pod_gone(id, GONE);
    }
}

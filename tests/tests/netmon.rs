//! kata-netmon in real network namespaces (no VM): the tcfilter plumbing
//! carries frames both ways between the pod's veth and the tap QEMU would
//! open, the network it reports is the pod's, changes in the netns are
//! followed, and nothing is left after Shutdown, a SIGKILL plus cleanup, or a
//! bad netns.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use kata_netmon::client::{cleanup, NetmonProcess};
use kata_netmon::Model;
use kata_proto::netmon::Network;
use kata_tests::net::PodNet;
use kata_tests::{bin, require_root};

const T: Duration = Duration::from_secs(10);

async fn spawn(net: &PodNet, dir: &std::path::Path) -> NetmonProcess {
    NetmonProcess::spawn(
        &bin("kata-netmon"),
        "nmtest",
        &net.pod.path(),
        &dir.join("netmon.sock"),
        Model::Tcfilter,
        T,
    )
    .await
    .expect("kata-netmon starts")
}

/// Opens `tap` in the netns at `ns` (from a thread of its own, which enters
/// the netns), non-blocking.
fn open_tap(ns: std::path::PathBuf, tap: &str) -> std::fs::File {
    let tap = tap.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).unwrap();
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let t = kata_proto::tap::open(&tap).expect("open the tap");
        nix::fcntl::fcntl(
            &t,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        t
    })
    .join()
    .unwrap()
}

/// The next frame on the tap within `wait` (without its 10-byte virtio-net
/// header) for which `want` holds.
fn frame_where(tap: &mut std::fs::File, wait: Duration, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let end = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        match tap.read(&mut buf) {
            Ok(n) if n > 10 && want(&buf[10..n]) => return buf[10..n].to_vec(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("reading the tap: {e}"),
        }
    }
    panic!("no such frame on the tap within {wait:?}");
}

fn mac_bytes(s: &str) -> Vec<u8> {
    s.split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect()
}

fn ipv4(s: &str) -> Vec<u8> {
    s.parse::<std::net::Ipv4Addr>().unwrap().octets().to_vec()
}

async fn next_where(
    stream: &mut tonic::Streaming<Network>,
    what: &str,
    want: impl Fn(&Network) -> bool,
) -> Network {
    let r = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let n = stream.message().await.unwrap().expect("stream open");
            if want(&n) {
                return n;
            }
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("{what} not reported within 2 s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcfilter_plumbing_carries_frames_reports_and_follows_the_netns() {
    require_root();
    let net = PodNet::new("nm", 71);
    net.pod.ip(&[
        "neigh",
        "add",
        &net.addr(9),
        "lladdr",
        "02:00:00:00:00:09",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let mut nm = spawn(&net, dir.path()).await;

    // what the guest must configure
    let n = nm.client.get_network(()).await.unwrap().into_inner();
    assert_eq!(n.endpoints.len(), 1, "{n:?}");
    let ep = &n.endpoints[0];
    let iface = ep.interface.as_ref().unwrap();
    assert_eq!(iface.name, "eth0");
    assert_eq!(iface.hw_addr, net.pod.mac("eth0"));
    assert_eq!(iface.mtu, 1500);
    assert_eq!(iface.ip_addresses.len(), 1);
    assert_eq!(iface.ip_addresses[0].address, net.addr(2));
    assert_eq!(iface.ip_addresses[0].mask, "24");
    assert_eq!(ep.host_device, "tap0_kata");
    assert_eq!(ep.model, "tcfilter");
    assert!(
        n.routes
            .iter()
            .any(|r| r.dest.is_empty() && r.gateway == net.addr(1) && r.device == "eth0"),
        "default route: {:?}",
        n.routes
    );
    assert!(
        n.neighbors.iter().any(|a| a.lladdr == "02:00:00:00:00:09"
            && a.to_ip_address.as_ref().unwrap().address == net.addr(9)),
        "{:?}",
        n.neighbors
    );
    let filters = net.pod.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        filters.contains("Redirect to device tap0_kata") && filters.contains("protocol all"),
        "{filters}"
    );

    // frames both ways: the peer's ARP request for the pod address comes out
    // of the tap; an ARP reply written into the tap reaches the peer
    let mut tap = open_tap(net.pod.path(), "tap0_kata");
    let peer_ns = net.peer.name.clone();
    let target = net.addr(2);
    let pinger = std::thread::spawn(move || {
        let _ = std::process::Command::new("ip")
            .args([
                "netns", "exec", &peer_ns, "busybox", "ping", "-c", "3", "-W", "1", &target,
            ])
            .output();
    });
    let want_ip = ipv4(&net.addr(2));
    let req = frame_where(&mut tap, Duration::from_secs(5), |f| {
        f.len() >= 42
            && f[12..14] == [0x08, 0x06]
            && f[20..22] == [0, 1]
            && f[38..42] == want_ip[..]
    });
    assert_eq!(&req[0..6], &[0xff; 6], "an ARP request is broadcast");
    let peer_mac = req[6..12].to_vec();
    assert_eq!(peer_mac, mac_bytes(&net.peer.mac("peer0")));
    let pod_mac = mac_bytes(&iface.hw_addr);
    let mut reply = vec![0u8; 10];
    reply.extend_from_slice(&peer_mac);
    reply.extend_from_slice(&pod_mac);
    reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    reply.extend_from_slice(&pod_mac);
    reply.extend_from_slice(&want_ip);
    reply.extend_from_slice(&peer_mac);
    reply.extend_from_slice(&ipv4(&net.addr(1)));
    tap.write_all(&reply).expect("write a frame into the tap");
    let t0 = Instant::now();
    loop {
        let n = net.peer.ip(&["neigh", "show", &net.addr(2)]);
        if n.contains(&iface.hw_addr) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "the peer never learnt the pod's MAC from the tap: {n}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    pinger.join().unwrap();
    drop(tap);

    // follow: an address and a route added after start; a second interface
    // comes and goes with its tap
    let mut stream = nm.client.watch_network(()).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
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
    let later = next_where(&mut stream, "the new address and route", |n| {
        let i = n.endpoints[0].interface.as_ref().unwrap();
        i.ip_addresses.iter().any(|a| a.address == net.addr(3))
            && n.routes.iter().any(|r| r.dest == "10.250.0.0/16")
    })
    .await;
    assert!(later.generation > first.generation);
    let pid = std::process::id() % 100_000;
    let (a, b) = (format!("kr72a{pid}"), format!("kr72b{pid}"));
    kata_tests::net::ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    kata_tests::net::ip(&["link", "set", &a, "netns", &net.pod.name]);
    kata_tests::net::ip(&["link", "set", &b, "netns", &net.peer.name]);
    net.pod.ip(&["link", "set", &a, "name", "eth1"]);
    net.pod
        .ip(&["addr", "add", "10.201.72.2/24", "dev", "eth1"]);
    net.pod.ip(&["link", "set", "eth1", "up"]);
    let two = next_where(&mut stream, "the second interface", |n| {
        n.endpoints.len() == 2
    })
    .await;
    let ep1 = two
        .endpoints
        .iter()
        .find(|e| e.interface.as_ref().unwrap().name == "eth1")
        .unwrap();
    assert_eq!(ep1.host_device, "tap1_kata");
    assert!(net.pod.links().contains(&"tap1_kata".to_string()));
    net.pod.ip(&["link", "del", "eth1"]);
    next_where(&mut stream, "the second interface's removal", |n| {
        n.endpoints.len() == 1
    })
    .await;
    assert!(!net.pod.links().contains(&"tap1_kata".to_string()));

    // Shutdown removes every tap and qdisc
    nm.shutdown(T).await.expect("Shutdown");
    let links = net.pod.links();
    assert!(!links.iter().any(|l| l.ends_with("_kata")), "{links:?}");
    let qd = net.pod.tc(&["qdisc", "show", "dev", "eth0"]);
    assert!(!qd.contains("ingress"), "{qd}");
    assert!(!dir.path().join("netmon.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_netmon_is_cleaned_up_and_a_bad_netns_is_named() {
    require_root();
    let net = PodNet::new("nk", 73);
    let dir = tempfile::tempdir().unwrap();
    let mut nm = spawn(&net, dir.path()).await;
    assert!(net.pod.links().contains(&"tap0_kata".to_string()));
    nm.child.start_kill().unwrap();
    nm.child.wait().await.unwrap();
    // SIGKILLed: its plumbing stays until the cleanup
    assert!(net.pod.links().contains(&"tap0_kata".to_string()));
    cleanup(&bin("kata-netmon"), "nktest", &net.pod.path())
        .await
        .expect("cleanup");
    let links = net.pod.links();
    assert!(!links.iter().any(|l| l.ends_with("_kata")), "{links:?}");
    let qd = net.pod.tc(&["qdisc", "show", "dev", "eth0"]);
    assert!(!qd.contains("ingress"), "{qd}");
    // a cleanup of a netns that is gone has nothing to do
    cleanup(
        &bin("kata-netmon"),
        "nktest",
        std::path::Path::new("/var/run/netns/kr-none"),
    )
    .await
    .unwrap();

    // a netns that does not exist: named in the error, nothing left
    let e = NetmonProcess::spawn(
        &bin("kata-netmon"),
        "nkbad",
        std::path::Path::new("/var/run/netns/kr-does-not-exist"),
        &dir.path().join("bad.sock"),
        Model::Tcfilter,
        T,
    )
    .await
    .err()
    .expect("a missing netns fails");
    let msg = e.to_string();
    assert!(msg.contains("/var/run/netns/kr-does-not-exist"), "{msg}");
    assert!(!dir.path().join("bad.sock").exists());
}

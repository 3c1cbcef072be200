//! Pod networking (`ctr run --cni` with Debian's bridge plugin, ctr and the
//! plugins in a namespace of their own): TCP throughput both ways between a
//! container and a peer on the bridge (the bench itself, listening in the
//! bridge's namespace), ping round trips, for kata-rs with tcfilter and
//! macvtap and for runc on the same bridge; what the network adds to a pod's
//! start; kata-netmon's memory.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use kata_tests::containerd::Containerd;
use kata_tests::net::{Cni, Netns};
use kata_tests::shim::{kill_and_delete, pod_processes, wait_task_status, write_config, RUNTIME};

use super::{pct, pss_kib};

const MIB: usize = 64;
const STARTS: usize = 3;

fn exec(c: &Containerd, id: &str, exec_id: &str, cmd: &str) -> String {
    c.ctr_ok(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", cmd])
}

/// Container → peer, MiB/s: busybox httpd in the container serves a blob
/// (sendfile: large segments, where busybox nc would write a few KiB at a
/// time), the peer fetches it and times the first byte to the last.
fn to_peer(c: &Containerd, id: &str, ns: &Netns) -> f64 {
    let ip = exec(c, id, "addr", "ip -o -4 addr show eth0");
    let ip = ip
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no address in {ip}"))
        .to_string();
    ns.run_in(move || {
        let mut s = TcpStream::connect((ip.as_str(), 8080)).expect("connect to the container");
        s.write_all(b"GET /blob HTTP/1.0\r\n\r\n").expect("request");
        let mut buf = vec![0u8; 256 * 1024];
        let (mut got, mut t0) = (0usize, None);
        loop {
            let n = s.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            t0.get_or_insert_with(Instant::now);
            got += n;
        }
        assert!(got >= MIB << 20, "got {got} bytes");
        MIB as f64 / t0.unwrap().elapsed().as_secs_f64()
    })
}

/// Peer → container, MiB/s: the peer times the accept to its last write
/// (its send buffer kept at 256 KiB, so little is still on the way); the
/// container counts what arrived.
fn from_peer(c: &Containerd, id: &str, l: &TcpListener, gw: &str) -> f64 {
    let port = l.local_addr().unwrap().port();
    let l = l.try_clone().unwrap();
    let tx = std::thread::spawn(move || {
        let (mut s, _): (TcpStream, _) = l.accept().expect("accept");
        let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::SndBuf, &(256 * 1024));
        let chunk = vec![7u8; 256 * 1024];
        let t0 = Instant::now();
        for _ in 0..(MIB << 20) / chunk.len() {
            s.write_all(&chunk).expect("write");
        }
        let t = t0.elapsed().as_secs_f64();
        let _ = s.shutdown(std::net::Shutdown::Both);
        t
    });
    let n = exec(c, id, "rx", &format!("nc {gw} {port} </dev/null | wc -c"));
    let t = tx.join().expect("sender");
    assert_eq!(
        n.trim(),
        (MIB << 20).to_string(),
        "the container got it all"
    );
    MIB as f64 / t
}

/// Ping round trip to the gateway, ms (average of 20).
fn ping(c: &Containerd, id: &str, gw: &str) -> f64 {
    let out = exec(c, id, "ping", &format!("ping -c 20 -i 0.2 {gw}"));
    out.lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no round trip in {out}"))
}

struct Figures {
    label: String,
    to_peer: f64,
    from_peer: f64,
    rtt: f64,
}

fn measure(cni: &Cni, label: &str, runtime: &str, model: &str, id: &str) -> (Figures, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(
        &tmp.path().join("configuration.toml"),
        "",
        &format!("[runtime]\ninternetworking_model = \"{model}\"\n"),
    );
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    c.ctr_ok_in_netns(
        &cni.host.name,
        &[
            "run",
            "-d",
            "--cni",
            "--runtime",
            runtime,
            &image,
            id,
            "sh",
            "-c",
            &format!(
                "mkdir /www && dd if=/dev/zero of=/www/blob bs=1M count={MIB} 2>/dev/null && touch /ready && exec httpd -f -p 8080 -h /www"
            ),
        ],
    );
    wait_task_status(&c, id, "RUNNING", std::time::Duration::from_secs(120));
    let t0 = Instant::now();
    while c
        .ctr(&["task", "exec", "--exec-id", "r", id, "test", "-e", "/ready"])
        .status
        .code()
        != Some(0)
    {
        assert!(t0.elapsed().as_secs() < 120, "{id} never wrote its blob");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let gw = cni.gateway();
    let l = cni
        .host
        .run_in(|| TcpListener::bind("0.0.0.0:0").expect("bind in the bridge's netns"));
    // best of two: this machine's speed drifts
    let tp = to_peer(&c, id, &cni.host).max(to_peer(&c, id, &cni.host));
    let fp = from_peer(&c, id, &l, &gw).max(from_peer(&c, id, &l, &gw));
    let rtt = ping(&c, id, &gw);
    let netmon = pod_processes(id)
        .into_iter()
        .find(|(_, cmd)| {
            cmd.split(' ')
                .next()
                .is_some_and(|a| a.ends_with("kata-netmon"))
        })
        .map(|(pid, _)| pss_kib(pid))
        .unwrap_or(0);
    kill_and_delete(&c, id);
    (
        Figures {
            label: label.into(),
            to_peer: tp,
            from_peer: fp,
            rtt,
        },
        netmon,
    )
}

/// `ctr run --rm` to the first output byte, with and without `--cni`, s.
fn start_cost(cni: &Cni) -> (f64, f64) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(&tmp.path().join("configuration.toml"), "", "");
    let c = Containerd::builder().kata_config(&cfg).start();
    let image = c.import_busybox();
    let mut with = vec![];
    let mut without = vec![];
    for i in 0..STARTS {
        for (cni_on, v) in [(true, &mut with), (false, &mut without)] {
            let id = format!("bnst{i}{}", u8::from(cni_on));
            let mut args = vec!["ip", "netns", "exec", &cni.host.name, "ctr", "-a"];
            let addr = c.address().display().to_string();
            args.push(&addr);
            args.extend(["-n", c.namespace(), "run", "--rm"]);
            if cni_on {
                args.push("--cni");
            }
            args.extend(["--runtime", RUNTIME, &image, &id, "echo", "up"]);
            let t0 = Instant::now();
            let out = std::process::Command::new(args[0])
                .args(&args[1..])
                .output()
                .expect("ctr run");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            v.push(t0.elapsed().as_secs_f64());
        }
    }
    with.sort_by(f64::total_cmp);
    without.sort_by(f64::total_cmp);
    (pct(&with, 0.5), pct(&without, 0.5))
}

/// The section of the report.
pub fn net_section() {
    let cni = Cni::new("bn", 95);
    let mut rows = vec![];
    let (tc, netmon_pss) = measure(&cni, "kata-rs, tcfilter", RUNTIME, "tcfilter", "bntc");
    rows.push(tc);
    rows.push(measure(&cni, "kata-rs, macvtap", RUNTIME, "macvtap", "bnmv").0);
    rows.push(measure(&cni, "runc", "io.containerd.runc.v2", "tcfilter", "bnrc").0);
    let (with, without) = start_cost(&cni);
    let runc = &rows[2];
    println!("\n## Pod networking (kata-bench)\n");
    println!(
        "`ctr run --cni` with Debian's bridge + host-local plugins; the peer is this program in the bridge's namespace; {MIB} MiB over TCP (container → peer: busybox httpd in the container, fetched by the peer; peer → container: busybox nc in the container), best of two; ping to the gateway, average of 20. TCG bounds the VM's figures: the ratio to runc is the figure to compare.\n"
    );
    println!("| path | container → peer | peer → container | ping RTT |\n|---|---|---|---|");
    for f in &rows {
        println!(
            "| {} | {:.1} MiB/s ({:.2}x runc) | {:.1} MiB/s ({:.2}x runc) | {:.3} ms |",
            f.label,
            f.to_peer,
            f.to_peer / runc.to_peer,
            f.from_peer,
            f.from_peer / runc.from_peer,
            f.rtt
        );
    }
    println!("\n| figure | value |\n|---|---|");
    println!(
        "| `ctr run --rm` to exit, median of {STARTS}: with `--cni` / without | {with:.2} s / {without:.2} s |"
    );
    println!("| kata-netmon PSS, one pod, idle | {netmon_pss} KiB |");
}

//! kata-trace-forwarder, the binary, as the shim runs it: the guest side of
//! its socket (what the VM's vsock hands it, byte for byte) sends garbage,
//! oversized frames, another version, then a good stream; the forwarder
//! drops each bad connection, keeps serving, and writes the good spans.

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kata_proto::trace::wire::{self, frame::Body, Frame, Record};

fn span(name: &str, i: u8) -> wire::Span {
    wire::Span {
        trace_id: vec![7; 16],
        span_id: vec![i; 8],
        name: name.into(),
        start_unix_nano: 1,
        end_unix_nano: 2,
        service: "kata-agent".into(),
        ..Default::default()
    }
}

/// Sends `bytes`, then waits until the forwarder closes the connection.
fn send_and_wait_close(sock: &std::path::Path, bytes: &[u8]) {
    let mut s = UnixStream::connect(sock).expect("connect to the forwarder");
    let _ = s.write_all(bytes);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 16];
    // the forwarder never writes: a read returns only at the close
    let n = s.read(&mut b);
    assert!(matches!(n, Ok(0)) || n.is_err(), "closed: {n:?}");
}

#[test]
fn bad_streams_are_dropped_and_the_forwarder_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vsock.sock_10240");
    let dump = dir.path().join("spans.jsonl");
    let mut fwd = Command::new(kata_tests::bin("kata-trace-forwarder"))
        .arg("--socket-path")
        .arg(&sock)
        .arg("--dump-only")
        .arg("--dump-file")
        .arg(&dump)
        .arg("--sandbox-id")
        .arg("fw-test")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kata-trace-forwarder runs");
    let mut ready = String::new();
    std::io::BufReader::new(fwd.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "READY");

    // garbage, another version, an oversized frame, a frame that is not one
    send_and_wait_close(&sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut v9 = wire::PREAMBLE.to_vec();
    v9[7] = 9;
    send_and_wait_close(&sock, &v9);
    let mut big = wire::PREAMBLE.to_vec();
    big.extend_from_slice(&((wire::MAX_FRAME + 1) as u32).to_be_bytes());
    big.extend(std::iter::repeat_n(0u8, 4096));
    send_and_wait_close(&sock, &big);
    let mut junk = wire::PREAMBLE.to_vec();
    junk.extend_from_slice(&[0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    send_and_wait_close(&sock, &junk);
    // a span that breaks the schema (a zero trace id) after a good one
    let mut mixed = wire::PREAMBLE.to_vec();
    let mut bad = span("bad", 2);
    bad.trace_id = vec![0; 16];
    for s in [span("kept-before-the-bad-one", 1), bad] {
        wire::encode_frame(
            &Frame {
                body: Some(Body::Span(s)),
            },
            &mut mixed,
        )
        .unwrap();
    }
    send_and_wait_close(&sock, &mixed);

    // still serving: a good stream is written out
    let mut good = wire::PREAMBLE.to_vec();
    for (i, n) in ["CreateContainer", "StartContainer"].iter().enumerate() {
        wire::encode_frame(
            &Frame {
                body: Some(Body::Span(span(n, 10 + i as u8))),
            },
            &mut good,
        )
        .unwrap();
    }
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&good).unwrap();
    drop(s);
    let t0 = Instant::now();
    let names = loop {
        let text = std::fs::read_to_string(&dump).unwrap_or_default();
        let names: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Record>(l).unwrap().name)
            .collect();
        if names.len() >= 3 || t0.elapsed() > Duration::from_secs(10) {
            break names;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        names,
        [
            "kept-before-the-bad-one",
            "CreateContainer",
            "StartContainer"
        ]
    );
    assert!(fwd.try_wait().unwrap().is_none(), "the forwarder runs on");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fwd.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = fwd.wait().unwrap();
    assert!(status.success(), "{status}");
    let mut log = String::new();
    fwd.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(
        log.contains(
            "received 3 spans, forwarded 3, dropped 0 here and 0 by the agent; 5 streams refused"
        ),
        "{log}"
    );
    assert!(!sock.exists(), "the socket is removed at exit");
}

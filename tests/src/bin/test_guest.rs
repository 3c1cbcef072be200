//! kata-test-guest: the guest-side peer of the vsock tests, booted as
//! `rdinit=/usr/bin/kata-test-guest` from a test image (`kata-ctl image build
//! --extra target/.../kata-test-guest`). It sets the guest up like the agent
//! (mounts, modules), announces itself on the readiness port, then serves:
//!
//! * port 5000: echo, full duplex; when the host half-closes, it finishes echoing
//!   and half-closes back;
//! * port 5002: dial-back: reads a line `N PORT`, opens N concurrent connections
//!   to host port PORT, writes `hello <i>\n` on each, expects it echoed, then
//!   answers `ok <n>\n` (how many succeeded);
//! * port 5003: power off;
//! * port 5004: console flood (a hostile guest filling the host's console log):
//!   reads a line `N`, writes N bytes to `/dev/ttyS0` (the serial console),
//!   answers `wrote <n> <ms>\n`.
//!
//! Nothing listens on 1024: a host `CONNECT 1024` must be refused.
//!
//! `kata-test-guest send PORT MIB` (not as init, e.g. in a container of a
//! pod) connects to host vsock port PORT, writes MIB MiB of zeros and
//! closes: the raw vsock throughput the benchmarks compare stdout with.
//! `send PORT -` sends its stdin instead, with the agent's copy of a
//! process's output (the stdout path without the shim).
//! `kata-test-guest write MIB` writes the same zeros, from the same buffer,
//! to its stdout: the stdout path with the very writer of `send`.

use std::os::fd::AsFd;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_vsock::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY, VMADDR_CID_HOST};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("send") {
        std::process::exit(send(&args[2..]));
    }
    if args.get(1).map(String::as_str) == Some("write") {
        std::process::exit(write_stdout(&args[2..]));
    }
    if std::process::id() == 1 {
        if let Err(e) = kata_agent::init::early_mounts() {
            eprintln!("test guest: {e}");
        }
    }
    kata_proto::logging::init("kata-test-guest", None);
    let rt = kata_proto::runtime();
    let Ok(rt) = rt else {
        kata_agent::init::power_off();
    };
    rt.block_on(async {
        if std::process::id() == 1 {
            kata_agent::reaper::start(true);
            if let Err(e) = kata_agent::init::load_modules() {
                eprintln!("test guest: {e}");
            }
        }
        let echo = listen(5000);
        let dialback = listen(5002);
        let off = listen(5003);
        let flood = listen(5004);
        tokio::spawn(kata_agent::announce(kata_proto::paths::ports::READY));
        tokio::spawn(async move {
            loop {
                if let Ok((s, _)) = echo.accept().await {
                    tokio::spawn(serve_echo(s));
                }
            }
        });
        tokio::spawn(async move {
            loop {
                if let Ok((s, _)) = dialback.accept().await {
                    tokio::spawn(serve_dialback(s));
                }
            }
        });
        tokio::spawn(async move {
            loop {
                if let Ok((s, _)) = flood.accept().await {
                    tokio::spawn(serve_console_flood(s));
                }
            }
        });
        let _ = off.accept().await;
    });
    kata_agent::init::power_off();
}

/// `write MIB`: MIB MiB of zeros to stdout, 1 MiB per write(2) as `send`.
fn write_stdout(args: &[String]) -> i32 {
    use std::io::Write;
    let Some(mib) = args.first().and_then(|a| a.parse::<usize>().ok()) else {
        eprintln!("usage: kata-test-guest write MIB");
        return 2;
    };
    let out = match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("kata-test-guest write: stdout: {e}");
            return 1;
        }
    };
    let mut out = std::fs::File::from(out);
    let buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        if let Err(e) = out.write_all(&buf) {
            eprintln!("kata-test-guest write: {e}");
            return 1;
        }
    }
    0
}

/// `send PORT MIB`: MIB MiB of zeros to host vsock port PORT.
fn send(args: &[String]) -> i32 {
    let port = args.first().and_then(|a| a.parse::<u32>().ok());
    // None: stdin
    let mib = match args.get(1).map(String::as_str) {
        Some("-") => Some(None),
        Some(n) => n.parse::<usize>().ok().map(Some),
        None => None,
    };
    let (Some(port), Some(mib)) = (port, mib) else {
        eprintln!("usage: kata-test-guest send PORT MIB|-");
        return 2;
    };
    let Ok(rt) = kata_proto::runtime() else {
        return 1;
    };
    rt.block_on(async move {
        let mut s = match VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, port)).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("kata-test-guest send: host port {port}: {e}");
                return 1;
            }
        };
        let sent = match mib {
            Some(mib) => {
                let buf = vec![0u8; 1 << 20];
                let mut r = Ok(());
                for _ in 0..mib {
                    r = s.write_all(&buf).await;
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
            // the agent's own copy of a process's output
            None => match std::io::stdin().as_fd().try_clone_to_owned() {
                Ok(fd) => {
                    // the agent's pipes are 1 MiB; the shell's are not
                    kata_agent::childinit::grow_pipe(&fd);
                    kata_agent::stdio::copy_out(fd, &mut s).await
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = sent {
            eprintln!("kata-test-guest send: {e}");
            return 1;
        }
        if mib.is_some() {
            let _ = AsyncWriteExt::shutdown(&mut s).await;
        }
        0
    })
}

fn listen(port: u32) -> VsockListener {
    match VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("test guest: cannot listen on vsock port {port}: {e}");
            kata_agent::init::power_off();
        }
    }
}

async fn serve_echo(s: VsockStream) {
    let (mut r, mut w) = tokio::io::split(s);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = w.shutdown().await;
    // keep the socket until the host closes its side
    let _ = tokio::time::timeout(Duration::from_secs(30), r.read(&mut buf)).await;
}

async fn serve_dialback(s: VsockStream) {
    let mut s = BufReader::new(s);
    let mut line = String::new();
    if s.read_line(&mut line).await.is_err() {
        return;
    }
    let mut it = line
        .split_whitespace()
        .map(|w| w.parse::<u32>().unwrap_or(0));
    let (n, port) = (it.next().unwrap_or(0).min(1000), it.next().unwrap_or(0));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, port))
                    .await
                    .ok()?;
                let msg = format!("hello {i}\n");
                c.write_all(msg.as_bytes()).await.ok()?;
                let mut back = vec![0u8; msg.len()];
                c.read_exact(&mut back).await.ok()?;
                (back == msg.as_bytes()).then_some(())
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if let Ok(Some(())) = t.await {
            ok += 1;
        }
    }
    let _ = s.get_mut().write_all(format!("ok {ok}\n").as_bytes()).await;
}

async fn serve_console_flood(s: VsockStream) {
    let mut s = BufReader::new(s);
    let mut line = String::new();
    if s.read_line(&mut line).await.is_err() {
        return;
    }
    let n: u64 = line.trim().parse().unwrap_or(0);
    let t0 = std::time::Instant::now();
    let wrote = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let Ok(mut tty) = std::fs::OpenOptions::new().write(true).open("/dev/ttyS0") else {
            return 0u64;
        };
        let chunk: Vec<u8> = (0..64 * 1024)
            .map(|i| {
                if i % 64 == 63 {
                    b'\n'
                } else {
                    b'A' + (i % 26) as u8
                }
            })
            .collect();
        let mut done = 0u64;
        while done < n {
            let want = (n - done).min(chunk.len() as u64) as usize;
            match tty.write(&chunk[..want]) {
                Ok(0) | Err(_) => break,
                Ok(w) => done += w as u64,
            }
        }
        done
    })
    .await
    .unwrap_or(0);
    let ms = t0.elapsed().as_millis();
    let _ = s
        .get_mut()
        .write_all(format!("wrote {wrote} {ms}\n").as_bytes())
        .await;
}

//! containerd-shim-kata-v2: see the library.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;

use kata_shim::shim::{KataShim, RUNTIME};

fn main() {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = containerd_shim::parse(&args[1..]).ok();
    let id = flags.as_ref().map(|f| f.id.clone()).unwrap_or_default();
    let serving = flags.as_ref().is_some_and(|f| f.action.is_empty());
    // The serving shim logs to the `log` FIFO containerd reads in the bundle
    // (its cwd); `start` and `delete` print to stderr, which containerd shows.
    let log = serving
        .then(|| {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open("log")
                .ok()
        })
        .flatten();
    match log {
        Some(f) => {
            // blocking writes from here on: a slow reader slows logging, it
            // never loses lines
            // SAFETY: fcntl on an fd we own.
            unsafe {
                let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
                let fl = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
            kata_proto::logging::init_with_writer(
                "containerd-shim-kata-v2",
                (!id.is_empty()).then_some(id.as_str()),
                std::sync::Mutex::new(f),
            )
        }
        None => kata_proto::logging::init(
            "containerd-shim-kata-v2",
            (!id.is_empty()).then_some(id.as_str()),
        ),
    }
    if serving {
        kata_shim::monitor::install_recorder();
    }
    let rt = match kata_proto::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-kata-v2: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let config = containerd_shim::Config {
        no_setup_logger: true,
        // the helpers are tokio children: tokio reaps them
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    rt.block_on(containerd_shim::asynchronous::run::<KataShim>(
        RUNTIME,
        Some(config),
    ));
    // a stdin copy may still wait in a blocking FIFO open: do not wait for it
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    kata_proto::trace::flush(std::time::Duration::from_secs(2));
}

//! Counters of the FUSE requests served: count, errors and a latency histogram
//! per opcode, bytes read and written, malformed requests.
//!
//! fuse-backend-rs's `Server::handle_message` calls a [`MetricsHook`] before it
//! dispatches a decoded request ([`Hook::collect`] notes the opcode and the start
//! time in a thread-local); the transport loop calls [`Metrics::finish`] once
//! `handle_message` returned, with whether it failed. The filesystem wrapper
//! ([`crate::fs`]) marks the current request as failed when the filesystem
//! answered with an error, and adds the bytes of READ and WRITE replies. A
//! request for which `collect` never ran (no readable header, a length over the
//! limit) is counted as malformed. Everything is lock-free atomics: the vhost
//! worker threads never wait on the control endpoint.
//!
//! Refusals by the per-VM caps ([`crate::fs::Limits`]) are counted too and
//! reported as two extra entries of the `ops` list (the proto has no field of
//! its own for them): `REFUSED_HANDLES` (OPEN, CREATE, OPENDIR answered
//! `EMFILE`) and `REFUSED_INODES` (lookups answered `ENFILE`), each with
//! `count` = `errors` = the refusals and a histogram without bounds (one
//! bucket holding them all, latency sum 0: nothing is timed); like the
//! opcodes, they appear once non-zero.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::server::MetricsHook;
use kata_proto::virtiofsd::{MetricsResponse, OpStats};

/// Upper bounds of the latency buckets in microseconds; one more bucket holds
/// everything slower.
pub const LATENCY_BOUNDS_US: [u64; 12] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000,
];
const BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// Highest FUSE opcode with its own slot (FUSE_STATX is 52); CUSE_INIT (4096) and
/// anything unknown share the last slot.
const MAX_OPCODE: usize = 63;
const OTHER: usize = MAX_OPCODE + 1;

/// The name of a FUSE opcode as the kernel's fuse.h spells it, without `FUSE_`.
pub fn opcode_name(opcode: u32) -> Option<&'static str> {
    Some(match opcode {
        1 => "LOOKUP",
        2 => "FORGET",
        3 => "GETATTR",
        4 => "SETATTR",
        5 => "READLINK",
        6 => "SYMLINK",
        8 => "MKNOD",
        9 => "MKDIR",
        10 => "UNLINK",
        11 => "RMDIR",
        12 => "RENAME",
        13 => "LINK",
        14 => "OPEN",
        15 => "READ",
        16 => "WRITE",
        17 => "STATFS",
        18 => "RELEASE",
        20 => "FSYNC",
        21 => "SETXATTR",
        22 => "GETXATTR",
        23 => "LISTXATTR",
        24 => "REMOVEXATTR",
        25 => "FLUSH",
        26 => "INIT",
        27 => "OPENDIR",
        28 => "READDIR",
        29 => "RELEASEDIR",
        30 => "FSYNCDIR",
        31 => "GETLK",
        32 => "SETLK",
        33 => "SETLKW",
        34 => "ACCESS",
        35 => "CREATE",
        36 => "INTERRUPT",
        37 => "BMAP",
        38 => "DESTROY",
        39 => "IOCTL",
        40 => "POLL",
        41 => "NOTIFY_REPLY",
        42 => "BATCH_FORGET",
        43 => "FALLOCATE",
        44 => "READDIRPLUS",
        45 => "RENAME2",
        46 => "LSEEK",
        47 => "COPY_FILE_RANGE",
        48 => "SETUPMAPPING",
        49 => "REMOVEMAPPING",
        50 => "SYNCFS",
        51 => "TMPFILE",
        52 => "STATX",
        _ => return None,
    })
}

#[derive(Default)]
struct OpCounters {
    count: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

/// All counters of one daemon.
pub struct Metrics {
    ops: Vec<OpCounters>,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    malformed: AtomicU64,
    refused_handles: AtomicU64,
    /// Shared with the passthrough, which refuses new inodes itself.
    refused_inodes: Arc<AtomicU64>,
}

/// The `ops` entry of OPEN/CREATE/OPENDIR refused by the handle cap.
pub const REFUSED_HANDLES: &str = "REFUSED_HANDLES";
/// The `ops` entry of lookups refused by the inode cap.
pub const REFUSED_INODES: &str = "REFUSED_INODES";

/// The request the current thread is serving.
#[derive(Clone, Copy)]
struct Current {
    opcode: u32,
    start: Instant,
    failed: bool,
}

thread_local! {
    static CURRENT: Cell<Option<Current>> = const { Cell::new(None) };
}

/// Marks the request the calling thread is serving as failed (an error reply).
pub fn mark_error() {
    CURRENT.with(|c| {
        if let Some(mut cur) = c.get() {
            cur.failed = true;
            c.set(Some(cur));
        }
    });
}

fn slot(opcode: u32) -> usize {
    if (opcode as usize) <= MAX_OPCODE && opcode_name(opcode).is_some() {
        opcode as usize
    } else {
        OTHER
    }
}

fn bucket(us: u64) -> usize {
    LATENCY_BOUNDS_US
        .iter()
        .position(|&b| us <= b)
        .unwrap_or(LATENCY_BOUNDS_US.len())
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            ops: (0..=OTHER).map(|_| OpCounters::default()).collect(),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            refused_handles: AtomicU64::new(0),
            refused_inodes: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Metrics {
    /// Bytes sent to the guest by READ.
    pub fn add_read(&self, n: usize) {
        self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes written for the guest by WRITE.
    pub fn add_written(&self, n: usize) {
        self.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// An OPEN, CREATE or OPENDIR refused by the handle cap.
    pub fn refuse_handle(&self) {
        self.refused_handles.fetch_add(1, Ordering::Relaxed);
    }

    /// A lookup refused by the inode cap.
    pub fn refuse_inode(&self) {
        self.refused_inodes.fetch_add(1, Ordering::Relaxed);
    }

    /// The counter of inode-cap refusals, for the passthrough to add to.
    pub fn refused_inodes_counter(&self) -> Arc<AtomicU64> {
        self.refused_inodes.clone()
    }

    /// Refusals by the caps so far: (handles, inodes).
    pub fn refusals(&self) -> (u64, u64) {
        (
            self.refused_handles.load(Ordering::Relaxed),
            self.refused_inodes.load(Ordering::Relaxed),
        )
    }

    /// The hook to hand to `Server::handle_message`.
    pub fn hook(&self) -> Hook {
        Hook
    }

    /// Ends the request the calling thread served: `failed` is whether
    /// `handle_message` returned an error (a request it could not decode or
    /// answer). A request whose header never decoded counts as malformed.
    pub fn finish(&self, failed: bool) {
        let Some(cur) = CURRENT.with(|c| c.take()) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if failed {
            self.malformed.fetch_add(1, Ordering::Relaxed);
        }
        let op = &self.ops[slot(cur.opcode)];
        let us = cur.start.elapsed().as_micros().min(u64::MAX as u128) as u64;
        op.count.fetch_add(1, Ordering::Relaxed);
        // an unknown opcode is answered ENOSYS by the server itself
        if cur.failed || failed || slot(cur.opcode) == OTHER {
            op.errors.fetch_add(1, Ordering::Relaxed);
        }
        op.buckets[bucket(us)].fetch_add(1, Ordering::Relaxed);
        op.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// A snapshot for the control endpoint; opcodes never seen are left out.
    pub fn snapshot(&self) -> MetricsResponse {
        let mut ops = Vec::new();
        for (i, c) in self.ops.iter().enumerate() {
            let count = c.count.load(Ordering::Relaxed);
            if count == 0 {
                continue;
            }
            let name = if i == OTHER {
                "OTHER".to_string()
            } else {
                opcode_name(i as u32).unwrap_or("OTHER").to_string()
            };
            ops.push(OpStats {
                op: name,
                count,
                errors: c.errors.load(Ordering::Relaxed),
                latency_bounds_us: LATENCY_BOUNDS_US.to_vec(),
                latency_counts: c
                    .buckets
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .collect(),
                latency_sum_us: c.sum_us.load(Ordering::Relaxed),
            });
        }
        let (handles, inodes) = self.refusals();
        for (name, n) in [(REFUSED_HANDLES, handles), (REFUSED_INODES, inodes)] {
            if n > 0 {
                // no bounds and one bucket holding them all: the histogram's
                // shape rules hold, no latency is made up
                ops.push(OpStats {
                    op: name.to_string(),
                    count: n,
                    errors: n,
                    latency_bounds_us: Vec::new(),
                    latency_counts: vec![n],
                    latency_sum_us: 0,
                });
            }
        }
        MetricsResponse {
            ops,
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
        }
    }
}

/// fuse-backend-rs's hook: notes the opcode and start time of the request.
pub struct Hook;

impl MetricsHook for Hook {
    fn collect(&self, ih: &InHeader) {
        CURRENT.with(|c| {
            c.set(Some(Current {
                opcode: ih.opcode,
                start: Instant::now(),
                failed: false,
            }))
        });
    }

    // The server passes no out header (its reply paths do not expose it); the
    // transport loop calls `Metrics::finish` instead.
    fn release(&self, _oh: Option<&OutHeader>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(opcode: u32) -> InHeader {
        InHeader {
            opcode,
            ..Default::default()
        }
    }

    #[test]
    fn counts_errors_latency_and_malformed() {
        let m = Metrics::default();
        let h = m.hook();
        h.collect(&header(1));
        m.finish(false);
        h.collect(&header(1));
        mark_error();
        m.finish(false);
        h.collect(&header(15));
        m.add_read(4096);
        m.finish(false);
        h.collect(&header(999));
        m.finish(false);
        // no collect: the header did not decode
        m.finish(true);
        let s = m.snapshot();
        let lookup = s.ops.iter().find(|o| o.op == "LOOKUP").unwrap();
        assert_eq!((lookup.count, lookup.errors), (2, 1));
        assert_eq!(lookup.latency_counts.len(), LATENCY_BOUNDS_US.len() + 1);
        assert_eq!(lookup.latency_counts.iter().sum::<u64>(), 2);
        let read = s.ops.iter().find(|o| o.op == "READ").unwrap();
        assert_eq!((read.count, read.errors), (1, 0));
        let other = s.ops.iter().find(|o| o.op == "OTHER").unwrap();
        assert_eq!((other.count, other.errors), (1, 1));
        assert_eq!(s.bytes_read, 4096);
        assert_eq!(s.malformed, 1);
        assert!(s.ops.iter().all(|o| o.op != "WRITE"));
        assert!(s.ops.iter().all(|o| !o.op.starts_with("REFUSED_")));
    }

    #[test]
    fn cap_refusals_are_reported() {
        let m = Metrics::default();
        m.refuse_handle();
        m.refuse_handle();
        m.refused_inodes_counter().fetch_add(3, Ordering::Relaxed);
        m.refuse_inode();
        assert_eq!(m.refusals(), (2, 4));
        let s = m.snapshot();
        let h = s.ops.iter().find(|o| o.op == REFUSED_HANDLES).unwrap();
        assert_eq!((h.count, h.errors), (2, 2));
        assert_eq!(h.latency_counts.len(), h.latency_bounds_us.len() + 1);
        assert_eq!(h.latency_counts.iter().sum::<u64>(), h.count);
        let i = s.ops.iter().find(|o| o.op == REFUSED_INODES).unwrap();
        assert_eq!((i.count, i.errors), (4, 4));
    }

    #[test]
    fn mark_error_outside_a_request_is_harmless() {
        mark_error();
        let m = Metrics::default();
        m.finish(false);
        assert_eq!(m.snapshot().malformed, 1);
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(10), 0);
        assert_eq!(bucket(11), 1);
        assert_eq!(bucket(u64::MAX), LATENCY_BOUNDS_US.len());
    }
}

//! kata-fsbench: the filesystem workload of `make bench`, run inside a guest
//! container on a virtio-fs directory (or on the host, on a FUSE mount or a
//! plain directory, for the floor). Prints one JSON object.
//!
//! `kata-fsbench DIR [MIB] [FILES]`: sequential write then read of a MIB MiB
//! file (1 MiB blocks), 4 KiB random reads of it, create+stat+unlink of FILES
//! small files, and a readdir of FILES entries (right after dropping the
//! caches, and again 2 s later: `readdir_settled_entries_s`). Caches are
//! dropped between phases when /proc/sys/vm/drop_caches is writable. The
//! write figure includes the final fsync; `write_nosync_mib_s` does not.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// A small xorshift generator: no dependency, reproducible offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(1).map(String::as_str).unwrap_or("."));
    let mib: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(256);
    let files: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let work = dir.join("kata-fsbench");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work directory");

    // sequential write
    let big = work.join("big");
    let block = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = File::create(&big).expect("create");
    for _ in 0..mib {
        f.write_all(&block).expect("write");
    }
    // the writes alone, before the fsync flushes the host's page cache to disk
    let write_nosync_mib_s = mib as f64 / t.elapsed().as_secs_f64();
    f.sync_all().expect("fsync");
    drop(f);
    let write_mib_s = mib as f64 / t.elapsed().as_secs_f64();

    // sequential read
    drop_caches();
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut f = File::open(&big).expect("open");
    let mut total = 0usize;
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, mib << 20, "read back what was written");
    let read_mib_s = mib as f64 / t.elapsed().as_secs_f64();

    // random 4 KiB reads
    drop_caches();
    let f = OpenOptions::new().read(true).open(&big).expect("open");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let blocks = (mib << 20) / 4096;
    let n_random = 4096;
    let mut small = [0u8; 4096];
    let t = Instant::now();
    for _ in 0..n_random {
        let off = (rng.next() as usize % blocks) * 4096;
        f.read_exact_at(&mut small, off as u64).expect("pread");
    }
    let random_iops = n_random as f64 / t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&big).expect("unlink big");

    // create + stat + unlink
    let meta = work.join("meta");
    std::fs::create_dir(&meta).expect("mkdir");
    let t = Instant::now();
    for i in 0..files {
        let p = meta.join(format!("f{i}"));
        File::create(&p).expect("create small");
        std::fs::metadata(&p).expect("stat");
        std::fs::remove_file(&p).expect("unlink");
    }
    let meta_ops_s = (3 * files) as f64 / t.elapsed().as_secs_f64();

    // readdir of FILES entries
    for i in 0..files {
        File::create(meta.join(format!("f{i}"))).expect("create small");
    }
    drop_caches();
    let t = Instant::now();
    let n = std::fs::read_dir(&meta).expect("readdir").count();
    let readdir_s = t.elapsed().as_secs_f64();
    assert_eq!(n, files);
    let readdir_entries_s = files as f64 / readdir_s;
    // the same once the FORGETs that dropping the caches sent have been
    // served: the figure above also counts the daemon working through them
    drop_caches();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let t = Instant::now();
    let n = std::fs::read_dir(&meta).expect("readdir").count();
    let settled_s = t.elapsed().as_secs_f64();
    assert_eq!(n, files);
    let readdir_settled_entries_s = files as f64 / settled_s;
    let _ = std::fs::remove_dir_all(&work);

    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "{{\"write_mib_s\":{write_mib_s:.1},\"write_nosync_mib_s\":{write_nosync_mib_s:.1},\"read_mib_s\":{read_mib_s:.1},\"random_4k_iops\":{random_iops:.0},\"meta_ops_s\":{meta_ops_s:.0},\"readdir_entries_s\":{readdir_entries_s:.0},\"readdir_settled_entries_s\":{readdir_settled_entries_s:.0},\"mib\":{mib},\"files\":{files}}}"
    );
}

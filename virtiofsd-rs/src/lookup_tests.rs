//! LOOKUP, READDIR and READDIRPLUS through the guard and the patched
//! passthrough (vendor/fuse-backend-rs/KATA-PATCHES.md): the stat-first path
//! for inodes already held, the host's inode numbers in READDIR entries, and
//! lookup counts that FORGET can bring back to zero.

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::FsOptions;
use fuse_backend_rs::api::filesystem::{Context, Entry, FileSystem};
use fuse_backend_rs::passthrough::Config;

use crate::fs::{GuardedFs, Policy};
use crate::metrics::Metrics;

const ROOT: u64 = 1;

fn fs_over(dir: &Path) -> GuardedFs {
    let cfg = Config {
        root_dir: std::fs::canonicalize(dir)
            .unwrap()
            .to_string_lossy()
            .into_owned(),
        do_import: true,
        ..Default::default()
    };
    let fs = GuardedFs::new(cfg, Policy::default(), Arc::new(Metrics::default())).unwrap();
    fs.init(FsOptions::empty()).unwrap();
    fs
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn lookup(fs: &GuardedFs, parent: u64, name: &str) -> std::io::Result<Entry> {
    fs.lookup(&Context::new(), parent, &c(name))
}

/// (name, ino) of a READDIR entry.
type Plain = (String, u64);
/// (name, ino, entry) of a READDIRPLUS entry.
type Plus = (String, u64, Entry);

/// Every READDIR and every READDIRPLUS entry of `dir`, sorted by name.
fn list(fs: &GuardedFs, dir: u64) -> (Vec<Plain>, Vec<Plus>) {
    let ctx = Context::new();
    let (h, _) = fs.opendir(&ctx, dir, libc::O_RDONLY as u32).unwrap();
    let h = h.unwrap();
    let mut plain = Vec::new();
    fs.readdir(&ctx, dir, h, 65536, 0, &mut |d| {
        plain.push((String::from_utf8_lossy(d.name).into_owned(), d.ino));
        Ok(1)
    })
    .unwrap();
    let mut plus = Vec::new();
    fs.readdirplus(&ctx, dir, h, 65536, 0, &mut |d, e| {
        plus.push((String::from_utf8_lossy(d.name).into_owned(), d.ino, e));
        Ok(1)
    })
    .unwrap();
    fs.releasedir(&ctx, dir, 0, h).unwrap();
    plain.sort_by(|a, b| a.0.cmp(&b.0));
    plus.sort_by(|a, b| a.0.cmp(&b.0));
    (plain, plus)
}

#[test]
fn a_known_inode_is_found_again_and_forgotten_by_count() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), b"x").unwrap();
    let fs = fs_over(dir.path());
    let host_ino = std::fs::metadata(dir.path().join("a")).unwrap().ino();

    let e1 = lookup(&fs, ROOT, "a").unwrap();
    assert_eq!(e1.attr.st_ino, host_ino);
    // the stat-first path: the same node, fresh attributes
    std::fs::write(dir.path().join("a"), b"longer").unwrap();
    let e2 = lookup(&fs, ROOT, "a").unwrap();
    assert_eq!(e2.inode, e1.inode);
    assert_eq!(e2.attr.st_size, 6);
    // two lookups, two forgets: the node is gone only after the second
    fs.forget(&Context::new(), e1.inode, 1);
    assert!(fs.getattr(&Context::new(), e1.inode, None).is_ok());
    fs.forget(&Context::new(), e1.inode, 1);
    assert!(fs.getattr(&Context::new(), e1.inode, None).is_err());
    // looked up again after that: a working node for the same file
    let e3 = lookup(&fs, ROOT, "a").unwrap();
    assert_eq!(e3.attr.st_ino, host_ino);
    assert_eq!(
        fs.getattr(&Context::new(), e3.inode, None)
            .unwrap()
            .0
            .st_size,
        6
    );
}

#[test]
fn a_name_that_now_names_another_file_is_not_the_held_inode() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), b"first").unwrap();
    let fs = fs_over(dir.path());
    let first = lookup(&fs, ROOT, "a").unwrap();
    // the host swaps another file in under the same name
    std::fs::rename(dir.path().join("a"), dir.path().join("moved")).unwrap();
    std::fs::write(dir.path().join("a"), b"second!").unwrap();
    let second = lookup(&fs, ROOT, "a").unwrap();
    assert_ne!(second.inode, first.inode);
    assert_eq!(second.attr.st_size, 7);
    // the held one is found under its new name, by the stat-first path
    let moved = lookup(&fs, ROOT, "moved").unwrap();
    assert_eq!(moved.inode, first.inode);
    assert_eq!(moved.attr.st_size, 5);
    // and a symlink put in place of a held directory is the link itself
    std::fs::create_dir(dir.path().join("d")).unwrap();
    let d = lookup(&fs, ROOT, "d").unwrap();
    std::fs::rename(dir.path().join("d"), dir.path().join("d2")).unwrap();
    std::os::unix::fs::symlink("d2", dir.path().join("d")).unwrap();
    let l = lookup(&fs, ROOT, "d").unwrap();
    assert_ne!(l.inode, d.inode);
    assert_eq!(l.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
}

#[test]
fn odd_names_resolve_as_before() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let fs = fs_over(dir.path());
    let root_ino = std::fs::metadata(dir.path()).unwrap().ino();
    // an empty name is not the directory itself
    assert!(lookup(&fs, ROOT, "").is_err());
    // ".." of the root is the root; "." and ".." elsewhere are what they name
    assert_eq!(lookup(&fs, ROOT, "..").unwrap().attr.st_ino, root_ino);
    let sub = lookup(&fs, ROOT, "sub").unwrap();
    assert_eq!(lookup(&fs, sub.inode, "..").unwrap().attr.st_ino, root_ino);
    assert_eq!(lookup(&fs, sub.inode, ".").unwrap().inode, sub.inode);
    assert_eq!(
        lookup(&fs, ROOT, "nothing").unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    assert_eq!(
        lookup(&fs, ROOT, "sub/..").unwrap_err().raw_os_error(),
        Some(libc::EINVAL)
    );
}

#[test]
fn directory_entries_carry_the_hosts_inode_numbers() {
    let dir = tempfile::tempdir().unwrap();
    for n in ["a", "b", "c"] {
        std::fs::write(dir.path().join(n), n).unwrap();
    }
    std::fs::create_dir(dir.path().join("d")).unwrap();
    let fs = fs_over(dir.path());
    // one held before the listing, the others not
    let a = lookup(&fs, ROOT, "a").unwrap();
    let (plain, plus) = list(&fs, ROOT);
    let names: Vec<&str> = plain.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
    for (name, ino) in &plain {
        let host = std::fs::symlink_metadata(dir.path().join(name))
            .unwrap()
            .ino();
        assert_eq!(*ino, host, "READDIR ino of {name}");
    }
    assert_eq!(plus.len(), 4);
    for (name, ino, e) in &plus {
        let host = std::fs::symlink_metadata(dir.path().join(name))
            .unwrap()
            .ino();
        assert_eq!(*ino, host, "READDIRPLUS ino of {name}");
        assert_eq!(e.attr.st_ino, host);
        // READDIRPLUS counts as a lookup: the next one finds the same node
        assert_eq!(lookup(&fs, ROOT, name).unwrap().inode, e.inode);
    }
    assert_eq!(plus[0].2.inode, a.inode, "the held inode is reused");
}

//! A reproducible writer (and a small reader, for tests and checks) of cpio
//! "newc" archives, the format the Linux kernel unpacks as an initramfs.
//!
//! The archive is written **uncompressed** on purpose: under TCG emulation the
//! guest kernel spends a noticeable part of the boot decompressing a gzip or xz
//! initramfs, while reading an uncompressed one costs only a copy.
//!
//! Reproducibility: entries are sorted by path (a parent always sorts before its
//! children, since it is a prefix of them), every mtime is 0, every owner is
//! root, inode numbers are assigned in that order from 1, so the same inputs
//! always give the same bytes.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Why an archive could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// An entry's path is not a clean relative path.
    #[error("initramfs entry {0:?}: paths must be relative, without `.`, `..` or empty parts")]
    BadPath(String),
    /// Two different entries for one path.
    #[error("initramfs entry {0:?} is added twice with different contents")]
    Duplicate(String),
    /// A parent of an entry is not a directory.
    #[error("initramfs entry {path:?}: its parent {parent:?} is not a directory")]
    ParentNotDir {
        /// The entry.
        path: String,
        /// The offending parent.
        parent: String,
    },
    /// A file to put in the archive could not be read.
    #[error("reading {path} for the initramfs: {source}")]
    ReadSource {
        /// The file on the host.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Writing the archive failed.
    #[error("writing the initramfs: {0}")]
    Write(#[from] io::Error),
    /// An entry is larger than the 4 GiB newc allows.
    #[error("initramfs entry {0:?} is larger than 4 GiB, which cpio newc cannot hold")]
    TooLarge(String),
    /// The bytes are not a valid newc archive.
    #[error("not a valid cpio newc archive at byte {offset}: {what}")]
    Malformed {
        /// Where.
        offset: usize,
        /// What is wrong.
        what: String,
    },
}

/// Where a regular file's contents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// Bytes held in memory.
    Bytes(Vec<u8>),
    /// A host file, read when the archive is written.
    File(PathBuf),
}

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir {
        /// Permission bits.
        perm: u32,
    },
    /// A regular file.
    File {
        /// Permission bits.
        perm: u32,
        /// Contents.
        data: Data,
    },
    /// A symbolic link.
    Symlink {
        /// Link target.
        target: String,
    },
    /// A character device node.
    CharDev {
        /// Permission bits.
        perm: u32,
        /// Device major.
        major: u32,
        /// Device minor.
        minor: u32,
    },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const TRAILER: &str = "TRAILER!!!";

impl Entry {
    fn mode(&self) -> u32 {
        match self {
            Entry::Dir { perm } => S_IFDIR | (perm & 0o7777),
            Entry::File { perm, .. } => S_IFREG | (perm & 0o7777),
            Entry::Symlink { .. } => S_IFLNK | 0o777,
            Entry::CharDev { perm, .. } => S_IFCHR | (perm & 0o7777),
        }
    }
}

/// The set of entries of an archive, keyed by path (relative, no leading `/`).
#[derive(Debug, Clone, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

fn clean(path: &str) -> Result<String, CpioError> {
    let p = path.trim_start_matches('/');
    if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(CpioError::BadPath(path.to_string()));
    }
    Ok(p.to_string())
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry; missing parent directories are added with mode 0755.
    /// Adding the same entry twice is harmless; a different one is an error.
    pub fn add(&mut self, path: &str, entry: Entry) -> Result<(), CpioError> {
        let path = clean(path)?;
        let mut parent = String::new();
        for comp in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|x| x.1)
            .unwrap_or(&[])
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            match self.entries.get(&parent) {
                None => {
                    self.entries
                        .insert(parent.clone(), Entry::Dir { perm: 0o755 });
                }
                Some(Entry::Dir { .. }) => {}
                Some(_) => return Err(CpioError::ParentNotDir { path, parent }),
            }
        }
        match self.entries.get(&path) {
            Some(old) if *old == entry => Ok(()),
            // An explicit directory may refine an implicit one's mode.
            Some(Entry::Dir { .. }) if matches!(entry, Entry::Dir { .. }) => {
                self.entries.insert(path, entry);
                Ok(())
            }
            Some(_) => Err(CpioError::Duplicate(path)),
            None => {
                self.entries.insert(path, entry);
                Ok(())
            }
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        self.add(path, Entry::Dir { perm })
    }

    /// Adds a regular file read from `src` at write time.
    pub fn file(&mut self, path: &str, perm: u32, src: &Path) -> Result<(), CpioError> {
        self.add(
            path,
            Entry::File {
                perm,
                data: Data::File(src.to_path_buf()),
            },
        )
    }

    /// Adds a regular file with the given contents.
    pub fn bytes(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<(), CpioError> {
        self.add(
            path,
            Entry::File {
                perm,
                data: Data::Bytes(data),
            },
        )
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.add(
            path,
            Entry::Symlink {
                target: target.to_string(),
            },
        )
    }

    /// Adds a character device node.
    pub fn chardev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.add(path, Entry::CharDev { perm, major, minor })
    }

    /// Writes the archive (entries in path order, then the trailer). Returns the
    /// number of bytes written.
    pub fn write_to<W: Write>(&self, out: &mut W) -> Result<u64, CpioError> {
        let mut w = Counting { inner: out, n: 0 };
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (nlink, rdev, data): (u32, (u32, u32), Vec<u8>) = match entry {
                Entry::Dir { .. } => (2, (0, 0), Vec::new()),
                Entry::File {
                    data: Data::Bytes(b),
                    ..
                } => (1, (0, 0), b.clone()),
                Entry::File {
                    data: Data::File(src),
                    ..
                } => {
                    let b = std::fs::read(src).map_err(|source| CpioError::ReadSource {
                        path: src.clone(),
                        source,
                    })?;
                    (1, (0, 0), b)
                }
                Entry::Symlink { target } => (1, (0, 0), target.as_bytes().to_vec()),
                Entry::CharDev { major, minor, .. } => (1, (*major, *minor), Vec::new()),
            };
            let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge(path.clone()))?;
            let header = Header {
                ino: ino as u32 + 1,
                mode: entry.mode(),
                nlink,
                filesize: size,
                rdevmajor: rdev.0,
                rdevminor: rdev.1,
            };
            write_entry(&mut w, &header, path, &data)?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            filesize: 0,
            rdevmajor: 0,
            rdevminor: 0,
        };
        write_entry(&mut w, &trailer, TRAILER, &[])?;
        Ok(w.n)
    }

    /// The whole archive in memory.
    #[cfg(test)]
    pub fn to_vec(&self) -> Result<Vec<u8>, CpioError> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }
}

struct Counting<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Counting<'_, W> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.inner.write_all(b)?;
        self.n += b.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.n % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdevmajor: u32,
    rdevminor: u32,
}

fn write_entry<W: Write>(
    w: &mut Counting<'_, W>,
    h: &Header,
    name: &str,
    data: &[u8],
) -> Result<(), CpioError> {
    let namesize = name.len() as u32 + 1;
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
    // rdevmajor, rdevminor, namesize, check
    let header = format!(
        "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
        h.ino, h.mode, 0, 0, h.nlink, 0, h.filesize, 0, 0, h.rdevmajor, h.rdevminor, namesize, 0
    );
    w.put(header.as_bytes())?;
    w.put(name.as_bytes())?;
    w.put(&[0])?;
    w.pad4()?;
    w.put(data)?;
    w.pad4()?;
    Ok(())
}

/// One member read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEntry {
    /// Path as stored.
    pub name: String,
    /// Inode number.
    pub ino: u32,
    /// Full mode (type and permissions).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: u32,
    /// Device major of a device node.
    pub rdevmajor: u32,
    /// Device minor of a device node.
    pub rdevminor: u32,
    /// Contents (file data or link target).
    pub data: Vec<u8>,
}

/// Parses a newc archive up to its trailer.
pub fn parse(bytes: &[u8]) -> Result<Vec<ParsedEntry>, CpioError> {
    let bad = |offset: usize, what: &str| CpioError::Malformed {
        offset,
        what: what.into(),
    };
    let align = |n: usize| (n + 3) & !3;
    let mut off = 0;
    let mut out = Vec::new();
    loop {
        let h = bytes
            .get(off..off + 110)
            .ok_or_else(|| bad(off, "truncated header"))?;
        if &h[..6] != b"070701" {
            return Err(bad(off, "bad magic (want 070701)"));
        }
        let here = off;
        let field = |i: usize| -> Result<u32, CpioError> {
            let s = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i])
                .map_err(|_| bad(here, "non-ASCII header field"))?;
            u32::from_str_radix(s, 16).map_err(|_| bad(here, "non-hex header field"))
        };
        let namesize = field(11)? as usize;
        let filesize = field(6)? as usize;
        let name_end = off + 110 + namesize;
        let name = bytes
            .get(off + 110..name_end - 1)
            .ok_or_else(|| bad(off, "truncated name"))?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| bad(off, "non-UTF-8 name"))?;
        let data_start = align(name_end);
        let data = bytes
            .get(data_start..data_start + filesize)
            .ok_or_else(|| bad(off, "truncated data"))?
            .to_vec();
        off = align(data_start + filesize);
        if name == TRAILER {
            return Ok(out);
        }
        out.push(ParsedEntry {
            name,
            ino: field(0)?,
            mode: field(1)?,
            uid: field(2)?,
            gid: field(3)?,
            mtime: field(5)?,
            rdevmajor: field(9)?,
            rdevminor: field(10)?,
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_exact_header() {
        let mut a = Archive::new();
        a.bytes("init", 0o755, b"hi\n".to_vec()).unwrap();
        let v = a.to_vec().unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(
            b"070701\
              00000001\
              000081ED\
              00000000\
              00000000\
              00000001\
              00000000\
              00000003\
              00000000\
              00000000\
              00000000\
              00000000\
              00000005\
              00000000",
        );
        want.extend_from_slice(b"init\0");
        // 110 + 5 = 115 -> pad to 116
        want.push(0);
        want.extend_from_slice(b"hi\n\0");
        want.extend_from_slice(
            b"07070100000000000000000000000000000000000000010000000000000000000000000000000000000000000000000000000B00000000",
        );
        want.extend_from_slice(b"TRAILER!!!\0");
        // 116 + 4 + 110 + 11 = 241 -> pad to 244
        want.extend_from_slice(&[0, 0, 0]);
        assert_eq!(String::from_utf8_lossy(&v), String::from_utf8_lossy(&want));
        assert_eq!(v, want);
        assert_eq!(v.len() % 4, 0);
    }

    fn sample(dir: &Path) -> Archive {
        let f = dir.join("agent");
        std::fs::write(&f, b"\x7fELF fake agent").unwrap();
        let mut a = Archive::new();
        a.file("init", 0o755, &f).unwrap();
        a.dir("proc", 0o555).unwrap();
        a.bytes("etc/kata-modules", 0o644, b"kernel/a.ko\n".to_vec())
            .unwrap();
        a.symlink("bin/sh", "busybox").unwrap();
        a.chardev("dev/console", 0o600, 5, 1).unwrap();
        a.chardev("dev/null", 0o666, 1, 3).unwrap();
        a
    }

    #[test]
    fn reproducible_and_parses_back() {
        let d = tempfile::tempdir().unwrap();
        let one = sample(d.path()).to_vec().unwrap();
        let two = sample(d.path()).to_vec().unwrap();
        assert_eq!(one, two);
        let entries = parse(&one).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "dev/null",
                "etc",
                "etc/kata-modules",
                "init",
                "proc"
            ]
        );
        let by = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(by("init").data, b"\x7fELF fake agent");
        assert_eq!(by("init").mode, 0o100755);
        assert_eq!(by("bin/sh").data, b"busybox");
        assert_eq!(by("bin/sh").mode, 0o120777);
        assert_eq!(
            (by("dev/console").rdevmajor, by("dev/console").rdevminor),
            (5, 1)
        );
        assert_eq!(by("dev/null").mode, 0o020666);
        assert_eq!(by("proc").mode, 0o040555);
        assert!(entries
            .iter()
            .all(|e| e.mtime == 0 && e.uid == 0 && e.gid == 0));
        let inos: Vec<_> = entries.iter().map(|e| e.ino).collect();
        assert_eq!(inos, (1..=entries.len() as u32).collect::<Vec<_>>());
    }

    #[test]
    fn bad_paths_and_conflicts() {
        let mut a = Archive::new();
        assert!(matches!(a.dir("a/../b", 0o755), Err(CpioError::BadPath(_))));
        assert!(matches!(a.dir("", 0o755), Err(CpioError::BadPath(_))));
        a.bytes("x", 0o644, vec![1]).unwrap();
        a.bytes("x", 0o644, vec![1]).unwrap();
        assert!(matches!(
            a.bytes("x", 0o644, vec![2]),
            Err(CpioError::Duplicate(_))
        ));
        assert!(matches!(
            a.bytes("x/y", 0o644, vec![]),
            Err(CpioError::ParentNotDir { .. })
        ));
        assert!(parse(b"070702").is_err());
        assert!(parse(b"garbage").is_err());
    }
}

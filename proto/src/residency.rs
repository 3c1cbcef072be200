//! Unmapping the start-up code once the daemon only waits or serves.
//!
//! Used by kata-virtiofsd and kata-netmon. Each is one static binary
//! (glibc included, so nothing of it is shared with other programs'
//! libraries). Starting up (argument parsing, logging, mounts, the sandbox,
//! forking, the first netlink dump) touches code and read-only data all over
//! it, and the kernel maps up to 64 KiB around every page faulted in
//! from the page cache: an idle daemon kept nearly the whole 4.8 MiB image
//! mapped, which is what its PSS counted. [`drop_image_pages`] drops this
//! process's page-table entries for the image's read-only part (headers,
//! `.rodata`, `.eh_frame`, `.text`): what runs afterwards faults its pages
//! back in from the page cache, so only the code actually used stays mapped.
//! Nothing is freed or changed: the pages stay in the page cache (shared by
//! every kata-virtiofsd of the host, and reclaimable), and the read-only part
//! of a private file mapping holds no private data (no text relocations, the
//! binary is linked `-z now`; relocated data is in the RELRO segment, which
//! is writable at load time and not in the range).
//!
//! The range runs from the linker's `__executable_start` to `etext` and is
//! used only if `/proc/self/maps` shows it wholly covered by read-only,
//! private mappings of this executable ([`image_range`], called before the
//! sandbox hides `/proc`).

use std::ops::Range;

extern "C" {
    // Defined by the linker (GNU ld and lld alike): the first byte of the
    // image and the end of its text segment.
    static __executable_start: u8;
    static etext: u8;
}

/// The read-only part of this executable's image, page-aligned, if
/// `/proc/self/maps` confirms that it is only read-only private mappings of
/// the executable; `None` otherwise (then nothing is ever dropped).
pub fn image_range() -> Option<Range<usize>> {
    // only the addresses of the linker-defined symbols are taken
    let start = std::ptr::addr_of!(__executable_start) as usize;
    let end = std::ptr::addr_of!(etext) as usize;
    let page = page_size();
    let range = (start + page - 1) & !(page - 1)..end & !(page - 1);
    if range.is_empty() {
        return None;
    }
    let exe = std::fs::read_link("/proc/self/exe").ok()?;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    covered_read_only(&maps, exe.to_str()?, &range).then_some(range)
}

/// Whether the lines of a `/proc/<pid>/maps` text that intersect `range` are
/// all read-only (`r-xp` or `r--p`) mappings of `path` and cover it whole.
pub fn covered_read_only(maps: &str, path: &str, range: &Range<usize>) -> bool {
    let mut parts = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(addrs), Some(perms)) = (f.next(), f.next()) else {
            return false;
        };
        let Some((lo, hi)) = addrs.split_once('-') else {
            return false;
        };
        let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        else {
            return false;
        };
        if hi <= range.start || lo >= range.end {
            continue;
        }
        // offset, device, inode, then the path (which may contain spaces)
        let name = f.skip(3).collect::<Vec<_>>().join(" ");
        if !(perms == "r-xp" || perms == "r--p") || name != path {
            return false;
        }
        parts.push(lo..hi);
    }
    parts.sort_by_key(|r| r.start);
    let mut at = range.start;
    for p in parts {
        if p.start > at {
            return false;
        }
        at = at.max(p.end);
    }
    at >= range.end
}

/// Drops this process's mappings of the pages in `range` (see the module
/// documentation); they fault back in on use. Errors are ignored: the only
/// effect of a failure is a larger resident set.
pub fn drop_image_pages(range: &Range<usize>) {
    // SAFETY: `range` was checked by `image_range` to be read-only private
    // file mappings of this executable (no private data in them), so
    // MADV_DONTNEED only removes page-table entries that the next access
    // re-creates from the same file.
    unsafe {
        libc::madvise(
            range.start as *mut libc::c_void,
            range.end - range.start,
            libc::MADV_DONTNEED,
        );
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf takes no pointers.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Gives the heap's free pages back to the kernel (glibc's `malloc_trim`):
/// after a burst of allocations (a scrape's metrics text and parse), so an
/// idle daemon's PSS is what it keeps, not what it once needed.
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0a0000000-55d0a01c9000 r--p 00000000 08:01 123 /usr/bin/kata virtiofsd
55d0a01c9000-55d0a0472000 r-xp 001c8000 08:01 123 /usr/bin/kata virtiofsd
55d0a0472000-55d0a04d2000 r--p 00470000 08:01 123 /usr/bin/kata virtiofsd
55d0a04d2000-55d0a04de000 rw-p 004cf000 08:01 123 /usr/bin/kata virtiofsd
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
";
    const EXE: &str = "/usr/bin/kata virtiofsd";

    #[test]
    fn only_read_only_mappings_of_the_executable() {
        let text = 0x55d0a0000000..0x55d0a0472000;
        assert!(covered_read_only(MAPS, EXE, &text));
        assert!(covered_read_only(
            MAPS,
            EXE,
            &(0x55d0a0001000..0x55d0a0002000)
        ));
        // reaching into the writable segment, another file, or a hole: no
        assert!(!covered_read_only(
            MAPS,
            EXE,
            &(0x55d0a0000000..0x55d0a04d3000)
        ));
        assert!(!covered_read_only(MAPS, "/other", &text));
        assert!(!covered_read_only(
            MAPS,
            EXE,
            &(0x55d0a0000000..0x55d0a0500000)
        ));
        let holed = MAPS.replace("55d0a01c9000-55d0a0472000", "55d0a01ca000-55d0a0472000");
        assert!(!covered_read_only(&holed, EXE, &text));
        assert!(!covered_read_only("garbage", EXE, &text));
    }

    #[test]
    fn this_test_binary_has_a_droppable_image() {
        // the test harness is an executable like the daemon: its range is
        // found, dropping it is harmless, and code still runs afterwards
        let r = image_range().expect("a read-only image range");
        assert!(r.len() > 4096);
        drop_image_pages(&r);
        assert_eq!(format!("{}", 40 + 2), "42");
    }
}

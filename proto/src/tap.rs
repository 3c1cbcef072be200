//! Tap devices through `/dev/net/tun`: kata-netmon creates the pod's taps
//! (persistent, so they outlive its open), the launcher opens them for QEMU
//! before the jail drops its privileges. Both use [`open`], so the flags at
//! creation and at use are the same ones (the kernel refuses a mismatch of
//! multi-queue, and the vnet header must be what QEMU expects).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The longest interface name (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Checks an interface name: 1 to 15 bytes, no `/`, whitespace or NUL.
pub fn check_ifname(name: &str) -> io::Result<()> {
    if name.is_empty()
        || name.len() > IFNAME_MAX
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?}: 1 to {IFNAME_MAX} bytes, no '/', NUL or spaces"),
        ));
    }
    Ok(())
}

/// Opens (creating it if it does not exist) the tap `name` in the calling
/// thread's network namespace: no packet-info header, with the virtio-net
/// header QEMU uses. Needs CAP_NET_ADMIN.
pub fn open(name: &str) -> io::Result<File> {
    check_ifname(name)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` lays
    // out (40 bytes); the fd is open.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")));
    }
    Ok(f)
}

/// Creates the persistent tap `name` (it stays once the returned fd closes,
/// until it is deleted as a link).
pub fn create_persistent(name: &str) -> io::Result<()> {
    let f = open(name)?;
    // SAFETY: TUNSETPERSIST takes an integer argument; the fd is open.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("TUNSETPERSIST {name}: {e}"),
        ));
    }
    Ok(())
}

/// Parses a character device number written `major:minor`.
pub fn parse_dev(dev: &str) -> Option<(u32, u32)> {
    let (a, b) = dev.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The major number the kernel gave the character driver `name`
/// (`/proc/devices`), if it is registered.
pub fn char_major(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/devices").ok()?;
    let chars = text.split("Block devices:").next()?;
    chars.lines().find_map(|l| {
        let (n, d) = l.trim().split_once(' ')?;
        (d.trim() == name).then(|| n.parse().ok())?
    })
}

/// Opens the character device `major:minor` of a macvtap (as kata-netmon
/// reads it from sysfs in the pod's netns): a private node is made in
/// /dev (devtmpfs allows device nodes where /run and /tmp may not), opened
/// and removed at once. Anything but a macvtap's device is refused.
pub fn open_macvtap(dev: &str) -> io::Result<File> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    let (major, minor) =
        parse_dev(dev).ok_or_else(|| bad(format!("{dev:?}: not a device number major:minor")))?;
    match char_major("macvtap") {
        Some(m) if m == major => {}
        Some(m) => return Err(bad(format!("{dev}: not a macvtap (its major is {m})"))),
        None => return Err(bad("no macvtap driver is loaded (/proc/devices)".into())),
    }
    let node = format!(
        "/dev/.kata-macvtap-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let c = std::ffi::CString::new(node.clone()).map_err(|_| bad(node.clone()))?;
    // SAFETY: a NUL-terminated path; makedev and mknod take plain integers.
    let rc = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | 0o600,
            libc::makedev(major, minor),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("mknod {node}: {e}")));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&node);
    let _ = std::fs::remove_file(&node);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_ifname("tap0_kata").is_ok());
        for bad in ["", "a/b", "x y", "0123456789abcdef", "..", "a\0"] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn device_numbers() {
        assert_eq!(parse_dev("249:3\n"), Some((249, 3)));
        for bad in ["", "249", "a:1", "1:-2", "1:2:3"] {
            assert_eq!(parse_dev(bad), None, "{bad:?}");
        }
        // /proc/devices always lists mem (1)
        assert_eq!(char_major("mem"), Some(1));
        assert_eq!(char_major("no-such-driver"), None);
        let e = open_macvtap("1:3").unwrap_err();
        assert!(e.to_string().contains("macvtap"), "{e}");
    }
}

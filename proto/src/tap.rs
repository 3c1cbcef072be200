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
}

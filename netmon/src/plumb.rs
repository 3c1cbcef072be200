//! The plumbing between a pod interface (the veth CNI made) and the device
//! QEMU opens, per internetworking model.
//!
//! `tcfilter` (Kata's default): a tap `tapN_kata` beside the veth, an
//! ingress qdisc on each, and on each a u32 match-all filter whose action is
//! `mirred egress redirect` to the other: every frame that arrives on the
//! veth leaves through the tap to the guest and back. The veth keeps its
//! addresses in the netns (nothing there uses them); the guest's NIC takes
//! the veth's MAC and addresses.
//!
//! `macvtap`: a macvtap `mvtapN_kata` on the veth in bridge mode, QEMU
//! opens its character device. The macvtap takes the veth's MAC (the
//! guest's) and the veth gets a random local one, as Kata does: frames for
//! the pod's MAC then reach the macvtap, not the netns. The veth keeps its
//! addresses but answers no ARP for them (`arp_ignore = 8`), so a peer
//! only learns the guest's MAC. Both are undone when the plumbing goes
//! (and by the cleanup of a killed netmon, from the macvtap's MAC).

use rtnetlink::packet_route::link::MacVtapMode;
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkMacVtap, LinkUnspec};
use tracing::{info, warn};

use crate::scan::Link;
use crate::NetmonError;

/// ETH_P_ALL: the filters match every protocol.
const ETH_P_ALL: u16 = 0x0003;
/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: u32 = 0xffff_0000;

/// How the pod's interfaces reach the VM (Kata's `internetworking_model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Model {
    /// A tap and tc redirects (the default).
    Tcfilter,
    /// A macvtap on the veth.
    Macvtap,
    /// No network in the VM.
    None,
}

impl Model {
    /// Its name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Model::Tcfilter => "tcfilter",
            Model::Macvtap => "macvtap",
            Model::None => "none",
        }
    }
}

/// What netmon made for one pod interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plumbed {
    /// The veth's index.
    pub veth: u32,
    /// The device QEMU opens (its name in the netns).
    pub device: String,
    /// Its index.
    pub device_index: u32,
    /// macvtap: the veth's own MAC, now the macvtap's (the guest's).
    pub pod_mac: Option<Vec<u8>>,
    /// macvtap: its character device, `major:minor`.
    pub char_dev: String,
}

fn nl(what: String) -> impl FnOnce(rtnetlink::Error) -> NetmonError {
    move |e| NetmonError::Plumb(what, e)
}

/// Whether a netlink error is "exists already".
fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

async fn index_of(h: &Handle, name: &str) -> Result<u32, NetmonError> {
    use futures_util::TryStreamExt;
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(m.header.index),
        Ok(None) => Err(NetmonError::Missing(name.to_string())),
        Err(e) => Err(NetmonError::Plumb(format!("finding {name}"), e)),
    }
}

/// Builds the plumbing of `model` for `veth`; `n` numbers the device. On
/// failure what was made is removed.
pub async fn plumb(h: &Handle, model: Model, veth: &Link, n: u32) -> Result<Plumbed, NetmonError> {
    let p = match model {
        Model::Tcfilter => {
            let name = format!("tap{n}{}", crate::scan::OWN_SUFFIX);
            kata_proto::tap::create_persistent(&name)
                .map_err(|e| NetmonError::Tap(name.clone(), e))?;
            let index = index_of(h, &name).await?;
            let p = Plumbed {
                veth: veth.index,
                device: name,
                device_index: index,
                pod_mac: None,
                char_dev: String::new(),
            };
            if let Err(e) = tcfilter(h, veth, &p).await {
                unplumb(h, &p).await;
                return Err(e);
            }
            p
        }
        Model::Macvtap => {
            let name = format!("mvtap{n}{}", crate::scan::OWN_SUFFIX);
            set_mac(h, veth.index, &random_local_mac(veth.index, n))
                .await
                .map_err(nl(format!("giving {} a new MAC", veth.name)))?;
            let made = h
                .link()
                .add(
                    LinkMacVtap::new(&name, veth.index, MacVtapMode::Bridge)
                        .address(veth.mac.clone())
                        .mtu(veth.mtu)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!("creating macvtap {name} on {}", veth.name)));
            let mut p = Plumbed {
                veth: veth.index,
                device: name.clone(),
                device_index: 0,
                pod_mac: Some(veth.mac.clone()),
                char_dev: String::new(),
            };
            let done = async {
                made?;
                p.device_index = index_of(h, &name).await?;
                p.char_dev = macvtap_char_dev(&name, p.device_index)?;
                set_arp_ignore(&veth.name, true)?;
                Ok::<(), NetmonError>(())
            };
            if let Err(e) = done.await {
                unplumb(h, &p).await;
                return Err(e);
            }
            p
        }
        Model::None => {
            return Err(NetmonError::Config(
                "internetworking model none takes no interface".into(),
            ))
        }
    };
    info!(veth = %veth.name, device = %p.device, model = model.name(), "interface plumbed");
    Ok(p)
}

async fn tcfilter(h: &Handle, veth: &Link, p: &Plumbed) -> Result<(), NetmonError> {
    h.link()
        .set(
            LinkUnspec::new_with_index(p.device_index)
                .mtu(veth.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("setting {} up", p.device)))?;
    for (idx, name) in [(veth.index, &veth.name), (p.device_index, &p.device)] {
        match h.qdisc().add(idx as i32).ingress().execute().await {
            Ok(()) => {}
            Err(e) if exists(&e) => {}
            Err(e) => return Err(NetmonError::Plumb(format!("ingress qdisc on {name}"), e)),
        }
    }
    for (from, to, what) in [
        (veth.index, p.device_index, "veth to tap"),
        (p.device_index, veth.index, "tap to veth"),
    ] {
        h.traffic_filter(from as i32)
            .add()
            .parent(INGRESS_HANDLE)
            .priority(1)
            // the kernel takes the protocol in network byte order
            .protocol(ETH_P_ALL.to_be())
            .redirect(to)
            .map_err(nl(format!("redirect filter {what}")))?
            .execute()
            .await
            .map_err(nl(format!("redirect filter {what}")))?;
    }
    Ok(())
}

/// Removes what [`plumb`] made: the device (its qdisc and filter go with
/// it) and the veth's ingress qdisc (with its filter). Errors are logged:
/// a link already gone is what was wanted.
pub async fn unplumb(h: &Handle, p: &Plumbed) {
    if p.device_index != 0 {
        if let Err(e) = h.link().del(p.device_index).execute().await {
            if !gone(&e) {
                warn!(device = %p.device, "removing: {e}");
            }
        }
    }
    remove_ingress(h, p.veth).await;
    if let Some(mac) = &p.pod_mac {
        restore_veth(h, p.veth, mac).await;
    }
    info!(device = %p.device, "interface unplumbed");
}

/// Gives a macvtap's veth its MAC back and lets it answer ARP again.
pub async fn restore_veth(h: &Handle, veth: u32, mac: &[u8]) {
    if let Err(e) = set_mac(h, veth, mac).await {
        if !gone(&e) {
            warn!(veth, "giving the veth its MAC back: {e}");
        }
    }
    if let Ok(name) = name_of(h, veth).await {
        let _ = set_arp_ignore(&name, false);
    }
}

async fn set_mac(h: &Handle, index: u32, mac: &[u8]) -> Result<(), rtnetlink::Error> {
    h.link()
        .set(
            LinkUnspec::new_with_index(index)
                .address(mac.to_vec())
                .build(),
        )
        .execute()
        .await
}

async fn name_of(h: &Handle, index: u32) -> Result<String, NetmonError> {
    use futures_util::TryStreamExt;
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut links = h.link().get().match_index(index).execute();
    match links.try_next().await {
        Ok(Some(m)) => m
            .attributes
            .into_iter()
            .find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
            .ok_or_else(|| NetmonError::Missing(index.to_string())),
        Ok(None) => Err(NetmonError::Missing(index.to_string())),
        Err(e) => Err(NetmonError::Plumb(format!("finding link {index}"), e)),
    }
}

/// A locally administered unicast MAC for the veth whose own goes to the
/// macvtap (derived from the pid, the veth and the device number: unique
/// in the netns, no randomness needed).
fn random_local_mac(index: u32, n: u32) -> Vec<u8> {
    let pid = std::process::id();
    vec![
        0x02,
        0x6b, // 'k'
        (pid >> 8) as u8,
        pid as u8,
        (index ^ (n << 4)) as u8,
        (index >> 8) as u8,
    ]
}

/// `arp_ignore` of `veth` in the netns: 8 (answer no ARP) or back to 0.
fn set_arp_ignore(veth: &str, ignore: bool) -> Result<(), NetmonError> {
    kata_proto::tap::check_ifname(veth).map_err(|e| NetmonError::Io(veth.into(), e))?;
    let p = format!("/proc/sys/net/ipv4/conf/{veth}/arp_ignore");
    std::fs::write(&p, if ignore { "8" } else { "0" }).map_err(|e| NetmonError::Io(p, e))
}

/// The character device of macvtap `name` (index `index`), `major:minor`,
/// from the sysfs netmon mounted for its netns (main.rs).
fn macvtap_char_dev(name: &str, index: u32) -> Result<String, NetmonError> {
    let p = format!("/sys/class/net/{name}/macvtap/tap{index}/dev");
    let dev = std::fs::read_to_string(&p).map_err(|e| NetmonError::Io(p.clone(), e))?;
    let dev = dev.trim().to_string();
    kata_proto::tap::parse_dev(&dev)
        .map(|_| dev.clone())
        .ok_or_else(|| NetmonError::Config(format!("{p}: {dev:?} is no device number")))
}

/// Removes the ingress qdisc of link `index`, if there is one.
pub async fn remove_ingress(h: &Handle, index: u32) {
    let mut req = h.qdisc().del(index as i32);
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = TcHandle::from(INGRESS_HANDLE);
    if let Err(e) = req.execute().await {
        if !gone(&e) {
            warn!(index, "removing the ingress qdisc: {e}");
        }
    }
}

/// Whether a netlink error says the object does not exist.
fn gone(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if [-libc::ENODEV, -libc::ENOENT, -libc::EINVAL].contains(&m.raw_code()))
}

//! The guest's network, as the host describes it (Kata's UpdateInterface,
//! UpdateRoutes, AddARPNeighbors, ListInterfaces, ListRoutes): the pod's
//! interfaces arrive as NICs carrying the pod interface's MAC, and the agent
//! gives each its name, MTU and addresses, then the routes and the permanent
//! neighbours. Everything goes through rtnetlink in the calling thread's
//! network namespace (the guest's; a test's own in the tests).

use std::net::IpAddr;
use std::time::Duration;

use futures_util::TryStreamExt;
use kata_proto::agent::{ip_address::Family, ArpNeighbor, Interface, IpAddress, Route};
use kata_proto::net::{is_link_local, mac_string};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tonic::Status;
use tracing::info;

/// How long UpdateInterface waits for a NIC with the MAC to appear (the
/// guest's virtio-net driver may still be probing it).
#[cfg(not(test))]
const NIC_WAIT: Duration = Duration::from_secs(5);
#[cfg(test)]
const NIC_WAIT: Duration = Duration::from_millis(300);
/// The most addresses, routes or neighbours one request may carry.
const MAX_ITEMS: usize = 256;

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Status {
    let what = what.into();
    move |e| Status::internal(format!("{what}: {e}"))
}

/// A netlink connection in the calling thread's netns.
pub fn connect() -> Result<Handle, Status> {
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|e| Status::internal(format!("netlink socket: {e}")))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Parses `aa:bb:cc:dd:ee:ff` (`field` names it in the error).
fn parse_mac(field: &str, s: &str) -> Result<Vec<u8>, Status> {
    kata_proto::net::parse_mac(s)
        .map(|m| m.to_vec())
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "{field} {s:?}: six hex bytes like 02:00:00:00:00:01"
            ))
        })
}

/// An address with its prefix length, from Kata's IPAddress (`mask` is the
/// prefix length; a dotted IPv4 mask is accepted too).
fn parse_addr(a: &IpAddress) -> Result<(IpAddr, u8), Status> {
    let ip: IpAddr = a.address.parse().map_err(|_| {
        Status::invalid_argument(format!("address {:?} is not an IP address", a.address))
    })?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = if a.mask.is_empty() {
        max
    } else if let Ok(p) = a.mask.parse::<u8>() {
        p
    } else if let Ok(m) = a.mask.parse::<std::net::Ipv4Addr>() {
        u32::from(m).count_ones() as u8
    } else {
        return Err(Status::invalid_argument(format!(
            "mask {:?} of {}: a prefix length or a dotted mask",
            a.mask, a.address
        )));
    };
    if prefix > max {
        return Err(Status::invalid_argument(format!(
            "prefix length {prefix} of {ip}: at most {max}"
        )));
    }
    Ok((ip, prefix))
}

/// A link as read.
struct Link {
    index: u32,
    name: String,
    mac: Vec<u8>,
    mtu: u32,
    up: bool,
}

fn link_of(m: LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: vec![],
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
    };
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n,
            LinkAttribute::Address(mac) => l.mac = mac,
            LinkAttribute::Mtu(mtu) => l.mtu = mtu,
            _ => {}
        }
    }
    l
}

async fn links(h: &Handle) -> Result<Vec<Link>, Status> {
    let mut out = vec![];
    let mut s = h.link().get().execute();
    while let Some(m) = s.try_next().await.map_err(nl("listing links"))? {
        out.push(link_of(m));
    }
    Ok(out)
}

async fn addresses(h: &Handle, index: u32) -> Result<Vec<(IpAddr, u8)>, Status> {
    let mut out = vec![];
    let mut s = h.address().get().set_link_index_filter(index).execute();
    while let Some(m) = s.try_next().await.map_err(nl("listing addresses"))? {
        let ip = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = ip {
            out.push((ip, m.header.prefix_len));
        }
    }
    Ok(out)
}

fn family(ip: &IpAddr) -> Family {
    if ip.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    }
}

async fn describe(h: &Handle, l: &Link) -> Result<Interface, Status> {
    let addrs = addresses(h, l.index).await?;
    Ok(Interface {
        device: String::new(),
        name: l.name.clone(),
        ip_addresses: addrs
            .iter()
            .map(|(ip, p)| IpAddress {
                family: family(ip) as i32,
                address: ip.to_string(),
                mask: p.to_string(),
            })
            .collect(),
        mtu: u64::from(l.mtu),
        hw_addr: mac_string(&l.mac),
        device_path: String::new(),
        r#type: String::new(),
        raw_flags: if l.up { libc::IFF_UP as u32 } else { 0 },
    })
}

/// Brings `lo` up (the guest's containers share the guest's netns). Two
/// ioctls on a datagram socket instead of a netlink connection: this runs at
/// boot before the agent announces itself, where a netlink connection, its
/// link dump and the set cost about 40 ms of an emulated (TCG) guest.
pub fn loopback_up() -> Result<(), Status> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let err = |what: &str| {
        let e = std::io::Error::last_os_error();
        Status::internal(format!("bringing lo up: {what}: {e}"))
    };
    // SAFETY: socket(2) takes integer arguments; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err("socket"));
    }
    // SAFETY: fd is a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into
    // the ifreq we own, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(err("SIOCGIFFLAGS"));
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS only reads the ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(err("SIOCSIFFLAGS"));
    }
    Ok(())
}

/// UpdateInterface: the NIC with `hwAddr` gets the name, MTU and exactly the
/// addresses given (link-local ones the kernel made stay), and goes up.
pub async fn update_interface(h: &Handle, want: &Interface) -> Result<Interface, Status> {
    let mac = parse_mac("hwAddr", &want.hw_addr)?;
    if want.ip_addresses.len() > MAX_ITEMS {
        return Err(Status::invalid_argument(format!(
            "{} addresses: at most {MAX_ITEMS}",
            want.ip_addresses.len()
        )));
    }
    let addrs: Vec<(IpAddr, u8)> = want
        .ip_addresses
        .iter()
        .map(parse_addr)
        .collect::<Result<_, _>>()?;
    if !want.name.is_empty() {
        kata_proto::tap::check_ifname(&want.name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
    }
    let deadline = tokio::time::Instant::now() + NIC_WAIT;
    let link = loop {
        if let Some(l) = links(h).await?.into_iter().find(|l| l.mac == mac) {
            break l;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Status::not_found(format!(
                "no network interface with hwAddr {} in the guest (waited {NIC_WAIT:?})",
                want.hw_addr
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let idx = link.index;
    if !want.name.is_empty() && want.name != link.name {
        // a link is renamed while down
        h.link()
            .set(LinkUnspec::new_with_index(idx).down().build())
            .execute()
            .await
            .map_err(nl(format!("setting {} down", link.name)))?;
        h.link()
            .set(
                LinkUnspec::new_with_index(idx)
                    .name(want.name.clone())
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| match &e {
                rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST => {
                    Status::already_exists(format!(
                        "renaming {} to {}: another interface has that name",
                        link.name, want.name
                    ))
                }
                _ => Status::internal(format!("renaming {} to {}: {e}", link.name, want.name)),
            })?;
    }
    if want.mtu > 0 {
        let mtu = u32::try_from(want.mtu)
            .ok()
            .filter(|m| (68..=65535).contains(m))
            .ok_or_else(|| Status::invalid_argument(format!("mtu {}: 68 to 65535", want.mtu)))?;
        h.link()
            .set(LinkUnspec::new_with_index(idx).mtu(mtu).build())
            .execute()
            .await
            .map_err(nl(format!("setting the MTU of {}", link.name)))?;
    }
    // exactly the addresses given: others go (but not the kernel's link-local)
    let have = addresses(h, idx).await?;
    for (ip, p) in &have {
        if !addrs.contains(&(*ip, *p)) && !is_link_local(ip) {
            let mut s = h.address().get().set_link_index_filter(idx).execute();
            while let Some(m) = s.try_next().await.map_err(nl("listing addresses"))? {
                let this = m
                    .attributes
                    .iter()
                    .any(|a| matches!(a, AddressAttribute::Address(a) if a == ip));
                if this {
                    h.address()
                        .del(m)
                        .execute()
                        .await
                        .map_err(nl(format!("removing {ip}/{p}")))?;
                    break;
                }
            }
        }
    }
    for (ip, p) in &addrs {
        if have.contains(&(*ip, *p)) {
            continue;
        }
        h.address()
            .add(idx, *ip, *p)
            .execute()
            .await
            .map_err(nl(format!("adding {ip}/{p}")))?;
    }
    h.link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .map_err(nl("setting the interface up"))?;
    let l = links(h)
        .await?
        .into_iter()
        .find(|l| l.index == idx)
        .ok_or_else(|| Status::not_found("the interface vanished"))?;
    info!(name = %l.name, hw_addr = %want.hw_addr, addresses = addrs.len(), "interface configured");
    describe(h, &l).await
}

/// ListInterfaces.
pub async fn list_interfaces(h: &Handle) -> Result<Vec<Interface>, Status> {
    let mut out = vec![];
    for l in links(h).await? {
        out.push(describe(h, &l).await?);
    }
    Ok(out)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

async fn main_routes(h: &Handle) -> Result<Vec<RouteMessage>, Status> {
    let mut out = vec![];
    for q in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let mut s = h.route().get(q).execute();
        while let Some(r) = s.try_next().await.map_err(nl("listing routes"))? {
            let table = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(r.header.table));
            if table == u32::from(RouteHeader::RT_TABLE_MAIN) && r.header.kind == RouteType::Unicast
            {
                out.push(r);
            }
        }
    }
    Ok(out)
}

fn describe_route(r: &RouteMessage, names: &[Link]) -> Route {
    let mut out = Route {
        family: if r.header.address_family == AddressFamily::Inet6 {
            Family::V6 as i32
        } else {
            Family::V4 as i32
        },
        scope: u32::from(u8::from(r.header.scope)),
        ..Default::default()
    };
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => {
                if let Some(ip) = route_ip(d) {
                    out.dest = format!("{ip}/{}", r.header.destination_prefix_length);
                }
            }
            RouteAttribute::Gateway(g) => {
                out.gateway = route_ip(g).map(|g| g.to_string()).unwrap_or_default()
            }
            RouteAttribute::PrefSource(s) => {
                out.source = route_ip(s).map(|s| s.to_string()).unwrap_or_default()
            }
            RouteAttribute::Oif(i) => {
                out.device = names
                    .iter()
                    .find(|l| l.index == *i)
                    .map(|l| l.name.clone())
                    .unwrap_or_default()
            }
            _ => {}
        }
    }
    out
}

/// ListRoutes: the main table's unicast routes.
pub async fn list_routes(h: &Handle) -> Result<Vec<Route>, Status> {
    let names = links(h).await?;
    Ok(main_routes(h)
        .await?
        .iter()
        .map(|r| describe_route(r, &names))
        .collect())
}

/// UpdateRoutes: the routes the host gave replace the ones it gave before
/// (routes the kernel made for addresses stay); routes without a gateway go
/// first, so the gateways they make reachable can be used by the others.
/// Returns the full list.
pub async fn update_routes(h: &Handle, want: &[Route]) -> Result<Vec<Route>, Status> {
    if want.len() > MAX_ITEMS {
        return Err(Status::invalid_argument(format!(
            "{} routes: at most {MAX_ITEMS}",
            want.len()
        )));
    }
    let names = links(h).await?;
    // check all before changing anything
    let mut parsed = vec![];
    for r in want {
        let dev = names.iter().find(|l| l.name == r.device).ok_or_else(|| {
            Status::not_found(format!(
                "route to {:?}: no interface {:?}",
                r.dest, r.device
            ))
        })?;
        let dest = if r.dest.is_empty() || r.dest == "default" {
            None
        } else {
            let (ip, p) = r
                .dest
                .split_once('/')
                .map(|(a, p)| (a, p.parse::<u8>().ok()))
                .unwrap_or((&r.dest, None));
            let ip: IpAddr = ip.parse().map_err(|_| {
                Status::invalid_argument(format!("route dest {:?}: an address/prefix", r.dest))
            })?;
            Some((ip, p.unwrap_or(if ip.is_ipv4() { 32 } else { 128 })))
        };
        let parse = |s: &str, what: &str| -> Result<Option<IpAddr>, Status> {
            if s.is_empty() {
                return Ok(None);
            }
            s.parse().map(Some).map_err(|_| {
                Status::invalid_argument(format!("route {what} {s:?} is not an IP address"))
            })
        };
        let gw = parse(&r.gateway, "gateway")?;
        let src = parse(&r.source, "source")?;
        parsed.push((dest, gw, src, dev.index, r));
    }
    // the host's earlier routes go: every non-kernel route of the main table
    for r in main_routes(h).await? {
        if r.header.protocol != RouteProtocol::Kernel {
            h.route()
                .del(r)
                .execute()
                .await
                .map_err(nl("removing a route"))?;
        }
    }
    parsed.sort_by_key(|(_, gw, ..)| gw.is_some());
    for (dest, gw, src, oif, r) in parsed {
        let msg = match dest.map(|d| d.0).or(gw) {
            Some(IpAddr::V6(_)) => {
                let mut b = RouteMessageBuilder::<std::net::Ipv6Addr>::new().output_interface(oif);
                if let Some((IpAddr::V6(d), p)) = dest {
                    b = b.destination_prefix(d, p);
                }
                if let Some(IpAddr::V6(g)) = gw {
                    b = b.gateway(g);
                }
                if let Some(IpAddr::V6(s)) = src {
                    b = b.pref_source(s);
                }
                b.build()
            }
            _ => {
                let mut b = RouteMessageBuilder::<std::net::Ipv4Addr>::new().output_interface(oif);
                if let Some((IpAddr::V4(d), p)) = dest {
                    b = b.destination_prefix(d, p);
                }
                if let Some(IpAddr::V4(g)) = gw {
                    b = b.gateway(g);
                }
                if let Some(IpAddr::V4(s)) = src {
                    b = b.pref_source(s);
                }
                let mut m = b.build();
                if gw.is_none() {
                    m.header.scope = RouteScope::Link;
                }
                m
            }
        };
        match h.route().add(msg).execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EEXIST => {}
            Err(e) => {
                return Err(Status::internal(format!(
                    "adding the route {:?} via {:?} dev {}: {e}",
                    r.dest, r.gateway, r.device
                )))
            }
        }
    }
    info!(routes = want.len(), "routes updated");
    list_routes(h).await
}

/// AddARPNeighbors: permanent neighbour entries.
pub async fn add_neighbours(h: &Handle, want: &[ArpNeighbor]) -> Result<(), Status> {
    if want.len() > MAX_ITEMS {
        return Err(Status::invalid_argument(format!(
            "{} neighbours: at most {MAX_ITEMS}",
            want.len()
        )));
    }
    let names = links(h).await?;
    for n in want {
        let dev = names
            .iter()
            .find(|l| l.name == n.device)
            .ok_or_else(|| Status::not_found(format!("neighbour: no interface {:?}", n.device)))?;
        let ip = n
            .to_ip_address
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("neighbour without toIPAddress"))?;
        let (ip, _) = parse_addr(ip)?;
        let mac = parse_mac("lladdr", &n.lladdr)?;
        match h
            .neighbours()
            .add(dev.index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) => {
                return Err(Status::internal(format!(
                    "adding the neighbour {ip} lladdr {} dev {}: {e}",
                    n.lladdr, n.device
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a network namespace of its own (a thread that unshares).
    fn in_new_netns<F, Fut>(f: F)
    where
        F: FnOnce(Handle) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let h = connect().unwrap();
                f(h).await
            });
        })
        .join()
        .unwrap();
    }

    /// A veth pair (`name` with `mac`, its peer up), as a NIC stand-in.
    async fn nic(h: &Handle, name: &str, mac: &str) {
        h.link()
            .add(
                rtnetlink::LinkVeth::new(name, &format!("{name}p"))
                    .address(parse_mac("test", mac).unwrap())
                    .build(),
            )
            .execute()
            .await
            .unwrap();
        let peer = links(h)
            .await
            .unwrap()
            .into_iter()
            .find(|l| l.name == format!("{name}p"))
            .unwrap();
        h.link()
            .set(LinkUnspec::new_with_index(peer.index).up().build())
            .execute()
            .await
            .unwrap();
    }

    /// UpdateInterface finds the NIC by MAC, renames it, sets MTU and
    /// exactly the addresses, brings it up; UpdateRoutes puts the
    /// gateway-less route first and replaces earlier routes; neighbours are
    /// permanent; bad input names the field.
    #[test]
    fn interface_routes_neighbours_in_a_netns() {
        in_new_netns(|h| async move {
            loopback_up().unwrap();
            let lo = links(&h).await.unwrap();
            assert!(lo.iter().any(|l| l.name == "lo" && l.up), "lo is not up");
            loopback_up().expect("bringing an lo that is up up again is fine");
            nic(&h, "nic9", "02:00:00:00:00:09").await;
            let want = Interface {
                name: "eth0".into(),
                hw_addr: "02:00:00:00:00:09".into(),
                mtu: 1400,
                ip_addresses: vec![
                    IpAddress {
                        family: 0,
                        address: "10.88.0.5".into(),
                        mask: "24".into(),
                    },
                    IpAddress {
                        family: 1,
                        address: "fd00::5".into(),
                        mask: "64".into(),
                    },
                ],
                ..Default::default()
            };
            let got = update_interface(&h, &want).await.unwrap();
            assert_eq!(got.name, "eth0");
            assert_eq!(got.mtu, 1400);
            assert_eq!(got.raw_flags & libc::IFF_UP as u32, libc::IFF_UP as u32);
            let addrs: Vec<_> = got.ip_addresses.iter().map(|a| a.address.clone()).collect();
            assert!(addrs.contains(&"10.88.0.5".to_string()), "{addrs:?}");
            assert!(addrs.contains(&"fd00::5".to_string()), "{addrs:?}");
            // again with one address: the other goes
            let one = Interface {
                ip_addresses: vec![want.ip_addresses[0].clone()],
                ..want.clone()
            };
            let got = update_interface(&h, &one).await.unwrap();
            let addrs: Vec<_> = got.ip_addresses.iter().map(|a| a.address.clone()).collect();
            assert!(!addrs.contains(&"fd00::5".to_string()), "{addrs:?}");

            let routes = vec![
                Route {
                    dest: String::new(),
                    gateway: "10.88.0.1".into(),
                    device: "eth0".into(),
                    ..Default::default()
                },
                Route {
                    dest: "10.99.0.0/16".into(),
                    device: "eth0".into(),
                    ..Default::default()
                },
            ];
            let all = update_routes(&h, &routes).await.unwrap();
            assert!(
                all.iter()
                    .any(|r| r.dest.is_empty() && r.gateway == "10.88.0.1" && r.device == "eth0"),
                "{all:?}"
            );
            assert!(all.iter().any(|r| r.dest == "10.99.0.0/16"), "{all:?}");
            // a second update replaces the first
            let all = update_routes(&h, &routes[..1]).await.unwrap();
            assert!(!all.iter().any(|r| r.dest == "10.99.0.0/16"), "{all:?}");

            add_neighbours(
                &h,
                &[ArpNeighbor {
                    to_ip_address: Some(IpAddress {
                        family: 0,
                        address: "10.88.0.9".into(),
                        mask: String::new(),
                    }),
                    device: "eth0".into(),
                    lladdr: "02:00:00:00:00:99".into(),
                    ..Default::default()
                }],
            )
            .await
            .unwrap();

            // bad input
            let e = update_interface(
                &h,
                &Interface {
                    hw_addr: "zz".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            let e = update_routes(
                &h,
                &[Route {
                    dest: "10.1.0.0/16".into(),
                    device: "nope0".into(),
                    ..Default::default()
                }],
            )
            .await
            .unwrap_err();
            assert_eq!(e.code(), tonic::Code::NotFound);
            assert!(e.message().contains("nope0"), "{e:?}");
            let names: Vec<_> = list_interfaces(&h)
                .await
                .unwrap()
                .into_iter()
                .map(|i| i.name)
                .collect();
            assert!(names.contains(&"lo".to_string()) && names.contains(&"eth0".to_string()));
        });
    }

    #[test]
    fn a_missing_nic_is_not_found_after_the_wait() {
        in_new_netns(|h| async move {
            let e = update_interface(
                &h,
                &Interface {
                    hw_addr: "02:00:00:00:00:42".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
            assert_eq!(e.code(), tonic::Code::NotFound);
            assert!(e.message().contains("02:00:00:00:00:42"));
        });
    }
}

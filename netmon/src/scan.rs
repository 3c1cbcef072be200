//! Reading the pod's network namespace: links, addresses, routes and
//! neighbours as netlink reports them, and what of it the guest must see.

use std::collections::BTreeMap;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use kata_proto::agent::{ip_address::Family, ArpNeighbor, Interface, IpAddress, Route};
use kata_proto::net::{is_link_local, mac_string};
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use crate::NetmonError;

/// The suffix of every link netmon creates (Kata's: `tap0_kata`).
pub const OWN_SUFFIX: &str = "_kata";

/// One link of the netns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Its index.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Its MAC address.
    pub mac: Vec<u8>,
    /// Its MTU.
    pub mtu: u32,
    /// Its kind (veth, tun, macvtap...), if it has one.
    pub kind: Option<InfoKind>,
    /// Loopback.
    pub loopback: bool,
    /// The link it sits on (IFLA_LINK: a macvtap's veth), if any.
    pub lower: Option<u32>,
}

/// One address of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    /// The link.
    pub index: u32,
    /// The address.
    pub ip: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// Whether it is link-local only (fe80::/10, 169.254/16).
    pub link_local: bool,
}

/// The netns as read at one moment.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Links by index.
    pub links: BTreeMap<u32, Link>,
    /// Every address.
    pub addrs: Vec<Addr>,
    /// The routes of the main table.
    pub routes: Vec<RouteMessage>,
    /// Every neighbour entry.
    pub neighbours: Vec<NeighbourMessage>,
}

impl Snapshot {
    /// Reads the netns.
    pub async fn read(h: &Handle) -> Result<Snapshot, NetmonError> {
        let nl = |what: &'static str| move |e: rtnetlink::Error| NetmonError::Netlink(what, e);
        let mut s = Snapshot::default();
        let mut links = h.link().get().execute();
        while let Some(m) = links.try_next().await.map_err(nl("listing links"))? {
            let mut l = Link {
                index: m.header.index,
                name: String::new(),
                mac: vec![],
                mtu: 0,
                kind: None,
                loopback: m.header.flags.contains(LinkFlags::Loopback),
                lower: None,
            };
            for a in m.attributes {
                match a {
                    LinkAttribute::IfName(n) => l.name = n,
                    LinkAttribute::Address(mac) => l.mac = mac,
                    LinkAttribute::Mtu(mtu) => l.mtu = mtu,
                    LinkAttribute::Link(i) => l.lower = Some(i),
                    LinkAttribute::LinkInfo(infos) => {
                        for i in infos {
                            if let LinkInfo::Kind(k) = i {
                                l.kind = Some(k);
                            }
                        }
                    }
                    _ => {}
                }
            }
            s.links.insert(l.index, l);
        }
        let mut addrs = h.address().get().execute();
        while let Some(m) = addrs.try_next().await.map_err(nl("listing addresses"))? {
            let ip = m.attributes.iter().find_map(|a| match a {
                // IFA_LOCAL is the interface's own address on point-to-point links
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let ip = ip.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = ip {
                s.addrs.push(Addr {
                    index: m.header.index,
                    ip,
                    prefix: m.header.prefix_len,
                    link_local: m.header.scope == AddressScope::Link || is_link_local(&ip),
                });
            }
        }
        for v in [IpVersion::V4, IpVersion::V6] {
            let q = match v {
                IpVersion::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
                IpVersion::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
            };
            let mut routes = h.route().get(q).execute();
            while let Some(r) = routes.try_next().await.map_err(nl("listing routes"))? {
                if table_of(&r) == u32::from(RouteHeader::RT_TABLE_MAIN) {
                    s.routes.push(r);
                }
            }
        }
        let mut neigh = h.neighbours().get().execute();
        while let Some(n) = neigh.try_next().await.map_err(nl("listing neighbours"))? {
            s.neighbours.push(n);
        }
        Ok(s)
    }

    /// The links worth taking into the VM, as Kata takes them: not
    /// loopback, not netmon's own, not a tap, and with at least one address
    /// that is not link-local only.
    pub fn candidates(&self) -> Vec<&Link> {
        self.links
            .values()
            .filter(|l| {
                !l.loopback
                    && !l.name.ends_with(OWN_SUFFIX)
                    && !matches!(l.kind, Some(InfoKind::Tun) | Some(InfoKind::MacVtap))
                    && self
                        .addrs
                        .iter()
                        .any(|a| a.index == l.index && !a.link_local)
            })
            .collect()
    }

    /// The interface `index` as the guest must configure it.
    pub fn interface(&self, index: u32) -> Option<Interface> {
        let l = self.links.get(&index)?;
        let addrs = self
            .addrs
            .iter()
            .filter(|a| a.index == index && !a.link_local)
            .map(|a| IpAddress {
                family: family_of(&a.ip) as i32,
                address: a.ip.to_string(),
                mask: a.prefix.to_string(),
            })
            .collect();
        Some(Interface {
            device: String::new(),
            name: l.name.clone(),
            ip_addresses: addrs,
            mtu: u64::from(l.mtu),
            hw_addr: mac_string(&l.mac),
            device_path: String::new(),
            r#type: String::new(),
            raw_flags: 0,
        })
    }

    /// The routes of the links `taken` (by index), for the guest. Routes the
    /// kernel makes by itself (for an address's subnet, for link-local and
    /// multicast) are left out: the guest's kernel makes its own when the
    /// addresses are set.
    pub fn guest_routes(&self, taken: &[u32]) -> Vec<Route> {
        let mut out = vec![];
        for r in &self.routes {
            if r.header.protocol == RouteProtocol::Kernel || r.header.kind != RouteType::Unicast {
                continue;
            }
            let mut dest = None;
            let mut gateway = None;
            let mut source = None;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => dest = route_ip(d),
                    RouteAttribute::Gateway(g) => gateway = route_ip(g),
                    RouteAttribute::PrefSource(p) => source = route_ip(p),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let Some(oif) = oif.filter(|i| taken.contains(i)) else {
                continue;
            };
            let Some(link) = self.links.get(&oif) else {
                continue;
            };
            let family = if r.header.address_family == AddressFamily::Inet6 {
                Family::V6
            } else {
                Family::V4
            };
            if let Some(IpAddr::V6(d)) = dest {
                if d.segments()[0] & 0xffc0 == 0xfe80 || d.segments()[0] & 0xff00 == 0xff00 {
                    continue;
                }
            }
            out.push(Route {
                dest: dest
                    .map(|d| format!("{d}/{}", r.header.destination_prefix_length))
                    .unwrap_or_default(),
                gateway: gateway.map(|g| g.to_string()).unwrap_or_default(),
                device: link.name.clone(),
                source: source.map(|s| s.to_string()).unwrap_or_default(),
                scope: u32::from(u8::from(r.header.scope)),
                family: family as i32,
                flags: 0,
            });
        }
        out
    }

    /// The permanent neighbour entries of the links `taken`.
    pub fn guest_neighbours(&self, taken: &[u32]) -> Vec<ArpNeighbor> {
        let mut out = vec![];
        for n in &self.neighbours {
            if n.header.state != NeighbourState::Permanent || !taken.contains(&n.header.ifindex) {
                continue;
            }
            let Some(link) = self.links.get(&n.header.ifindex) else {
                continue;
            };
            let mut ip = None;
            let mut lladdr = vec![];
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        ip = Some(IpAddr::V4(*v4))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        ip = Some(IpAddr::V6(*v6))
                    }
                    NeighbourAttribute::LinkLayerAddress(l) => lladdr = l.clone(),
                    _ => {}
                }
            }
            let Some(ip) = ip else { continue };
            out.push(ArpNeighbor {
                to_ip_address: Some(IpAddress {
                    family: family_of(&ip) as i32,
                    address: ip.to_string(),
                    mask: String::new(),
                }),
                device: link.name.clone(),
                lladdr: mac_string(&lladdr),
                state: i32::from(u16::from(NeighbourState::Permanent)),
                flags: 0,
            });
        }
        out
    }
}

fn table_of(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn family_of(ip: &IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: Option<InfoKind>) -> Link {
        Link {
            index,
            name: name.into(),
            mac: vec![2, 0, 0, 0, 0, index as u8],
            mtu: 1500,
            kind,
            loopback: index == 1,
            lower: None,
        }
    }

    fn addr(index: u32, ip: &str, prefix: u8) -> Addr {
        let ip: IpAddr = ip.parse().unwrap();
        Addr {
            index,
            ip,
            prefix,
            link_local: is_link_local(&ip),
        }
    }

    #[test]
    fn candidates_are_addressed_foreign_links() {
        let mut s = Snapshot::default();
        for l in [
            link(1, "lo", None),
            link(2, "eth0", Some(InfoKind::Veth)),
            link(3, "tap0_kata", Some(InfoKind::Tun)),
            link(4, "eth1", Some(InfoKind::Veth)),
            link(5, "eth2", Some(InfoKind::Veth)),
        ] {
            s.links.insert(l.index, l);
        }
        s.addrs = vec![
            addr(1, "127.0.0.1", 8),
            addr(2, "10.1.2.3", 24),
            addr(2, "fe80::1", 64),
            addr(3, "10.9.9.9", 24),
            addr(4, "fe80::2", 64),
            addr(5, "fd00::5", 64),
        ];
        let names: Vec<_> = s.candidates().iter().map(|l| l.name.clone()).collect();
        assert_eq!(names, ["eth0", "eth2"]);
        let i = s.interface(2).unwrap();
        assert_eq!(i.name, "eth0");
        assert_eq!(i.hw_addr, "02:00:00:00:00:02");
        assert_eq!(i.mtu, 1500);
        assert_eq!(i.ip_addresses.len(), 1, "link-local left out");
        assert_eq!(i.ip_addresses[0].address, "10.1.2.3");
        assert_eq!(i.ip_addresses[0].mask, "24");
        assert!(s.interface(99).is_none());
    }
}

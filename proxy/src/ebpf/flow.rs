//! Socket addresses → [`FlowKey`]s, as the kernel programs look them up.

use bulkhead_ebpf_common::{FAMILY_IPV4, FAMILY_IPV6, FlowKey, PROTO_TCP, PROTO_UDP};
use std::net::{IpAddr, SocketAddr};

/// The transport protocol of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP (the TLS listener).
    Tcp,
    /// UDP (the QUIC listener).
    Udp,
}

impl Protocol {
    /// The IP protocol number in [`FlowKey::protocol`].
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }
}

/// The key of the flow whose remote end is `remote`.
///
/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket
/// reports for an IPv4 peer) becomes the IPv4 key: the kernel sees IPv4
/// packets for it.
pub fn flow_key(remote: SocketAddr, protocol: Protocol) -> FlowKey {
    let mut addr = [0u8; 16];
    let family = match remote.ip().to_canonical() {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            FAMILY_IPV4
        }
        IpAddr::V6(v6) => {
            addr = v6.octets();
            FAMILY_IPV6
        }
    };
    FlowKey {
        addr,
        port: remote.port(),
        protocol: protocol.number(),
        family,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_fills_the_first_four_bytes() {
        let key = flow_key("192.0.2.7:4433".parse().unwrap(), Protocol::Udp);
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[192, 0, 2, 7]);
        assert_eq!(
            key,
            FlowKey {
                addr,
                port: 4433,
                protocol: PROTO_UDP,
                family: FAMILY_IPV4
            }
        );
    }

    #[test]
    fn ipv6_keeps_all_sixteen_bytes() {
        let key = flow_key("[2001:db8::1]:443".parse().unwrap(), Protocol::Tcp);
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        addr[15] = 1;
        assert_eq!(key.addr, addr);
        assert_eq!(
            (key.port, key.protocol, key.family),
            (443, PROTO_TCP, FAMILY_IPV6)
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_is_the_ipv4_key() {
        let mapped = flow_key("[::ffff:192.0.2.7]:4433".parse().unwrap(), Protocol::Udp);
        let plain = flow_key("192.0.2.7:4433".parse().unwrap(), Protocol::Udp);
        assert_eq!(mapped, plain);
        // An IPv4-compatible (deprecated, `::a.b.c.d`) address is not mapped: it stays IPv6.
        let compat = flow_key("[::192.0.2.7]:4433".parse().unwrap(), Protocol::Udp);
        assert_eq!(compat.family, FAMILY_IPV6);
    }
}

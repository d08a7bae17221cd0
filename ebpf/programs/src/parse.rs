//! The flow of a packet: its remote address, port and protocol.
//!
//! A `cgroup_skb` program sees the packet from its IP header on (ingress
//! and egress alike), so offset 0 holds the version nibble. The common case
//! (an IPv4 header without options, or an IPv6 fixed header, followed by the
//! ports, all in the skb's linear part) is read directly from packet memory;
//! anything else is read with `bpf_skb_load_bytes`, which also works on
//! non-linear skbs. Each helper call costs about 50 ns on the machines we
//! measured, a third of the program's budget.

#![expect(
    unsafe_code,
    reason = "direct packet access reads through raw pointers the verifier bounds-checks"
)]

use aya_ebpf::programs::SkBuffContext;
use bulkhead_ebpf_common::{FAMILY_IPV4, FAMILY_IPV6, FlowKey, PROTO_TCP, PROTO_UDP};

/// Which end of the packet is the remote one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Remote {
    /// The source (ingress).
    Source,
    /// The destination (egress).
    Destination,
}

/// Length of an IPv4 header without options.
const IPV4_MIN_HEADER: usize = 20;
/// Length of the IPv6 fixed header.
const IPV6_HEADER: usize = 40;
/// Mask of `frag_off` covering the fragment offset.
const IPV4_OFFSET_MASK: u16 = 0x1fff;

/// The flow of `ctx`'s packet as seen from `remote`'s end, or `None` for a
/// packet that is not TCP or UDP over IPv4 or IPv6 (IPv6 extension headers
/// count as "other"), or that cannot be read.
///
/// A non-first IPv4 fragment has no ports and also yields `None`; sockets
/// only ever see reassembled datagrams, so the programs never meet one.
#[inline(always)]
pub fn flow_key(ctx: &SkBuffContext, remote: Remote) -> Option<FlowKey> {
    match direct(ctx, remote) {
        Direct::Flow(key) => return Some(key),
        Direct::Other => return None,
        Direct::Fallback => {}
    }
    let first: u8 = ctx.load(0).ok()?;
    match first >> 4 {
        4 => ipv4(ctx, first, remote),
        6 => ipv6(ctx, remote),
        _ => None,
    }
}

/// What reading the linear packet data directly found.
enum Direct {
    /// A TCP or UDP flow.
    Flow(FlowKey),
    /// A packet the programs leave alone (not TCP or UDP, a fragment).
    Other,
    /// The headers are not all in the linear data, or IPv4 has options: use the helper path.
    Fallback,
}

/// The flow read straight from the linear packet data, when the headers it
/// needs are there: an IPv4 header without options, or an IPv6 fixed header,
/// plus 4 bytes of ports.
#[inline(always)]
fn direct(ctx: &SkBuffContext, remote: Remote) -> Direct {
    // SAFETY: the context's `__sk_buff`; reading `data` and `data_end` gives
    // the verifier's packet pointers, and every read below is bounds-checked
    // against `data_end` first.
    let (data, end) = unsafe {
        (
            (*ctx.skb.skb).data as usize,
            (*ctx.skb.skb).data_end as usize,
        )
    };
    if data + IPV4_MIN_HEADER + 4 > end {
        return Direct::Fallback;
    }
    // SAFETY: in bounds (checked above).
    let first = unsafe { *(data as *const u8) };
    if first == 0x45 {
        // SAFETY: 24 bytes are in bounds (checked above).
        let h: [u8; IPV4_MIN_HEADER + 4] =
            unsafe { core::ptr::read_unaligned(data as *const [u8; IPV4_MIN_HEADER + 4]) };
        if u16::from_be_bytes([h[6], h[7]]) & IPV4_OFFSET_MASK != 0 {
            return Direct::Other;
        }
        let Some(protocol) = transport(h[9]) else {
            return Direct::Other;
        };
        let (at, port_at) = match remote {
            Remote::Source => (12, 20),
            Remote::Destination => (16, 22),
        };
        return Direct::Flow(FlowKey {
            addr: [
                h[at],
                h[at + 1],
                h[at + 2],
                h[at + 3],
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ],
            port: u16::from_be_bytes([h[port_at], h[port_at + 1]]),
            protocol,
            family: FAMILY_IPV4,
        });
    }
    if first >> 4 == 6 {
        if data + IPV6_HEADER + 4 > end {
            return Direct::Fallback;
        }
        // SAFETY: 44 bytes are in bounds (checked just above).
        let h: [u8; IPV6_HEADER + 4] =
            unsafe { core::ptr::read_unaligned(data as *const [u8; IPV6_HEADER + 4]) };
        let Some(protocol) = transport(h[6]) else {
            return Direct::Other;
        };
        let (at, port_at) = match remote {
            Remote::Source => (8, 40),
            Remote::Destination => (24, 42),
        };
        let mut addr = [0_u8; 16];
        let mut i = 0;
        while i < 16 {
            addr[i] = h[at + i];
            i += 1;
        }
        return Direct::Flow(FlowKey {
            addr,
            port: u16::from_be_bytes([h[port_at], h[port_at + 1]]),
            protocol,
            family: FAMILY_IPV6,
        });
    }
    Direct::Fallback
}

/// An IPv4 packet's flow; `first` is its first byte (version and IHL).
#[inline(always)]
fn ipv4(ctx: &SkBuffContext, first: u8, remote: Remote) -> Option<FlowKey> {
    let header_len = usize::from(first & 0x0f) * 4;
    if header_len < IPV4_MIN_HEADER {
        return None;
    }
    let h: [u8; IPV4_MIN_HEADER] = ctx.load(0).ok()?;
    if u16::from_be_bytes([h[6], h[7]]) & IPV4_OFFSET_MASK != 0 {
        return None;
    }
    let protocol = transport(h[9])?;
    let at = match remote {
        Remote::Source => 12,
        Remote::Destination => 16,
    };
    // An array literal, not `[0; 16]` and stores: rustc turns a repeat
    // expression into a `memset`, which bpf-linker leaves as a call.
    let addr = [
        h[at],
        h[at + 1],
        h[at + 2],
        h[at + 3],
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    let port = port(ctx, header_len, remote)?;
    Some(FlowKey {
        addr,
        port,
        protocol,
        family: FAMILY_IPV4,
    })
}

/// An IPv6 packet's flow (fixed header only).
#[inline(always)]
fn ipv6(ctx: &SkBuffContext, remote: Remote) -> Option<FlowKey> {
    // Next header (byte 6) and both addresses (bytes 8..40).
    let next: u8 = ctx.load(6).ok()?;
    let protocol = transport(next)?;
    let at = match remote {
        Remote::Source => 8,
        Remote::Destination => 24,
    };
    let addr: [u8; 16] = ctx.load(at).ok()?;
    let port = port(ctx, IPV6_HEADER, remote)?;
    Some(FlowKey {
        addr,
        port,
        protocol,
        family: FAMILY_IPV6,
    })
}

/// `protocol` if it is TCP or UDP.
#[inline(always)]
fn transport(protocol: u8) -> Option<u8> {
    (protocol == PROTO_TCP || protocol == PROTO_UDP).then_some(protocol)
}

/// The remote port (host byte order) of the TCP or UDP header at `offset`:
/// both put the source port first and the destination port second.
#[inline(always)]
fn port(ctx: &SkBuffContext, offset: usize, remote: Remote) -> Option<u16> {
    let ports: [u8; 4] = ctx.load(offset).ok()?;
    Some(match remote {
        Remote::Source => u16::from_be_bytes([ports[0], ports[1]]),
        Remote::Destination => u16::from_be_bytes([ports[2], ports[3]]),
    })
}

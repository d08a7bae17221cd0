//! The flow of a packet: its remote address, port and protocol.
//!
//! A `cgroup_skb` program sees the packet from its IP header on (ingress
//! and egress alike), so offset 0 holds the version nibble. Headers are read
//! with `bpf_skb_load_bytes`, which also works on non-linear skbs.

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
    let first: u8 = ctx.load(0).ok()?;
    match first >> 4 {
        4 => ipv4(ctx, first, remote),
        6 => ipv6(ctx, remote),
        _ => None,
    }
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

//! bulkhead: a data plane that serves large language models to many tenants
//! on one GPU host, with isolation at every layer a request crosses.
//!
//! This crate is the I/O side: the command line, and (as they land) the
//! QUIC/HTTP3 and TLS listeners, the worker supervisor, the eBPF control
//! plane and the audit writer. Every decision it makes is delegated to the
//! sans-IO [`bulkhead_core`].

#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod bench;
pub mod certs;
pub mod demo;
pub mod deploy;
pub mod dispatch;
pub mod ebpf;
pub mod front;
pub mod serve;
pub mod simulate;
pub mod tls;
pub mod transport;
pub mod worker;

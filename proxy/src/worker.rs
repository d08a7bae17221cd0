//! `bulkhead worker`: one engine process per GPU (or MIG slice, or CPU),
//! serving the proxy over a unix socket with the versioned wire frames of
//! [`bulkhead_core::wire`].
//!
//! - [`server`]: the worker side: accept one proxy connection at a time,
//!   hand frames to the sans-IO [`bulkhead_kernels::engine::Engine`], step it
//!   while it has work, stream its reports back. A malformed frame gets a
//!   typed `Rejected` and the connection goes on; a broken stream is closed
//!   and the worker waits for the next connection; a proxy that goes away
//!   has its requests cancelled. Nothing takes the worker down but
//!   `Shutdown` (after draining) or a backend failure.
//! - [`link`]: the proxy side, blocking: connect, handshake, send, receive.
//!   A worker that dies is an error ([`LinkError::WorkerGone`]) the moment
//!   its socket closes, never a hang.

pub mod link;
pub mod server;

pub use self::{
    link::{LinkError, WorkerLink},
    server::{BackendChoice, WorkerOptions, build_engine, serve},
};

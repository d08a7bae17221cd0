//! Proxy↔worker wire protocol: versioned messages and their sans-IO frame codec.
//!
//! The proxy and each worker process talk over one byte stream (a unix
//! stream socket). This module only turns messages into bytes and back; the
//! I/O lives in the `bulkhead` crate.
//!
//! # Frames
//!
//! ```text
//! +----------------+-----------------+-----------------------------+
//! | len: u32 (BE)  | version: u16 BE | payload: postcard message   |
//! +----------------+-----------------+-----------------------------+
//!                  |<------------------- len bytes --------------->|
//! ```
//!
//! `len` counts the version and the payload, and is at most
//! [`MAX_FRAME_LEN`] (16 MiB); a larger one is refused from the header
//! alone, before anything is buffered for it. The payload is one
//! [`ProxyToWorker`] or [`WorkerToProxy`] in [postcard] (compact, not
//! self-describing), filling the frame exactly.
//!
//! # Versions
//!
//! [`WIRE_VERSION`] is `major << 8 | minor`. Every frame carries the
//! sender's version, so a peer of another major version is refused with
//! [`WireError::VersionMismatch`] on its first frame, before its payload is
//! read. A minor version may only append new message variants (an older peer
//! rejects those as [`WireError::Malformed`], and nothing else); every other
//! change (a field added, removed, reordered or retyped) bumps the major.
//!
//! # Conversation
//!
//! ```text
//! proxy                                   worker
//!   | -- Hello { role: Proxy } ---------->  |
//!   | <- Hello { role: Worker(info) } ----  |
//!   | -- Submit --------------------------> |
//!   | <- Tokens, Tokens, ... Finished ----  |   (exactly one Finished per Submit)
//!   | <- Capacity (after every change) ---- |
//!   | <- Violation (KV guard, fail closed)  |   (before that request's Finished)
//!   | -- Cancel / Shutdown ---------------> |
//! ```

mod frame;
mod message;
mod request_id;

pub use self::{
    frame::{FrameDecoder, MAX_FRAME_LEN, WireError, WireMessage, encode_frame},
    message::{
        Capacity, FinishReason, Finished, Hello, ProxyToWorker, RejectKind, Rejected, Role,
        Sampling, Submit, TenantBlocks, Violation, ViolationKind, WorkerBackend, WorkerInfo,
        WorkerToProxy,
    },
    request_id::{ParseRequestIdError, RequestId},
};

/// This build's wire version: `major << 8 | minor` (1.1: 1.0 plus
/// [`WorkerToProxy::Rejected`]).
pub const WIRE_VERSION: u16 = 0x0101;

/// The major part of a wire version: peers must agree on it.
pub const fn wire_major(version: u16) -> u8 {
    version.to_be_bytes()[0]
}

/// The minor part of a wire version: it only adds message variants.
pub const fn wire_minor(version: u16) -> u8 {
    version.to_be_bytes()[1]
}

/// Whether a peer speaking `theirs` can talk to this build (same major version).
pub const fn is_compatible(theirs: u16) -> bool {
    wire_major(theirs) == wire_major(WIRE_VERSION)
}

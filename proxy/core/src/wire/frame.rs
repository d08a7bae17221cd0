//! Frames: [`encode_frame`] and the push-bytes, pull-messages [`FrameDecoder`].

use super::{ProxyToWorker, WIRE_VERSION, WorkerToProxy, is_compatible, wire_major, wire_minor};
use serde::{Serialize, de::DeserializeOwned};
use std::fmt;
use std::marker::PhantomData;

/// Largest frame accepted or sent: `len` (version + payload) of at most 16 MiB.
pub const MAX_FRAME_LEN: u32 = 16 * 1024 * 1024;

/// Bytes of the length prefix.
const LEN_BYTES: usize = 4;
/// Bytes of the version field, the first `len` bytes of a frame.
const VERSION_BYTES: usize = 2;

/// Why a frame could not be encoded or decoded.
///
/// A framing error (a length over the limit, a frame too short for its
/// version, a version mismatch) is final: the stream can no longer be
/// trusted, so the connection should be closed (the [`FrameDecoder`] keeps
/// returning it). A payload that is not a valid message inside an intact
/// frame is [`WireError::Malformed`] too, but the decoder skips that frame and
/// goes on (see [`FrameDecoder::is_poisoned`]), so a peer can answer it with a
/// typed error and keep the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The peer speaks another major wire version.
    #[error(
        "wire version mismatch: we speak {}.{}, the peer speaks {}.{} (major versions must match)",
        wire_major(*ours), wire_minor(*ours), wire_major(*theirs), wire_minor(*theirs)
    )]
    VersionMismatch {
        /// This build's [`WIRE_VERSION`].
        ours: u16,
        /// The peer's.
        theirs: u16,
    },
    /// A frame's length exceeds the limit (refused from its header, before buffering it).
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The frame's length (version + payload), as declared or as encoded.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// A frame or its payload is not a valid message.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded, and how large it was.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A message that travels in frames: [`ProxyToWorker`] or [`WorkerToProxy`].
pub trait WireMessage:
    Serialize + DeserializeOwned + Clone + PartialEq + fmt::Debug + sealed::Sealed
{
    /// The type's name, for error context.
    const NAME: &'static str;
}

impl WireMessage for ProxyToWorker {
    const NAME: &'static str = "ProxyToWorker";
}

impl WireMessage for WorkerToProxy {
    const NAME: &'static str = "WorkerToProxy";
}

mod sealed {
    /// Only this module's message types are framed.
    pub trait Sealed {}
    impl Sealed for super::ProxyToWorker {}
    impl Sealed for super::WorkerToProxy {}
}

/// Appends `msg` as one frame to `out`, returning the frame's size in bytes.
///
/// On error `out` is left as it was. A message whose frame would exceed
/// [`MAX_FRAME_LEN`] is refused here, so a peer never receives one.
pub fn encode_frame<M: WireMessage>(msg: &M, out: &mut Vec<u8>) -> Result<usize, WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_BYTES]);
    out.extend_from_slice(&WIRE_VERSION.to_be_bytes());
    if let Err(err) = postcard::to_io(msg, &mut *out) {
        out.truncate(start);
        return Err(WireError::Malformed {
            what: format!("{} to encode", M::NAME),
            reason: err.to_string(),
        });
    }
    let frame_len = out.len() - start;
    let len = frame_len - LEN_BYTES;
    match u32::try_from(len) {
        Ok(len) if len <= MAX_FRAME_LEN => {
            out[start..start + LEN_BYTES].copy_from_slice(&len.to_be_bytes());
            Ok(frame_len)
        }
        _ => {
            out.truncate(start);
            Err(WireError::FrameTooLarge {
                len: len as u64,
                max: MAX_FRAME_LEN,
            })
        }
    }
}

/// Sans-IO frame decoder: push the bytes as they arrive, pull whole messages.
///
/// Bytes may arrive split anywhere, several frames at once, or a byte at a
/// time; the messages come out the same. A frame is buffered only up to its
/// declared length, and a declared length above the limit is an error as
/// soon as its 4-byte header is in.
///
/// ```
/// use bulkhead_core::wire::{FrameDecoder, ProxyToWorker, encode_frame};
///
/// let mut bytes = Vec::new();
/// encode_frame(&ProxyToWorker::Shutdown, &mut bytes).unwrap();
/// let mut decoder = FrameDecoder::<ProxyToWorker>::new();
/// decoder.push(&bytes[..3]);
/// assert_eq!(decoder.next_message(), Ok(None));
/// decoder.push(&bytes[3..]);
/// assert_eq!(decoder.next_message(), Ok(Some(ProxyToWorker::Shutdown)));
/// ```
pub struct FrameDecoder<M> {
    /// Received bytes; those before `start` are consumed.
    buf: Vec<u8>,
    /// Offset of the first unconsumed byte in `buf`.
    start: usize,
    /// Largest `len` accepted.
    max_frame_len: u32,
    /// The first error, returned again by every later call.
    failed: Option<WireError>,
    /// The message type decoded.
    message: PhantomData<fn() -> M>,
}

impl<M: WireMessage> FrameDecoder<M> {
    /// A decoder accepting frames up to [`MAX_FRAME_LEN`].
    pub fn new() -> Self {
        Self::with_max_frame_len(MAX_FRAME_LEN)
    }

    /// A decoder accepting frames with `len` (version + payload) up to `max_frame_len`.
    pub fn with_max_frame_len(max_frame_len: u32) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max_frame_len,
            failed: None,
            message: PhantomData,
        }
    }

    /// Appends received bytes. Decoding happens in [`Self::next_message`].
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        // Drop consumed bytes before growing, so the buffer stays about one frame long.
        if self.start > 0 && (self.start == self.buf.len() || self.start >= self.buf.len() / 2) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message: `Ok(None)` until one is fully buffered.
    ///
    /// After a framing error the decoder returns that error forever: close the
    /// connection. A frame whose payload is malformed is consumed and reported
    /// once; the next call decodes the frame after it.
    pub fn next_message(&mut self) -> Result<Option<M>, WireError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        match self.decode_one() {
            Ok(message) => Ok(message),
            Err(FrameFault::Payload(err)) => Err(err),
            Err(FrameFault::Framing(err)) => {
                self.failed = Some(err.clone());
                self.buf = Vec::new();
                self.start = 0;
                Err(err)
            }
        }
    }

    /// Whether a framing error ended this stream (every later call returns it).
    pub const fn is_poisoned(&self) -> bool {
        self.failed.is_some()
    }

    /// Bytes pushed but not yet consumed by a decoded message.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Decodes the frame at `start` if it is complete.
    fn decode_one(&mut self) -> Result<Option<M>, FrameFault> {
        let pending = &self.buf[self.start..];
        let Some((header, rest)) = pending.split_first_chunk::<LEN_BYTES>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*header);
        if len > self.max_frame_len {
            return Err(FrameFault::Framing(WireError::FrameTooLarge {
                len: u64::from(len),
                max: self.max_frame_len,
            }));
        }
        let len = len as usize;
        if len < VERSION_BYTES {
            return Err(FrameFault::Framing(WireError::Malformed {
                what: format!("{} frame of {len} bytes", M::NAME),
                reason: format!("shorter than its {VERSION_BYTES}-byte version field"),
            }));
        }
        // The version is checked as soon as it is in, before waiting for the payload.
        if let Some((version, _)) = rest.split_first_chunk::<VERSION_BYTES>() {
            let theirs = u16::from_be_bytes(*version);
            if !is_compatible(theirs) {
                return Err(FrameFault::Framing(WireError::VersionMismatch {
                    ours: WIRE_VERSION,
                    theirs,
                }));
            }
        }
        let Some(frame) = rest.get(..len) else {
            return Ok(None);
        };
        let payload = &frame[VERSION_BYTES..];
        let message = decode_payload::<M>(payload);
        // The frame's bounds are known: consume it whether or not its payload decodes.
        self.start += LEN_BYTES + len;
        message.map(Some).map_err(FrameFault::Payload)
    }
}

/// Whether an error left the frame boundaries intact.
enum FrameFault {
    /// The stream can't be trusted any more.
    Framing(WireError),
    /// One frame's payload is bad; the frames after it are fine.
    Payload(WireError),
}

/// Decodes one message that must fill `payload` exactly.
fn decode_payload<M: WireMessage>(payload: &[u8]) -> Result<M, WireError> {
    let malformed = |reason: String| WireError::Malformed {
        what: format!("{} payload of {} bytes", M::NAME, payload.len()),
        reason,
    };
    match postcard::take_from_bytes::<M>(payload) {
        Ok((message, [])) => Ok(message),
        Ok((_, trailing)) => Err(malformed(format!(
            "{} trailing bytes after the message",
            trailing.len()
        ))),
        Err(postcard::Error::SerdeDeCustom) => Err(malformed(
            "a field holds an invalid value (an unknown message variant from a newer minor \
             version, or e.g. a malformed tenant id)"
                .to_owned(),
        )),
        Err(err) => Err(malformed(err.to_string())),
    }
}

impl<M: WireMessage> Default for FrameDecoder<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> fmt::Debug for FrameDecoder<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("buffered", &(self.buf.len() - self.start))
            .field("max_frame_len", &self.max_frame_len)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

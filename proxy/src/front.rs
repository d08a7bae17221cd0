//! The front door's shared vocabulary: what a transport (TLS/TCP with
//! HTTP/1.1 and h2, or QUIC with HTTP/3) hands the API, and what it gets back.
//!
//! Transports terminate TLS, require a client certificate from a tenant CA,
//! read the request body (up to [`MAX_BODY_BYTES`]), and call a [`Handler`].
//! They never interpret the request; the API never sees a socket. A
//! streaming response is a channel of body chunks: when the client goes
//! away the transport drops the receiver, and the sender side (the
//! dispatcher) sees it and cancels the request on its worker.

use bulkhead_core::{TenantId, identity::IdentityError};
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use std::{future::Future, net::SocketAddr};
use tokio::sync::mpsc;

/// Largest request body a transport reads; a larger one gets 413 from the transport.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// The HTTP version a request came over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1 over TLS/TCP.
    Http1,
    /// HTTP/2 over TLS/TCP.
    Http2,
    /// HTTP/3 over QUIC.
    Http3,
}

/// Who sent a request, as the transport established it.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The tenant named by the verified client certificate's SPIFFE id, or why none is.
    pub tenant: Result<TenantId, IdentityError>,
    /// The client's address as seen now.
    pub remote: SocketAddr,
    /// The protocol.
    pub protocol: Protocol,
}

/// One HTTP request, body read.
#[derive(Debug)]
pub struct ApiRequest {
    /// The method.
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// The sender.
    pub peer: Peer,
}

/// A response body: whole, or streamed chunk by chunk (SSE).
#[derive(Debug)]
pub enum ResponseBody {
    /// The whole body.
    Full(Bytes),
    /// Chunks as they come; the stream ends when the sender is dropped.
    Stream(mpsc::Receiver<Bytes>),
}

/// One HTTP response.
#[derive(Debug)]
pub struct ApiResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers (the transport adds framing headers and `alt-svc`).
    pub headers: HeaderMap,
    /// The body.
    pub body: ResponseBody,
}

impl ApiResponse {
    /// A whole-body response with a content type.
    pub fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        Self {
            status,
            headers,
            body: ResponseBody::Full(body.into()),
        }
    }
}

/// What serves requests: the API. Transports are generic over it.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, request: ApiRequest) -> impl Future<Output = ApiResponse> + Send;
}

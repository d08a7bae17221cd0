//! A lean HTTP/3 client for the load generator of `bench proxy`.
//!
//! The load generator shares the machine's cores with the proxy it
//! measures, so every microsecond it spends is one the proxy does not get.
//! This client speaks the same HTTP/3 (RFC 9114) over the same quinn
//! connection as the `h3` crate's, but does per request only what the wire
//! needs: the request (HEADERS and DATA frames, QPACK with the static table
//! and literals, RFC 9204) is encoded once and sent with one write and a
//! FIN on a new stream; the answer is read to its end, and of its header
//! section only `:status` is decoded. It opens the control stream every
//! client must (with an empty SETTINGS frame) and never uses QPACK's dynamic
//! table, which it does not offer, so the server may not either.

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use quinn_proto::{VarInt, coding::Codec as _};
use std::net::SocketAddr;

/// The largest answer read (a `max_tokens` 1 completion is a few hundred bytes).
const MAX_RESPONSE: usize = 1 << 20;

/// HTTP/3 frame types (RFC 9114 §7.2).
const FRAME_DATA: u64 = 0x00;
const FRAME_HEADERS: u64 = 0x01;
const FRAME_SETTINGS: u64 = 0x04;
/// The control stream's type (RFC 9114 §6.2.1).
const STREAM_CONTROL: u64 = 0x00;

/// QPACK static table indices (RFC 9204 Appendix A) this client sends.
const AUTHORITY: u64 = 0;
const PATH: u64 = 1;
const METHOD_GET: u64 = 17;
const METHOD_POST: u64 = 20;
const SCHEME_HTTPS: u64 = 23;
const CONTENT_TYPE_JSON: u64 = 46;

/// The `:status` entries of the static table: (index, status).
const STATUSES: [(u64, u16); 14] = [
    (24, 103),
    (25, 200),
    (26, 304),
    (27, 404),
    (28, 503),
    (63, 100),
    (64, 204),
    (65, 206),
    (66, 302),
    (67, 400),
    (68, 403),
    (69, 421),
    (70, 425),
    (71, 500),
];

/// One HTTP/3 connection of the load generator.
pub(crate) struct WireClient {
    conn: quinn::Connection,
    /// Our control stream: open for the connection's life (closing it is a
    /// connection error, RFC 9114 §6.2.1).
    _control: quinn::SendStream,
    /// Held so the connection's endpoint outlives it.
    _endpoint: quinn::Endpoint,
}

/// A request encoded once, to be sent any number of times.
#[derive(Clone, Debug)]
pub(crate) struct WireRequest(Bytes);

/// What came back for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WireResponse {
    pub status: u16,
    /// Bytes of the body (DATA frames' payloads).
    pub body_len: usize,
}

impl WireRequest {
    /// `POST path` with a JSON `body`.
    pub(crate) fn post_json(authority: &str, path: &str, body: &[u8]) -> Self {
        let mut fields = field_section_prefix();
        indexed(&mut fields, METHOD_POST);
        common_fields(&mut fields, authority, path);
        indexed(&mut fields, CONTENT_TYPE_JSON);
        let mut out = Vec::with_capacity(fields.len() + body.len() + 16);
        frame(&mut out, FRAME_HEADERS, &fields);
        frame(&mut out, FRAME_DATA, body);
        Self(out.into())
    }

    /// `GET path`.
    pub(crate) fn get(authority: &str, path: &str) -> Self {
        let mut fields = field_section_prefix();
        indexed(&mut fields, METHOD_GET);
        common_fields(&mut fields, authority, path);
        let mut out = Vec::with_capacity(fields.len() + 8);
        frame(&mut out, FRAME_HEADERS, &fields);
        Self(out.into())
    }
}

impl WireClient {
    /// Connects through `endpoint` (whose client config offers ALPN `h3`)
    /// to `server`, and opens the control stream.
    pub(crate) async fn connect(
        endpoint: quinn::Endpoint,
        server: SocketAddr,
    ) -> anyhow::Result<Self> {
        let conn = endpoint.connect(server, "localhost")?.await?;
        let mut control = conn.open_uni().await?;
        let mut settings = Vec::new();
        put_varint(&mut settings, STREAM_CONTROL);
        frame(&mut settings, FRAME_SETTINGS, &[]);
        control.write_all(&settings).await?;
        Ok(Self {
            conn,
            _control: control,
            _endpoint: endpoint,
        })
    }

    /// Sends `request` on a new stream and reads its whole answer.
    pub(crate) async fn send(&self, request: &WireRequest) -> anyhow::Result<WireResponse> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.write_chunk(request.0.clone()).await?;
        send.finish()?;
        let answer = recv.read_to_end(MAX_RESPONSE).await?;
        parse_response(&answer)
    }

    /// Closes the connection (`H3_NO_ERROR`).
    pub(crate) fn close(&self) {
        self.conn.close(0x100u32.into(), b"done");
    }
}

/// The answer's status and body length, from its frames.
fn parse_response(mut bytes: &[u8]) -> anyhow::Result<WireResponse> {
    let mut status = None;
    let mut body_len = 0;
    while !bytes.is_empty() {
        let (kind, n) = take_varint(bytes).context("a truncated frame type")?;
        bytes = &bytes[n..];
        let (len, n) = take_varint(bytes).context("a truncated frame length")?;
        bytes = &bytes[n..];
        let len = usize::try_from(len).context("a frame longer than memory")?;
        ensure!(
            len <= bytes.len(),
            "a frame of {len} bytes, {} left",
            bytes.len()
        );
        let (payload, rest) = bytes.split_at(len);
        bytes = rest;
        match kind {
            FRAME_HEADERS if status.is_none() => status = Some(status_of(payload)?),
            FRAME_DATA => {
                ensure!(status.is_some(), "DATA before HEADERS");
                body_len += len;
            }
            // Trailers, and reserved frame types (which a receiver ignores).
            _ => {}
        }
    }
    Ok(WireResponse {
        status: status.context("no HEADERS frame")?,
        body_len,
    })
}

/// `:status` of an encoded field section: its first field line (pseudo
/// fields come first), indexed or a literal naming a `:status` entry.
fn status_of(section: &[u8]) -> anyhow::Result<u16> {
    let (required_insert_count, n) = take_prefixed(section, 8).context("no section prefix")?;
    ensure!(
        required_insert_count == 0,
        "the section uses QPACK's dynamic table, which this client does not offer"
    );
    let rest = &section[n..];
    let (_delta_base, n) = take_prefixed(rest, 7).context("no section prefix")?;
    let line = &rest[n..];
    let first = *line.first().context("an empty field section")?;
    if first & 0x80 != 0 {
        // Indexed field line: 1 T index(6).
        ensure!(first & 0x40 != 0, "a dynamic table reference");
        let (index, _) = take_prefixed(line, 6).context("a truncated index")?;
        return STATUSES
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, s)| *s)
            .with_context(|| format!("the first field is static entry {index}, not :status"));
    }
    if first & 0x40 != 0 {
        // Literal field line with name reference: 0 1 N T index(4).
        ensure!(first & 0x10 != 0, "a dynamic table reference");
        let (index, n) = take_prefixed(line, 4).context("a truncated name index")?;
        ensure!(
            STATUSES.iter().any(|(i, _)| *i == index),
            "the first field names static entry {index}, not :status"
        );
        let value = &line[n..];
        let huffman = value.first().context("no :status value")? & 0x80 != 0;
        let (len, n) = take_prefixed(value, 7).context("a truncated :status length")?;
        let len = usize::try_from(len).context("a :status value longer than memory")?;
        let digits = value.get(n..n + len).context("a truncated :status value")?;
        let text = if huffman {
            huffman_digits(digits)?
        } else {
            String::from_utf8(digits.to_vec()).context("a :status that is not text")?
        };
        return text
            .parse()
            .with_context(|| format!("a :status of {text:?}"));
    }
    bail!("the first field line (0x{first:02x}) is not :status")
}

/// Decodes HPACK Huffman code (RFC 7541 Appendix B) of decimal digits only,
/// which is all a status holds.
fn huffman_digits(code: &[u8]) -> anyhow::Result<String> {
    let mut out = String::new();
    let (mut bits, mut have) = (0u64, 0u32);
    let mut input = code.iter();
    loop {
        while have < 6 {
            match input.next() {
                Some(&b) => {
                    bits = (bits << 8) | u64::from(b);
                    have += 8;
                }
                None => break,
            }
        }
        if have == 0 {
            return Ok(out);
        }
        let top = |n: u32| (bits >> (have - n)) & ((1 << n) - 1);
        if have >= 5 && top(5) <= 2 {
            // '0' 00000, '1' 00001, '2' 00010.
            out.push(char::from(b'0' + u8::try_from(top(5))?));
            have -= 5;
        } else if have >= 6 && (25..=31).contains(&top(6)) {
            // '3' 011001 ... '9' 011111.
            out.push(char::from(b'0' + u8::try_from(top(6) - 22)?));
            have -= 6;
        } else if have < 8 && top(have) == (1 << have) - 1 {
            // Padding: the most significant bits of EOS, all ones.
            return Ok(out);
        } else {
            bail!("Huffman code of something other than a digit in :status");
        }
        bits &= (1 << have) - 1;
    }
}

/// Required Insert Count 0 and Delta Base 0: static table and literals only.
fn field_section_prefix() -> Vec<u8> {
    vec![0x00, 0x00]
}

fn common_fields(out: &mut Vec<u8>, authority: &str, path: &str) {
    indexed(out, SCHEME_HTTPS);
    literal_with_name(out, AUTHORITY, authority);
    literal_with_name(out, PATH, path);
}

/// Indexed field line of static entry `index`: 1 1 index(6).
fn indexed(out: &mut Vec<u8>, index: u64) {
    put_prefixed(out, 0xc0, 6, index);
}

/// Literal field line naming static entry `index`, its value not Huffman
/// coded and not to be indexed by intermediaries: 0 1 0 1 index(4), then
/// 0 length(7) and the value.
fn literal_with_name(out: &mut Vec<u8>, index: u64, value: &str) {
    put_prefixed(out, 0x50, 4, index);
    put_prefixed(out, 0x00, 7, value.len() as u64);
    out.extend_from_slice(value.as_bytes());
}

/// One frame: type, length, payload.
fn frame(out: &mut Vec<u8>, kind: u64, payload: &[u8]) {
    put_varint(out, kind);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

/// An integer with an N-bit prefix (RFC 7541 §5.1) after the bits `first` holds.
fn put_prefixed(out: &mut Vec<u8>, first: u8, prefix_bits: u32, value: u64) {
    let max = (1u64 << prefix_bits) - 1;
    if value < max {
        out.push(first | u8::try_from(value).unwrap_or(u8::MAX));
        return;
    }
    out.push(first | u8::try_from(max).unwrap_or(u8::MAX));
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push(u8::try_from(rest & 0x7f).unwrap_or(0) | 0x80);
        rest >>= 7;
    }
    out.push(u8::try_from(rest).unwrap_or(0));
}

/// An integer with an N-bit prefix and the bytes it took; `None` when truncated or too large.
fn take_prefixed(bytes: &[u8], prefix_bits: u32) -> Option<(u64, usize)> {
    let max = (1u64 << prefix_bits) - 1;
    let value = u64::from(*bytes.first()?) & max;
    if value < max {
        return Some((value, 1));
    }
    let mut total = max;
    for (i, &b) in bytes.iter().enumerate().skip(1) {
        let shift = 7 * u32::try_from(i - 1).ok()?;
        if shift > 56 {
            return None;
        }
        total = total.checked_add(u64::from(b & 0x7f) << shift)?;
        if b & 0x80 == 0 {
            return Some((total, i + 1));
        }
    }
    None
}

/// A QUIC variable-length integer (RFC 9000 §16), quinn's coding of it.
fn put_varint(out: &mut Vec<u8>, value: u64) {
    VarInt::from_u64(value)
        .expect("lengths and types far below 2^62")
        .encode(out);
}

/// A QUIC variable-length integer and the bytes it took; `None` when truncated.
fn take_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut rest = bytes;
    let value = VarInt::decode(&mut rest).ok()?;
    Some((value.into_inner(), bytes.len() - rest.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_lines_match_rfc_9204s_examples() {
        // RFC 9204 B.1: `:path /index.html` as a literal naming static entry 1.
        let mut out = Vec::new();
        literal_with_name(&mut out, PATH, "/index.html");
        assert_eq!(
            out,
            [
                0x51, 0x0b, 0x2f, 0x69, 0x6e, 0x64, 0x65, 0x78, 0x2e, 0x68, 0x74, 0x6d, 0x6c
            ]
        );
        // Indices past the prefix continue in following octets (RFC 7541 C.1.2).
        let mut out = Vec::new();
        put_prefixed(&mut out, 0x00, 5, 1337);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        assert_eq!(take_prefixed(&out, 5), Some((1337, 3)));
        let mut out = Vec::new();
        indexed(&mut out, CONTENT_TYPE_JSON);
        assert_eq!(out, [0xee]);
    }

    #[test]
    fn varints_round_trip_at_each_length() {
        for (value, len) in [
            (0, 1),
            (63, 1),
            (64, 2),
            (16_383, 2),
            (16_384, 4),
            (1 << 30, 8),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out.len(), len, "{value}");
            assert_eq!(take_varint(&out), Some((value, len)));
        }
        // RFC 9000 A.1's examples.
        assert_eq!(take_varint(&[0x7b, 0xbd]), Some((15_293, 2)));
        assert_eq!(
            take_varint(&[0x9d, 0x7f, 0x3e, 0x7d]),
            Some((494_878_333, 4))
        );
        assert_eq!(take_varint(&[0x9d, 0x7f]), None);
    }

    /// An answer: HEADERS with `section`, then DATA of `body`.
    fn answer(section: &[u8], body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame(&mut out, FRAME_HEADERS, section);
        frame(&mut out, FRAME_DATA, body);
        out
    }

    #[test]
    fn statuses_are_read_indexed_literal_and_huffman_coded() {
        // `:status 200` indexed (static 25), then content-type json.
        let ok = answer(&[0x00, 0x00, 0xd9, 0xee], b"{}");
        assert_eq!(
            parse_response(&ok).unwrap(),
            WireResponse {
                status: 200,
                body_len: 2
            }
        );
        // `:status 429`: a literal naming static 24, plain and Huffman coded
        // ('4' 011010, '2' 00010, '9' 011111, 7 bits of padding: 0x68 0x4f 0xff).
        let plain = answer(&[0x00, 0x00, 0x5f, 0x09, 0x03, b'4', b'2', b'9'], b"");
        assert_eq!(parse_response(&plain).unwrap().status, 429);
        let coded = answer(&[0x00, 0x00, 0x5f, 0x09, 0x83, 0x68, 0x4f, 0xff], b"x");
        assert_eq!(parse_response(&coded).unwrap().status, 429);
        // '5' 011011 '0' 00000 '3' 011001 and 7 bits of padding: 503.
        let padded = answer(&[0x00, 0x00, 0x5f, 0x09, 0x83, 0x6c, 0x0c, 0xff], b"");
        assert_eq!(parse_response(&padded).unwrap().status, 503);
        // A reserved frame type between them is skipped.
        let mut grease = Vec::new();
        frame(&mut grease, 0x21, b"??");
        grease.extend(ok);
        assert_eq!(parse_response(&grease).unwrap().status, 200);
    }

    #[test]
    fn what_it_cannot_read_is_an_error_naming_it() {
        let err = |bytes: &[u8]| format!("{:#}", parse_response(bytes).unwrap_err());
        assert!(err(&answer(&[0x01, 0x00, 0xd9], b"")).contains("dynamic table"));
        assert!(err(&answer(&[0x00, 0x00, 0xd1], b"")).contains("static entry 17"));
        assert!(err(&answer(&[0x00, 0x00, 0x5f, 0x09, 0x81, 0x1f], b"")).contains("Huffman"));
        let mut data_first = Vec::new();
        frame(&mut data_first, FRAME_DATA, b"x");
        assert!(err(&data_first).contains("DATA before HEADERS"));
        assert!(err(&[0x01, 0x05, 0x00]).contains("a frame of 5 bytes"));
        assert!(err(&[]).contains("no HEADERS"));
    }

    /// Answers `/status/N` with status N and a body of N bytes.
    struct StatusHandler;

    impl crate::front::Handler for StatusHandler {
        async fn handle(&self, request: crate::front::ApiRequest) -> crate::front::ApiResponse {
            let status: u16 = request.path["/status/".len()..].parse().unwrap();
            crate::front::ApiResponse::full(
                http::StatusCode::from_u16(status).unwrap(),
                "text/plain",
                vec![b'x'; usize::from(status)],
            )
        }
    }

    /// The real QUIC listener (h3's encoder) answers statuses in QPACK's
    /// static table (indexed) and out of it (literals, Huffman coded or not).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn it_reads_what_the_quic_listener_answers() {
        use crate::{certs, tls, transport};
        let dir = super::super::TempDir::new("h3-wire").unwrap();
        let domain = bulkhead_core::identity::TrustDomain::new(super::super::DOMAIN).unwrap();
        let pki = certs::generate(&domain, &[super::super::tenant("acme")]).unwrap();
        pki.write_to(dir.path(), false).unwrap();
        let server_tls = tls::ServerTls::from_paths(&bulkhead_core::config::TlsPaths {
            cert: dir.path().join(certs::SERVER_CERT_FILE),
            key: dir.path().join(certs::SERVER_KEY_FILE),
            client_ca: vec![dir.path().join(certs::TENANT_CA_FILE)],
        })
        .unwrap();
        let quic = transport::QuicServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            server_tls.quic,
            domain,
            transport::TransportLimits::default(),
        )
        .unwrap();
        let server = quic.local_addr().unwrap();
        let shutdown = transport::Shutdown::new();
        let serving =
            tokio::spawn(quic.serve(std::sync::Arc::new(StatusHandler), shutdown.signal()));
        let pair = pki.client(&super::super::tenant("acme")).unwrap();
        let client_tls = super::super::tenant_tls(
            pki.server_ca_pem.as_bytes(),
            pair.cert_pem.as_bytes(),
            pair.key_pem.as_bytes(),
            &tls::QUIC_ALPN,
        )
        .unwrap();
        let endpoint = super::super::quic_client(client_tls, server).unwrap();
        let client = WireClient::connect(endpoint, server).await.unwrap();
        let authority = format!("localhost:{}", server.port());
        for status in [200, 404, 503, 206, 400, 413, 429, 502, 299] {
            let path = format!("/status/{status}");
            let get = client.send(&WireRequest::get(&authority, &path)).await;
            let post = client
                .send(&WireRequest::post_json(&authority, &path, b"{}"))
                .await;
            let body_len = if status == 204 {
                0
            } else {
                usize::from(status)
            };
            for answer in [get, post] {
                assert_eq!(answer.unwrap(), WireResponse { status, body_len });
            }
        }
        client.close();
        shutdown.trigger();
        serving.await.unwrap();
    }

    #[test]
    fn requests_are_a_headers_and_a_data_frame() {
        let r = WireRequest::post_json("localhost:4433", "/v1/chat/completions", b"{}");
        let mut bytes = &r.0[..];
        let (kind, n) = take_varint(bytes).unwrap();
        assert_eq!(kind, FRAME_HEADERS);
        bytes = &bytes[n..];
        let (len, n) = take_varint(bytes).unwrap();
        let section = &bytes[n..n + usize::try_from(len).unwrap()];
        let mut expected = vec![0x00, 0x00, 0xd4, 0xd7, 0x50, 14];
        expected.extend_from_slice(b"localhost:4433");
        expected.extend_from_slice(&[0x51, 20]);
        expected.extend_from_slice(b"/v1/chat/completions");
        expected.push(0xee);
        assert_eq!(section, &expected[..]);
        assert!(r.0.ends_with(&[0x00, 0x02, b'{', b'}']));
        let get = WireRequest::get("h", "/healthz");
        assert_eq!(get.0[2..5], [0x00, 0x00, 0xd1]);
    }
}

//! One HTTP/1.1 exchange at a time on a Vehicle API connection: the request written in one
//! `write`, the answer read into one buffer that becomes its body.
//!
//! Why not hyper's connection (what [`super::pool`] drove before): per request it built a
//! `Request` and a `Response` with their header maps, queued the request through a channel
//! to its dispatcher (a tokio mpsc whose first block is ~9 KB per connection), kept an 8 KB
//! head buffer and a 16 KB read buffer per connection for the connection's life, and handed
//! the body over in `Bytes` frames copied once more into the caller's `Vec`. In the fleet
//! profile that was ~8 % of a poll's CPU, and ~33 KB of every request in flight (the latency
//! scenario's peak: 1,024 of them). Here a connection holds its socket and nothing else while
//! it waits; the answer's buffer is taken when the answer's first bytes arrive (over plain
//! TCP; over TLS when the read starts) and is handed back as the body.
//!
//! What it speaks (RFC 9112, as a client that sends one request at a time): status line and
//! fields parsed by `httparse` (hyper's own parser); informational (1xx) answers skipped;
//! the body framed by `Transfer-Encoding: chunked`, else `Content-Length`, else the
//! connection's end; no body for 204 and 304; keep-alive as HTTP/1.1 and 1.0 define it.
//! Anything else is refused with the reason: a head over [`MAX_HEAD`] bytes or
//! [`MAX_FIELDS`] fields, conflicting lengths, a malformed chunk, bytes after the answer
//! (the connection is then not used again).

use std::io;

use bytes::{BufMut as _, Bytes};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::error::{ApiError, ErrorKind};

/// A connection's byte stream: TCP, or TLS over TCP (hyper-rustls's connector makes both).
pub(crate) type Stream = TokioIo<MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>>;

/// The longest answer head read (status line and fields). hyper's limit is larger (~400 KB);
/// no Vehicle API answer comes near either.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The most fields an answer head may have (hyper's default is 100).
pub(crate) const MAX_FIELDS: usize = 100;
/// The first read's size when the connection has not answered yet; after that, its last
/// answer's size and a kilobyte (so a v3 listing, ~9 KB with its head, arrives in one read).
const FIRST_READ: usize = 8 * 1024;
/// The most a chunk-size line or a trailer section may take beyond its data.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// An answer read in full.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    /// A view of the buffer the answer was read into (not copied out of it).
    pub body: Bytes,
    /// The connection may carry another request.
    pub reusable: bool,
}

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The request could not be written: on a connection that idled, the server closed it
    /// meanwhile, and another connection may take the request. (Once it is written, it is
    /// never sent again: a Vehicle API request is billed, and a server that closes without
    /// answering has been asked.)
    Unsent(io::Error),
    /// The answer was refused or broke off (the error says which, with its kind).
    Answer(ApiError),
}

/// One HTTP/1.1 connection.
pub(crate) struct Connection {
    io: Stream,
    /// How much the next answer's first read asks for.
    read_hint: usize,
}

impl Connection {
    pub fn new(io: Stream) -> Connection {
        Connection {
            io,
            read_hint: FIRST_READ,
        }
    }

    /// Whether the connection is still open and quiet, as an idle connection must be: the
    /// server has not closed it, reset it, or sent anything unasked. Asks the socket itself
    /// (a `recv` that peeks and does not wait): tokio's idea of its readiness is only as new
    /// as the runtime's last look at `epoll`, and a close that came since would be missed,
    /// the request written to a closed connection and lost. A TLS connection with bytes
    /// waiting (a close alert, a session ticket) is not used either: a new one costs less
    /// than telling them apart.
    pub fn is_quiet(&self) -> bool {
        let tcp = match self.io.inner() {
            MaybeHttpsStream::Http(tcp) => tcp.inner(),
            MaybeHttpsStream::Https(tls) => tls.inner().get_ref().0.inner().inner(),
        };
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        matches!(
            socket2::SockRef::from(tcp).peek(&mut probe),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }

    /// Writes `request` (a whole request, head and body, from [`encode_request`]) and reads
    /// its answer, refusing a body over `limit` bytes. `status` of the answer is in every
    /// error made after its head was read.
    pub async fn exchange(&mut self, request: &[u8], limit: usize) -> Result<Answer, Failure> {
        self.io.write_all(request).await.map_err(Failure::Unsent)?;
        self.io.flush().await.map_err(Failure::Unsent)?;
        let mut buf = self.first_bytes().await?;
        let (head_len, status, headers, version) = loop {
            match parse_head(&buf)? {
                Some(head) if head.1 >= 100 && head.1 < 200 => {
                    if head.1 == 101 {
                        return Err(refused(
                            Some(101),
                            "the server switched protocols; an HTTP/1 answer was expected",
                        ));
                    }
                    // An informational answer (100 Continue, 103 Early Hints): the real one
                    // follows.
                    buf.drain(..head.0);
                }
                Some(head) => break head,
                None => {
                    if buf.len() >= MAX_HEAD {
                        return Err(refused(
                            None,
                            &format!("the answer's head is longer than {MAX_HEAD} bytes"),
                        ));
                    }
                    // As hyper classed it: an answer that ends in its head is a transport
                    // error (the request may not have been read).
                    match self.read_more(&mut buf, MAX_HEAD).await {
                        Ok(0) => {
                            return Err(refused(None, "the connection closed in the answer's head"))
                        }
                        Ok(_) => {}
                        Err(e) => {
                            return Err(Failure::Answer(super::transport::transport_error(
                                "reading the answer's head",
                                &e,
                            )))
                        }
                    }
                }
            }
        };
        let framing = framing(status, &headers).map_err(|why| refused(Some(status), &why))?;
        let mut reusable = keep_alive(version, &headers);
        // Whatever breaks off from here is the body.
        let body_read = |e: io::Error| Failure::Answer(read_error(&e));
        let (body, answer_len) = match framing {
            Framing::Empty => {
                reusable &= buf.len() == head_len;
                (Bytes::new(), head_len)
            }
            Framing::Length(n) => {
                if n > limit as u64 {
                    return Err(too_large(status, limit));
                }
                let end = head_len + n as usize;
                while buf.len() < end {
                    let need = end - buf.len();
                    if self.read_more(&mut buf, need).await.map_err(body_read)? == 0 {
                        return Err(broke_off(Some(status), "the answer's body broke off"));
                    }
                }
                // Bytes after the answer were never asked for: the connection is not used
                // again.
                reusable &= buf.len() == end;
                (Bytes::from(buf).slice(head_len..end), end)
            }
            Framing::Chunked => {
                let mut chunks = Chunked::new(head_len);
                let mut out = Vec::new();
                loop {
                    match chunks.decode(&buf, &mut out, limit) {
                        Ok(true) => break,
                        Ok(false) => {
                            // Only an unfinished piece is kept: a body of many small chunks
                            // holds no more than its decoded bytes and one line.
                            buf.drain(..chunks.at);
                            chunks.at = 0;
                            if self
                                .read_more(&mut buf, FIRST_READ)
                                .await
                                .map_err(body_read)?
                                == 0
                            {
                                return Err(broke_off(Some(status), "the answer's body broke off"));
                            }
                        }
                        Err(Chunk::TooLarge) => return Err(too_large(status, limit)),
                        Err(Chunk::Malformed(why)) => return Err(refused(Some(status), why)),
                    }
                }
                reusable &= chunks.at == buf.len();
                (Bytes::from(out), chunks.at)
            }
            Framing::UntilClose => {
                reusable = false;
                while self
                    .read_more(&mut buf, FIRST_READ)
                    .await
                    .map_err(body_read)?
                    > 0
                {
                    if buf.len() - head_len > limit {
                        return Err(too_large(status, limit));
                    }
                }
                let end = buf.len();
                (Bytes::from(buf).slice(head_len..), end)
            }
        };
        // A read that does not fill its buffer tells tokio the socket is drained (no `recv`
        // that would block comes before the next wait): the next answer's buffer is this
        // one's size and some.
        self.read_hint = (answer_len + 1024).clamp(2048, MAX_HEAD);
        Ok(Answer {
            status,
            headers,
            body,
            reusable,
        })
    }

    /// The answer's first bytes, in a buffer of the size its last answer took. Over plain
    /// TCP the buffer is taken only once the socket is readable: a request waiting seconds
    /// for its answer holds no buffer meanwhile. (Over TLS, rustls may already hold
    /// decrypted bytes the socket no longer shows, so the read starts at once.)
    async fn first_bytes(&mut self) -> Result<Vec<u8>, Failure> {
        // As hyper said it: the request went out and no answer came back.
        let unanswered = |e: &io::Error| {
            Failure::Answer(super::transport::transport_error("sending the request", e))
        };
        if let MaybeHttpsStream::Http(tcp) = self.io.inner() {
            tcp.inner().readable().await.map_err(|e| unanswered(&e))?;
        }
        let mut buf = Vec::with_capacity(self.read_hint);
        match self.io.read_buf(&mut buf).await {
            Ok(0) => Err(unanswered(&io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed before an answer",
            ))),
            Ok(_) => Ok(buf),
            Err(e) => Err(unanswered(&e)),
        }
    }

    /// Reads more of the answer into `buf`, at most `want` bytes; 0 at the connection's end.
    async fn read_more(&mut self, buf: &mut Vec<u8>, want: usize) -> io::Result<usize> {
        let want = want.max(1);
        buf.reserve(want);
        self.io.read_buf(&mut (&mut *buf).limit(want)).await
    }
}

/// Appends a whole HTTP/1.1 request to `out`: request line, `Host` (unless `headers` has
/// one), `headers`, `User-Agent` (unless set), `Content-Length` when there is a body or the
/// method is one that carries one, then the body.
pub(crate) fn encode_request(
    out: &mut Vec<u8>,
    method: &hyper::Method,
    uri: &hyper::Uri,
    headers: &HeaderMap,
    body: Option<&[u8]>,
    agent: &str,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    match uri.path_and_query() {
        Some(pq) if !pq.as_str().is_empty() => out.extend_from_slice(pq.as_str().as_bytes()),
        _ => out.push(b'/'),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !headers.contains_key(hyper::header::HOST) {
        if let Some(authority) = uri.authority() {
            let default = match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            };
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(authority.host().as_bytes());
            if let Some(port) = uri.port_u16().filter(|p| *p != default) {
                out.push(b':');
                out.extend_from_slice(port.to_string().as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
    }
    for (name, value) in headers {
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !headers.contains_key(hyper::header::USER_AGENT) {
        field(out, b"user-agent", agent.as_bytes());
    }
    let carries = matches!(
        *method,
        hyper::Method::POST | hyper::Method::PUT | hyper::Method::PATCH
    );
    if (body.is_some() || carries) && !headers.contains_key(hyper::header::CONTENT_LENGTH) {
        let len = body.map_or(0, <[u8]>::len);
        field(out, b"content-length", len.to_string().as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    if let Some(body) = body {
        out.extend_from_slice(body);
    }
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A parsed head: its length, status, fields and minor version; `None` while incomplete.
type Head = (usize, u16, HeaderMap, u8);

fn parse_head(buf: &[u8]) -> Result<Option<Head>, Failure> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut response = httparse::Response::new(&mut fields);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refused(
                None,
                &format!("the answer's head has more than {MAX_FIELDS} fields"),
            ))
        }
        Err(e) => return Err(refused(None, &format!("the answer is not HTTP/1 ({e})"))),
    };
    let status = response.code.unwrap_or(0);
    let version = response.version.unwrap_or(1);
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for f in response.headers.iter() {
        let name = HeaderName::from_bytes(f.name.as_bytes());
        let value = HeaderValue::from_bytes(f.value);
        match (name, value) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => {
                return Err(refused(
                    Some(status),
                    &format!("the answer's field {:?} is not valid", f.name),
                ))
            }
        }
    }
    Ok(Some((len, status, headers, version)))
}

/// How an answer's body is delimited.
#[derive(Debug, PartialEq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// RFC 9112 §6.3, for the answer to a request that is not HEAD or CONNECT.
fn framing(status: u16, headers: &HeaderMap) -> Result<Framing, String> {
    if status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    let codings: Vec<&[u8]> = headers
        .get_all(hyper::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
        .collect();
    if let Some(last) = codings.last() {
        // Transfer-Encoding overrides Content-Length; a body not ending in chunked lasts
        // until the connection's end.
        return Ok(if last.eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    let mut length = None;
    for v in headers.get_all(hyper::header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|b| *b == b',') {
            let part = part.trim_ascii();
            let n = std::str::from_utf8(part)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| format!("the answer's Content-Length {:?} is not a length", v))?;
            match length {
                Some(m) if m != n => {
                    return Err("the answer has two different Content-Lengths".to_owned())
                }
                _ => length = Some(n),
            }
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

/// Whether the connection stays open after this answer: HTTP/1.1 unless `close`, HTTP/1.0
/// only with `keep-alive`.
fn keep_alive(version: u8, headers: &HeaderMap) -> bool {
    let has = |token: &[u8]| {
        headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    };
    if version >= 1 {
        !has(b"close")
    } else {
        has(b"keep-alive")
    }
}

/// Where a chunked body's decoding stands; it consumes only whole pieces, so it resumes
/// where it stopped when more bytes arrive.
struct Chunked {
    /// The next byte to decode (in the whole buffer, head included).
    at: usize,
    state: ChunkState,
}

enum ChunkState {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of chunk data are next, then CRLF.
    Data(usize),
    /// The trailer section is next (after the last chunk).
    Trailers,
}

enum Chunk {
    TooLarge,
    Malformed(&'static str),
}

impl Chunked {
    fn new(at: usize) -> Chunked {
        Chunked {
            at,
            state: ChunkState::Size,
        }
    }

    /// Decodes what `buf` holds from `at` into `out`: true at the body's end.
    fn decode(&mut self, buf: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<bool, Chunk> {
        loop {
            let rest = &buf[self.at.min(buf.len())..];
            match self.state {
                ChunkState::Size => {
                    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                        if rest.len() > MAX_CHUNK_LINE {
                            return Err(Chunk::Malformed("a chunk-size line is too long"));
                        }
                        return Ok(false);
                    };
                    let line = &rest[..eol];
                    // chunk-size [; extensions]: the extensions are ignored (RFC 9112 §7.1.1).
                    let digits = line
                        .split(|b| *b == b';')
                        .next()
                        .unwrap_or_default()
                        .trim_ascii();
                    if digits.is_empty()
                        || digits.len() > 15
                        || !digits.iter().all(u8::is_ascii_hexdigit)
                    {
                        return Err(Chunk::Malformed("a chunk size is not hexadecimal"));
                    }
                    let size = digits.iter().fold(0usize, |n, d| {
                        n * 16 + (*d as char).to_digit(16).unwrap_or(0) as usize
                    });
                    self.at += eol + 2;
                    if size == 0 {
                        self.state = ChunkState::Trailers;
                    } else if out.len().saturating_add(size) > limit {
                        return Err(Chunk::TooLarge);
                    } else {
                        self.state = ChunkState::Data(size);
                    }
                }
                ChunkState::Data(size) => {
                    if rest.len() < size + 2 {
                        return Ok(false);
                    }
                    if &rest[size..size + 2] != b"\r\n" {
                        return Err(Chunk::Malformed("a chunk does not end where its size says"));
                    }
                    out.extend_from_slice(&rest[..size]);
                    self.at += size + 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    // Trailer fields (ignored), then an empty line.
                    if rest.starts_with(b"\r\n") {
                        self.at += 2;
                        return Ok(true);
                    }
                    let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
                        if rest.len() > MAX_CHUNK_LINE {
                            return Err(Chunk::Malformed("the trailer section is too long"));
                        }
                        return Ok(false);
                    };
                    self.at += end + 4;
                    return Ok(true);
                }
            }
        }
    }
}

fn refused(status: Option<u16>, why: &str) -> Failure {
    Failure::Answer(ApiError {
        status,
        ..ApiError::new(ErrorKind::Transport, why)
    })
}

/// An answer that broke off is not a usable body (a decode error, as reqwest classed it).
fn broke_off(status: Option<u16>, why: &str) -> Failure {
    Failure::Answer(ApiError {
        status,
        ..ApiError::new(ErrorKind::Decode, why)
    })
}

fn too_large(status: u16, limit: usize) -> Failure {
    Failure::Answer(ApiError {
        status: Some(status),
        ..ApiError::new(
            ErrorKind::TooLarge,
            format!("the answer is larger than {limit} bytes; not read"),
        )
    })
}

/// A read that failed after the answer began: a decode error (it broke off), or a timeout.
fn read_error(e: &io::Error) -> ApiError {
    let mut err = super::transport::transport_error("reading the answer", e);
    if err.kind == ErrorKind::Transport {
        err.kind = ErrorKind::Decode;
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(
            framing(204, &headers(&[("content-length", "5")])),
            Ok(Framing::Empty)
        );
        assert_eq!(framing(304, &HeaderMap::new()), Ok(Framing::Empty));
        assert_eq!(
            framing(200, &headers(&[("content-length", "5")])),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            framing(
                200,
                &headers(&[("content-length", "5, 5"), ("content-length", "5")])
            ),
            Ok(Framing::Length(5))
        );
        assert!(framing(
            200,
            &headers(&[("content-length", "5"), ("content-length", "6")])
        )
        .is_err());
        assert!(framing(200, &headers(&[("content-length", "-1")])).is_err());
        assert!(framing(200, &headers(&[("content-length", "+5")])).is_err());
        assert!(framing(200, &headers(&[("content-length", "")])).is_err());
        // Transfer-Encoding wins over Content-Length.
        assert_eq!(
            framing(
                200,
                &headers(&[
                    ("content-length", "5"),
                    ("transfer-encoding", "gzip, Chunked")
                ])
            ),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing(200, &headers(&[("transfer-encoding", "gzip")])),
            Ok(Framing::UntilClose)
        );
        assert_eq!(framing(200, &HeaderMap::new()), Ok(Framing::UntilClose));
    }

    #[test]
    fn keep_alive_as_each_version_defines_it() {
        assert!(keep_alive(1, &HeaderMap::new()));
        assert!(!keep_alive(
            1,
            &headers(&[("connection", "Upgrade, Close")])
        ));
        assert!(!keep_alive(0, &HeaderMap::new()));
        assert!(keep_alive(0, &headers(&[("connection", "keep-alive")])));
    }

    #[test]
    fn a_chunked_body_decodes_in_any_split() {
        let body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nx-trailer: 1\r\n\r\n";
        // Every way of cutting it in two reads decodes the same body and ends at its end.
        for cut in 0..=body.len() {
            let mut chunks = Chunked::new(0);
            let mut out = Vec::new();
            let first = chunks.decode(&body[..cut], &mut out, 1024);
            let done = match first {
                Ok(true) => true,
                Ok(false) => matches!(chunks.decode(body, &mut out, 1024), Ok(true)),
                Err(_) => panic!("cut at {cut}: refused"),
            };
            assert!(done, "cut at {cut}");
            assert_eq!(out, b"Wikipedia in\r\n\r\nchunks.", "cut at {cut}");
            assert_eq!(chunks.at, body.len(), "cut at {cut}");
        }
        let refuse = |b: &[u8], limit: usize| {
            let mut out = Vec::new();
            Chunked::new(0).decode(b, &mut out, limit).is_err()
        };
        assert!(refuse(b"zz\r\nab\r\n0\r\n\r\n", 1024), "not hex");
        assert!(
            refuse(b"2\r\nabc\r\n0\r\n\r\n", 1024),
            "longer than its size"
        );
        assert!(
            refuse(b"ffffffffffffffff\r\n", 1024),
            "a size past any limit"
        );
        assert!(refuse(b"5\r\nabcde\r\n0\r\n\r\n", 4), "past the limit");
        assert!(
            refuse(&[b'1'; MAX_CHUNK_LINE + 10], 1024),
            "an endless size line"
        );
    }

    #[test]
    fn a_request_is_written_whole() {
        let mut out = Vec::new();
        let uri: hyper::Uri = "http://127.0.0.1:8000/v3/vehicles/a/signals?pageSize=50"
            .parse()
            .unwrap();
        let h = headers(&[("authorization", "Bearer t"), ("sc-user-id", "u")]);
        encode_request(&mut out, &hyper::Method::GET, &uri, &h, None, "carpulse/1");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /v3/vehicles/a/signals?pageSize=50 HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n\
             authorization: Bearer t\r\nsc-user-id: u\r\nuser-agent: carpulse/1\r\n\r\n"
        );
        let mut out = Vec::new();
        let uri: hyper::Uri = "https://api.smartcar.com:443/v2.0/batch".parse().unwrap();
        let h = headers(&[("host", "other"), ("user-agent", "mine")]);
        encode_request(
            &mut out,
            &hyper::Method::POST,
            &uri,
            &h,
            Some(b"{}"),
            "carpulse/1",
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v2.0/batch HTTP/1.1\r\nhost: other\r\nuser-agent: mine\r\n\
             content-length: 2\r\n\r\n{}"
        );
    }

    #[test]
    fn the_host_and_target_are_what_an_origin_server_expects() {
        let line = |uri: &str| {
            let mut out = Vec::new();
            let uri: hyper::Uri = uri.parse().unwrap();
            encode_request(
                &mut out,
                &hyper::Method::GET,
                &uri,
                &HeaderMap::new(),
                None,
                "a",
            );
            let text = String::from_utf8(out).unwrap();
            text.lines().take(2).collect::<Vec<_>>().join("|")
        };
        assert_eq!(line("https://h:443"), "GET / HTTP/1.1|host: h");
        assert_eq!(line("https://h"), "GET / HTTP/1.1|host: h");
        assert_eq!(line("http://h:80/x"), "GET /x HTTP/1.1|host: h");
        assert_eq!(line("https://h:80/x?y=1"), "GET /x?y=1 HTTP/1.1|host: h:80");
        assert_eq!(line("http://[::1]:9/x"), "GET /x HTTP/1.1|host: [::1]:9");
    }
}

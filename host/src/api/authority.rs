//! Client connections whose requests carry a URL as their HTTP/2 `:authority`.
//!
//! etcd's Go client dials one member directly as `passthrough:///<endpoint>` for the
//! calls that name a member (`etcdctl endpoint status`, `endpoint hashkv`, `defrag`,
//! `--cluster`, `snapshot save`), and grpc-go then sends the endpoint as written, e.g.
//! `:authority: http://127.0.0.1:2379`. etcd's Go server accepts that; the `h2` crate
//! under tonic resets such a stream with PROTOCOL_ERROR, and its maintainers keep it
//! strict. So the client listener looks at the first request of each connection: if its
//! authority is valid (every other client), the connection is passed through untouched
//! from then on. If not, every request header block of the connection is decoded and
//! encoded again with the authority repaired (`http://host:port` → `host:port`).
//! Re-encoding from the connection's first block on keeps h2's HPACK table in step with
//! our encoder's, and ours with the client's through our decoder.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame h2 accepts unless it says otherwise (SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME: usize = 16_384;
/// Bytes read per read while frames are parsed.
const READ_CHUNK: usize = 16 * 1024;
/// A header block this large is not a gRPC request's: h2 gets the bytes as they are (and
/// refuses them), so a client cannot make us buffer without bound.
const MAX_BLOCK: usize = 1024 * 1024;

enum Mode {
    /// Before the connection preface.
    Preface,
    /// Frames before the first request's headers.
    First { dec: hpack::Decoder<'static> },
    /// Every request's headers are re-encoded.
    Repair { dec: hpack::Decoder<'static>, enc: hpack::Encoder<'static>, block: Vec<u8>, flags: u8, stream: u32 },
    /// Bytes go through untouched.
    Pass,
}

/// A client connection that repairs malformed `:authority` values (see the module docs).
pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    /// Bytes read from `inner` and not yet looked at.
    raw: Vec<u8>,
    /// Bytes ready for the reader, from `out_at` on.
    out: Vec<u8>,
    out_at: usize,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        AuthorityFix { inner, mode: Mode::Preface, raw: Vec::new(), out: Vec::new(), out_at: 0 }
    }

    /// Whether this connection's request headers were rewritten.
    #[cfg(test)]
    fn repairing(&self) -> bool {
        matches!(self.mode, Mode::Repair { .. })
    }

    /// Moves what can be decided from `raw` to `out`. False if it needs more bytes.
    fn process(&mut self) -> bool {
        match &mut self.mode {
            Mode::Pass => {
                self.out.append(&mut self.raw);
                return true;
            }
            Mode::Preface => {
                let n = self.raw.len().min(PREFACE.len());
                if self.raw[..n] != PREFACE[..n] {
                    // Not HTTP/2 with prior knowledge: none of our business.
                    self.mode = Mode::Pass;
                    return true;
                }
                if n < PREFACE.len() {
                    return false;
                }
                self.out.extend(self.raw.drain(..n));
                self.mode = Mode::First { dec: hpack::Decoder::new() };
                return true;
            }
            _ => {}
        }
        let Some((len, kind, flags, stream)) = frame_header(&self.raw) else { return false };
        if len > MAX_FRAME {
            // Larger than h2 accepts: it answers FRAME_SIZE_ERROR, we need not buffer it.
            self.mode = Mode::Pass;
            return true;
        }
        if self.raw.len() < FRAME_HEADER + len {
            return false;
        }
        let frame: Vec<u8> = self.raw.drain(..FRAME_HEADER + len).collect();
        let payload = &frame[FRAME_HEADER..];
        match &mut self.mode {
            Mode::First { dec } => {
                // Only a whole header block in one HEADERS frame is looked at (a gRPC
                // request's headers are a few hundred bytes); anything else passes.
                if kind != HEADERS {
                    self.out.extend_from_slice(&frame);
                    return true;
                }
                let fixed = (flags & END_HEADERS != 0)
                    .then(|| fragment(payload, flags))
                    .flatten()
                    .and_then(|block| dec.decode(block).ok())
                    .and_then(|headers| repaired(&headers));
                match fixed {
                    None => {
                        self.out.extend_from_slice(&frame);
                        self.mode = Mode::Pass;
                    }
                    Some(headers) => {
                        let dec = std::mem::replace(dec, hpack::Decoder::new());
                        let mut enc = hpack::Encoder::new();
                        write_headers(&mut self.out, &enc.encode(headers.iter().map(|(k, v)| (&k[..], &v[..]))), flags, stream);
                        self.mode = Mode::Repair { dec, enc, block: Vec::new(), flags: 0, stream: 0 };
                        tracing::debug!("a client sent a URL as :authority: repairing this connection's requests");
                    }
                }
            }
            Mode::Repair { dec, enc, block, flags: block_flags, stream: block_stream } => {
                let piece = match kind {
                    HEADERS => {
                        *block_flags = flags;
                        *block_stream = stream;
                        fragment(payload, flags)
                    }
                    CONTINUATION => Some(payload),
                    _ => {
                        self.out.extend_from_slice(&frame);
                        return true;
                    }
                };
                let Some(piece) = piece else {
                    // A malformed frame: let h2 see it and answer it.
                    self.out.extend_from_slice(&frame);
                    return true;
                };
                block.extend_from_slice(piece);
                if block.len() > MAX_BLOCK {
                    self.out.extend_from_slice(&frame);
                    self.mode = Mode::Pass;
                    return true;
                }
                if flags & END_HEADERS == 0 {
                    return true;
                }
                let headers = match dec.decode(block) {
                    Ok(h) => h,
                    // The client's table is lost to us now: hand h2 the bytes and let it
                    // fail the connection.
                    Err(_) => {
                        self.out.extend_from_slice(&frame);
                        self.mode = Mode::Pass;
                        return true;
                    }
                };
                block.clear();
                let headers = repaired(&headers).unwrap_or(headers);
                let encoded = enc.encode(headers.iter().map(|(k, v)| (&k[..], &v[..])));
                write_headers(&mut self.out, &encoded, *block_flags, *block_stream);
            }
            Mode::Preface | Mode::Pass => unreachable!("handled above"),
        }
        true
    }
}

/// (payload length, type, flags, stream id) of the frame at the start of `b`.
fn frame_header(b: &[u8]) -> Option<(usize, u8, u8, u32)> {
    let h = b.get(..FRAME_HEADER)?;
    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    Some((len, h[3], h[4], stream))
}

/// The header block fragment of a HEADERS frame's payload (padding and priority removed).
fn fragment(payload: &[u8], flags: u8) -> Option<&[u8]> {
    let (pad, mut p) = if flags & PADDED != 0 { (usize::from(*payload.first()?), &payload[1..]) } else { (0, payload) };
    if flags & PRIORITY != 0 {
        p = p.get(5..)?;
    }
    p.get(..p.len().checked_sub(pad)?)
}

/// `headers` with its `:authority` repaired, or `None` if it needs no repair. A URL keeps
/// its authority part; anything else unparsable is dropped (h2 accepts a request without
/// one).
fn repaired(headers: &[(Vec<u8>, Vec<u8>)]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let at = headers.iter().position(|(k, _)| k == b":authority")?;
    let value = &headers[at].1;
    if http::uri::Authority::try_from(&value[..]).is_ok() {
        return None;
    }
    let mut out = headers.to_vec();
    match http::Uri::try_from(&value[..]).ok().and_then(|u| u.authority().map(|a| a.as_str().as_bytes().to_vec())) {
        Some(a) => out[at].1 = a,
        None => {
            out.remove(at);
        }
    }
    Some(out)
}

/// A HEADERS frame (and CONTINUATION frames if needed) carrying `block`: of `flags`, only
/// END_STREAM is kept (the block is unpadded, without priority).
fn write_headers(out: &mut Vec<u8>, block: &[u8], flags: u8, stream: u32) {
    let mut chunks: Vec<&[u8]> = block.chunks(MAX_FRAME).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let (kind, mut f) = if i == 0 { (HEADERS, flags & END_STREAM) } else { (CONTINUATION, 0) };
        if i == last {
            f |= END_HEADERS;
        }
        write_frame(out, kind, f, stream, chunk);
    }
}

/// One HTTP/2 frame: the 9-byte header, then `payload`.
fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.out_at < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_at);
                buf.put_slice(&this.out[this.out_at..this.out_at + n]);
                this.out_at += n;
                if this.out_at == this.out.len() {
                    this.out.clear();
                    this.out_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if matches!(this.mode, Mode::Pass) && this.raw.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            if !this.raw.is_empty() && this.process() {
                continue;
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // End of stream: whatever is left goes to h2 as it is.
                this.out.append(&mut this.raw);
                if this.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.raw.extend_from_slice(rb.filled());
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        write_frame(&mut f, kind, flags, stream, payload);
        f
    }

    fn request(enc: &mut hpack::Encoder<'_>, authority: &str, path: &str) -> Vec<u8> {
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.as_bytes()),
            (b":authority", authority.as_bytes()),
            (b"content-type", b"application/grpc"),
        ];
        enc.encode(headers)
    }

    /// Reads everything the wrapper yields for `input` fed in pieces of `piece` bytes,
    /// and decodes the HEADERS blocks it passes on (as h2 would, one table for all).
    async fn run(input: &[u8], piece: usize) -> (Vec<u8>, Vec<Vec<(Vec<u8>, Vec<u8>)>>, bool) {
        let mut builder = pieces(input, piece);
        let mut fix = AuthorityFix::new(&mut builder);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        let repairing = fix.repairing();
        let mut dec = hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut rest = &out[PREFACE.len()..];
        let mut block = Vec::new();
        while let Some((len, kind, flags, _)) = frame_header(rest) {
            let payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
            match kind {
                HEADERS => block.extend_from_slice(fragment(payload, flags).unwrap()),
                CONTINUATION => block.extend_from_slice(payload),
                _ => {}
            }
            if matches!(kind, HEADERS | CONTINUATION) && flags & END_HEADERS != 0 {
                blocks.push(dec.decode(&block).unwrap());
                block.clear();
            }
            rest = &rest[FRAME_HEADER + len..];
        }
        assert!(rest.is_empty(), "a partial frame at the end");
        (out, blocks, repairing)
    }

    /// A reader that hands out `input` `piece` bytes at a time.
    struct Pieces {
        input: Vec<u8>,
        at: usize,
        piece: usize,
        /// End of stream after the input; else the input is followed by silence.
        eof: bool,
    }

    impl AsyncRead for Pieces {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if self.at == self.input.len() && !self.eof {
                return Poll::Pending;
            }
            let n = self.piece.min(self.input.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.input[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    fn pieces(input: &[u8], piece: usize) -> Pieces {
        Pieces { input: input.to_vec(), at: 0, piece, eof: true }
    }

    fn authority(block: &[(Vec<u8>, Vec<u8>)]) -> Option<&[u8]> {
        block.iter().find(|(k, _)| k == b":authority").map(|(_, v)| &v[..])
    }

    #[tokio::test]
    async fn a_valid_authority_passes_through_byte_for_byte() {
        let mut enc = hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        input.extend(frame(HEADERS, END_HEADERS, 1, &request(&mut enc, "127.0.0.1:2379", "/a")));
        input.extend(frame(0x0, END_STREAM, 1, b"data"));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &request(&mut enc, "127.0.0.1:2379", "/b")));
        for piece in [1, 7, 4096] {
            let (out, blocks, repairing) = run(&input, piece).await;
            assert_eq!(out, input, "piece {piece}");
            assert!(!repairing);
            assert_eq!(blocks.len(), 2);
        }
    }

    #[tokio::test]
    async fn a_url_authority_is_repaired_on_every_request() {
        let mut enc = hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        input.extend(frame(HEADERS, END_HEADERS, 1, &request(&mut enc, "http://127.0.0.1:2379", "/a")));
        input.extend(frame(0x0, END_STREAM, 1, b"data"));
        // Padded and with a priority, then split over a CONTINUATION frame.
        let block = request(&mut enc, "http://127.0.0.1:2379", "/b");
        let (head, tail) = block.split_at(block.len() / 2);
        let mut padded = vec![3u8, 0, 0, 0, 0, 16];
        padded.extend_from_slice(head);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, tail));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &request(&mut enc, "unix:/x y", "/c")));
        for piece in [1, 5, 4096] {
            let (out, blocks, repairing) = run(&input, piece).await;
            assert!(repairing);
            assert_eq!(blocks.len(), 3, "piece {piece}");
            assert_eq!(authority(&blocks[0]), Some(&b"127.0.0.1:2379"[..]));
            assert_eq!(authority(&blocks[1]), Some(&b"127.0.0.1:2379"[..]));
            assert_eq!(authority(&blocks[2]), None, "unparsable: dropped");
            let paths: Vec<_> = blocks.iter().map(|b| b.iter().find(|(k, _)| k == b":path").unwrap().1.clone()).collect();
            assert_eq!(paths, [b"/a".to_vec(), b"/b".to_vec(), b"/c".to_vec()]);
            // The DATA frame and END_STREAM flags come through.
            assert!(out.windows(4).any(|w| w == b"data"));
            let mut rest = &out[PREFACE.len()..];
            let mut ends = Vec::new();
            while let Some((len, kind, flags, stream)) = frame_header(rest) {
                if kind == HEADERS {
                    ends.push((stream, flags & END_STREAM != 0));
                }
                rest = &rest[FRAME_HEADER + len..];
            }
            assert_eq!(ends, [(1, false), (3, true), (5, true)]);
        }
    }

    #[tokio::test]
    async fn not_http2_passes_through() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let mut reader = pieces(&input, 3);
        let mut fix = AuthorityFix::new(&mut reader);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, input);
    }

    #[tokio::test]
    async fn an_oversized_frame_is_not_buffered() {
        let mut input = PREFACE.to_vec();
        let big = frame(HEADERS, END_HEADERS, 1, &vec![0; MAX_FRAME + 1]);
        input.extend_from_slice(&big[..FRAME_HEADER + 10]);
        // The stream stays open after these bytes: a wrapper waiting for the rest of the
        // frame would never hand them on.
        let mut reader = Pieces { input: input.clone(), at: 0, piece: 3, eof: false };
        let mut fix = AuthorityFix::new(&mut reader);
        let mut out = vec![0; input.len()];
        tokio::time::timeout(std::time::Duration::from_secs(5), fix.read_exact(&mut out))
            .await
            .expect("the frame's first bytes were held back")
            .unwrap();
        assert_eq!(out, input);
    }

    #[test]
    fn long_blocks_are_split_into_continuation_frames() {
        let block = vec![7u8; MAX_FRAME * 2 + 10];
        let mut out = Vec::new();
        write_headers(&mut out, &block, END_STREAM | PADDED, 9);
        let mut rest = &out[..];
        let mut frames = Vec::new();
        while let Some((len, kind, flags, stream)) = frame_header(rest) {
            frames.push((len, kind, flags, stream));
            rest = &rest[FRAME_HEADER + len..];
        }
        assert_eq!(
            frames,
            [(MAX_FRAME, HEADERS, END_STREAM, 9), (MAX_FRAME, CONTINUATION, 0, 9), (10, CONTINUATION, END_HEADERS, 9)]
        );
    }
}

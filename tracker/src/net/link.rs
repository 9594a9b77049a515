//! One connection's bytes: the TCP socket, TLS (rustls's unbuffered API) and the buffers in
//! between, which come from the worker's pool only while they hold something — an idle
//! connection, plain or TLS, holds no buffer at all.

use std::io::{self, Read, Write};

use mio::net::TcpStream;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};

/// Buffers kept for reuse per worker, of each kind; more are freed.
const POOL_KEEP: usize = 256;
/// Pooled output buffers larger than this are freed rather than kept (a buffer lent for a
/// 2-byte pong should not be one that once held a 256 KiB burst).
const POOL_MAX_OUTPUT: usize = 32 * 1024;
/// TLS records handled per read at most: a read holds at most a few hundred, so a peer that
/// gets past this is refused rather than left with records nobody comes back for.
const MAX_RECORDS_PER_READ: usize = 1 << 16;

/// Received bytes not yet consumed: `bytes[head..tail]`. `bytes` is always initialised to
/// its length, so reads go straight into it without zeroing each time.
#[derive(Debug, Default)]
pub(crate) struct InBuf {
    bytes: Vec<u8>,
    head: usize,
    tail: usize,
}

impl InBuf {
    pub(crate) fn data(&self) -> &[u8] {
        &self.bytes[self.head..self.tail]
    }

    pub(crate) fn data_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.head..self.tail]
    }

    pub(crate) fn len(&self) -> usize {
        self.tail - self.head
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.head = (self.head + n).min(self.tail);
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        }
    }

    /// Room for at least `min` more bytes at the end (moving the data to the front first).
    fn spare(&mut self, min: usize) -> &mut [u8] {
        if self.bytes.len() - self.tail < min && self.head > 0 {
            self.bytes.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        if self.bytes.len() - self.tail < min {
            self.bytes.resize(self.tail + min, 0);
        }
        &mut self.bytes[self.tail..]
    }

    fn commit(&mut self, n: usize) {
        self.tail += n;
    }

    fn extend(&mut self, data: &[u8]) {
        self.spare(data.len())[..data.len()].copy_from_slice(data);
        self.commit(data.len());
    }

    /// Bytes this buffer holds from the heap.
    pub(crate) fn capacity(&self) -> usize {
        self.bytes.capacity()
    }
}

/// A socket worker's spare buffers, so busy connections reuse memory instead of asking the
/// allocator every turn, and idle ones give theirs back.
#[derive(Debug)]
pub(crate) struct BufPool {
    read_size: usize,
    inputs: Vec<Vec<u8>>,
    outputs: Vec<Vec<u8>>,
}

impl BufPool {
    pub(crate) fn new(read_size: usize) -> Self {
        Self {
            read_size: read_size.max(512),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    fn input(&mut self) -> InBuf {
        let bytes = self.inputs.pop().unwrap_or_else(|| vec![0; self.read_size]);
        InBuf {
            bytes,
            head: 0,
            tail: 0,
        }
    }

    /// Takes back an input buffer that holds nothing (or frees it: one grown past a few
    /// reads' worth for a large frame is not kept).
    pub(crate) fn give_input(&mut self, buf: InBuf) {
        let len = buf.bytes.len();
        if (self.read_size..=4 * self.read_size).contains(&len) && self.inputs.len() < POOL_KEEP {
            self.inputs.push(buf.bytes);
        }
    }

    fn output(&mut self) -> Vec<u8> {
        self.outputs.pop().unwrap_or_default()
    }

    /// Heap bytes kept for reuse.
    pub(crate) fn pooled(&self) -> usize {
        self.inputs.iter().map(Vec::capacity).sum::<usize>()
            + self.outputs.iter().map(Vec::capacity).sum::<usize>()
    }

    fn give_output(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() <= POOL_MAX_OUTPUT && self.outputs.len() < POOL_KEEP {
            buf.clear();
            self.outputs.push(buf);
        }
    }
}

/// Why the link failed.
#[derive(Debug)]
pub(crate) enum LinkError {
    Io(io::Error),
    /// The TLS layer refused the peer's bytes (handshake or record).
    Tls(rustls::Error),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Io(e) => write!(f, "{e}"),
            LinkError::Tls(e) => write!(f, "TLS: {e}"),
        }
    }
}

impl From<io::Error> for LinkError {
    fn from(e: io::Error) -> Self {
        LinkError::Io(e)
    }
}

/// What one read brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Received {
    /// Bytes arrived (plaintext may still be none, e.g. TLS handshake records); `drained`:
    /// the socket had no more (a short read), so reading again now would block.
    Data { drained: bool },
    /// Nothing to read now.
    WouldBlock,
    /// The peer closed its side.
    Closed,
}

/// A client connection's transport.
#[derive(Debug)]
pub(crate) struct Link {
    tcp: TcpStream,
    tls: Option<Box<Tls>>,
    /// The TLS handshake finished in the last receive (taken by the loop, for its counter).
    pub(crate) tls_established: bool,
    /// The last flush left bytes the socket would not take: more writes wait for its
    /// writable event instead of trying (and failing) again per frame.
    blocked: bool,
    /// Plaintext received and not yet consumed (a partial frame or request head).
    pub(crate) input: InBuf,
    /// Plaintext queued to send, from `written` on.
    output: Vec<u8>,
    written: usize,
}

struct Tls {
    conn: UnbufferedServerConnection,
    /// Ciphertext received, not yet a whole record.
    incoming: InBuf,
    /// Ciphertext to send, from `written` on.
    outgoing: Vec<u8>,
    written: usize,
}

impl Link {
    pub(crate) fn plain(tcp: TcpStream) -> Self {
        Self {
            tcp,
            tls: None,
            tls_established: false,
            blocked: false,
            input: InBuf::default(),
            output: Vec::new(),
            written: 0,
        }
    }

    pub(crate) fn tls(tcp: TcpStream, conn: UnbufferedServerConnection) -> Self {
        Self {
            tls: Some(Box::new(Tls {
                conn,
                incoming: InBuf::default(),
                outgoing: Vec::new(),
                written: 0,
            })),
            ..Self::plain(tcp)
        }
    }

    /// True while a TLS session has not finished its handshake.
    pub(crate) fn tls_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.conn.is_handshaking())
    }

    /// Takes the unconsumed input out (so frames can be handled while the connection is
    /// borrowed elsewhere); give it back with [`Link::restore_input`].
    pub(crate) fn take_input(&mut self) -> InBuf {
        std::mem::take(&mut self.input)
    }

    /// Puts input back, or returns an empty buffer to the pool.
    pub(crate) fn restore_input(&mut self, input: InBuf, pool: &mut BufPool) {
        if input.is_empty() {
            pool.give_input(input);
        } else {
            self.input = input;
        }
    }

    /// Reads once from the socket into `input` (through TLS if any).
    pub(crate) fn receive(
        &mut self,
        input: &mut InBuf,
        pool: &mut BufPool,
    ) -> Result<Received, LinkError> {
        if input.bytes.is_empty() {
            *input = pool.input();
        }
        let Some(tls) = &mut self.tls else {
            return Ok(read_once(&mut self.tcp, input, pool.read_size)?);
        };
        if tls.incoming.bytes.is_empty() {
            tls.incoming = pool.input();
        }
        let received = read_once(&mut self.tcp, &mut tls.incoming, pool.read_size)?;
        let handshaking = tls.conn.is_handshaking();
        let closed = tls.process(input, pool);
        self.tls_established = handshaking && !tls.conn.is_handshaking();
        if tls.incoming.is_empty() {
            pool.give_input(std::mem::take(&mut tls.incoming));
        }
        match closed? {
            true => Ok(Received::Closed),
            false => Ok(received),
        }
    }

    /// Bytes waiting to be written (plaintext and ciphertext).
    pub(crate) fn pending(&self) -> usize {
        self.output.len() - self.written
            + self
                .tls
                .as_ref()
                .map_or(0, |t| t.outgoing.len() - t.written)
    }

    /// Plaintext queued since the last flush handed it to the socket (or to TLS).
    pub(crate) fn unflushed(&self) -> usize {
        self.output.len() - self.written
    }

    /// The socket refused part of the last flush.
    pub(crate) fn blocked(&self) -> bool {
        self.blocked
    }

    /// The buffer frames are queued in.
    pub(crate) fn output(&mut self, pool: &mut BufPool) -> &mut Vec<u8> {
        if self.output.capacity() == 0 {
            self.output = pool.output();
        }
        &mut self.output
    }

    /// Writes what is queued (encrypting it first under TLS) until done or the socket would
    /// block; what is left waits for the next writable event.
    pub(crate) fn flush(&mut self, pool: &mut BufPool) -> Result<(), LinkError> {
        match &mut self.tls {
            None => {
                write_out(&mut self.tcp, &mut self.output, &mut self.written)?;
                if self.written == self.output.len() && self.output.capacity() > 0 {
                    pool.give_output(std::mem::take(&mut self.output));
                    self.written = 0;
                }
            }
            Some(tls) => {
                if self.written < self.output.len() && !tls.conn.is_handshaking() {
                    tls.encrypt(&self.output[self.written..], pool)?;
                    self.written = self.output.len();
                }
                if self.written == self.output.len() && self.output.capacity() > 0 {
                    pool.give_output(std::mem::take(&mut self.output));
                    self.written = 0;
                }
                write_out(&mut self.tcp, &mut tls.outgoing, &mut tls.written)?;
                if tls.written == tls.outgoing.len() && tls.outgoing.capacity() > 0 {
                    pool.give_output(std::mem::take(&mut tls.outgoing));
                    tls.written = 0;
                }
            }
        }
        self.blocked = self.pending() > 0;
        Ok(())
    }

    /// Returns every buffer to the pool (the connection is closing).
    pub(crate) fn release(self, pool: &mut BufPool) {
        pool.give_input(self.input);
        pool.give_output(self.output);
        if let Some(tls) = self.tls {
            pool.give_input(tls.incoming);
            pool.give_output(tls.outgoing);
        }
    }

    /// Heap bytes this link's buffers hold now (0 for an idle connection).
    pub(crate) fn held(&self) -> usize {
        self.input.capacity()
            + self.output.capacity()
            + self
                .tls
                .as_ref()
                .map_or(0, |t| t.incoming.capacity() + t.outgoing.capacity())
    }
}

/// One read from the socket into `buf` (at least `want` bytes of room).
fn read_once(tcp: &mut TcpStream, buf: &mut InBuf, want: usize) -> io::Result<Received> {
    let spare = buf.spare(want);
    let room = spare.len();
    match tcp.read(spare) {
        Ok(0) => Ok(Received::Closed),
        Ok(n) => {
            buf.commit(n);
            Ok(Received::Data { drained: n < room })
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Received::WouldBlock),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Received::Data { drained: false }),
        Err(e) => Err(e),
    }
}

/// Writes `buf[*written..]` until done or the socket would block; resets both once done.
fn write_out(tcp: &mut TcpStream, buf: &mut Vec<u8>, written: &mut usize) -> io::Result<()> {
    while *written < buf.len() {
        match tcp.write(&buf[*written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => *written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.clear();
    *written = 0;
    Ok(())
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("handshaking", &self.conn.is_handshaking())
            .field("incoming", &self.incoming.len())
            .field("outgoing", &(self.outgoing.len() - self.written))
            .finish()
    }
}

impl Tls {
    /// Feeds the received ciphertext to rustls: application data goes to `plain`, handshake
    /// records to `outgoing`. True once the peer has closed (close_notify).
    fn process(&mut self, plain: &mut InBuf, pool: &mut BufPool) -> Result<bool, LinkError> {
        let mut peer_closed = false;
        // Each pass consumes bytes or changes state, until rustls needs more bytes.
        for _ in 0..MAX_RECORDS_PER_READ {
            let status = self.conn.process_tls_records(self.incoming.data_mut());
            let mut discard = status.discard;
            let state = match status.state {
                Ok(state) => state,
                Err(e) => {
                    self.incoming.consume(discard);
                    return Err(LinkError::Tls(e));
                }
            };
            let mut done = false;
            match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(LinkError::Tls)?;
                        discard += record.discard;
                        plain.extend(record.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    if self.outgoing.capacity() == 0 {
                        self.outgoing = pool.output();
                    }
                    encode_into(&mut self.outgoing, 0, |buf| encode.encode(buf))?;
                }
                // The records stay in `outgoing` and go out, in order, at the next flush.
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::PeerClosed => peer_closed = true,
                ConnectionState::Closed => {
                    peer_closed = true;
                    done = true;
                }
                // Nothing more until the peer sends more (handshake) or a partial record
                // completes (traffic).
                ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_) => done = true,
                // Early data is not enabled; anything else rustls adds later is refused.
                _ => {
                    return Err(LinkError::Io(io::Error::other(
                        "unexpected TLS connection state",
                    )));
                }
            }
            self.incoming.consume(discard);
            if done {
                return Ok(peer_closed);
            }
        }
        Err(LinkError::Io(io::Error::other(
            "too many TLS records in one read",
        )))
    }

    /// Encrypts `data` into `outgoing` (records of at most 16 KiB each), after any handshake
    /// records rustls has queued (session tickets, key updates).
    fn encrypt(&mut self, data: &[u8], pool: &mut BufPool) -> Result<(), LinkError> {
        if self.outgoing.capacity() == 0 {
            self.outgoing = pool.output();
        }
        for _ in 0..64 {
            // The buffered partial record goes in, not an empty slice: rustls resumes a
            // half-received handshake message from where its deframer left the buffer (an
            // empty one would be sliced out of range).
            let status = self.conn.process_tls_records(self.incoming.data_mut());
            let discard = status.discard;
            let state = match status.state {
                Ok(state) => state,
                Err(e) => return Err(LinkError::Tls(e)),
            };
            match state {
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut self.outgoing, 0, |buf| encode.encode(buf))?;
                }
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::WriteTraffic(mut traffic) => {
                    // Room for every 16 KiB record's header, tag and padding, so one call
                    // encrypts (rustls asks for more only if this guess is short).
                    let room = data.len() + (data.len() / 16384 + 1) * 64;
                    let done =
                        encode_into(&mut self.outgoing, room, |buf| traffic.encrypt(data, buf));
                    self.incoming.consume(discard);
                    return done;
                }
                _ => break,
            }
            self.incoming.consume(discard);
        }
        Err(LinkError::Io(io::Error::other(
            "TLS not ready for application data",
        )))
    }
}

/// The sizes rustls asks for when a buffer is too small.
trait RequiredSize {
    fn required_size(&self) -> Option<usize>;
}

impl RequiredSize for EncodeError {
    fn required_size(&self) -> Option<usize> {
        match self {
            EncodeError::InsufficientSize(s) => Some(s.required_size),
            _ => None,
        }
    }
}

impl RequiredSize for EncryptError {
    fn required_size(&self) -> Option<usize> {
        match self {
            EncryptError::InsufficientSize(s) => Some(s.required_size),
            _ => None,
        }
    }
}

/// Appends what `write` produces to `out`: first given `room` bytes, and if rustls says
/// that is too small (it leaves the buffer untouched then), exactly the size it needs.
fn encode_into<E: RequiredSize + std::fmt::Display>(
    out: &mut Vec<u8>,
    room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
) -> Result<(), LinkError> {
    let at = out.len();
    out.resize(at + room, 0);
    let need = match write(&mut out[at..]) {
        Ok(n) => {
            out.truncate(at + n);
            return Ok(());
        }
        Err(e) => {
            out.truncate(at);
            e.required_size()
                .ok_or_else(|| LinkError::Io(io::Error::other(e.to_string())))?
        }
    };
    out.resize(at + need, 0);
    match write(&mut out[at..]) {
        Ok(n) => {
            out.truncate(at + n);
            Ok(())
        }
        Err(e) => {
            out.truncate(at);
            Err(LinkError::Io(io::Error::other(e.to_string())))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream as StdTcp};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::net::ws::{self, Assembler, Frame};

    fn pair() -> (StdTcp, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = StdTcp::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        server.set_nonblocking(true).expect("nonblocking");
        (client, TcpStream::from_std(server))
    }

    fn masked_text(payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![0x81, 0x80 | payload.len() as u8];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Receives until a whole frame is there (or 5 s pass), as the loop does.
    fn next_text(link: &mut Link, pool: &mut BufPool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut ws = Assembler::default();
        let limits = ws::Limits {
            max_frame: 1 << 16,
            max_message: 1 << 16,
            binary: false,
        };
        while Instant::now() < deadline {
            let mut input = link.take_input();
            let got = match ws.next(input.data_mut(), limits).expect("valid") {
                Some((used, Frame::Text(r))) => {
                    let text = input.data()[r].to_vec();
                    input.consume(used);
                    Some(text)
                }
                _ => None,
            };
            if got.is_none() {
                link.receive(&mut input, pool).expect("receive");
            }
            link.restore_input(input, pool);
            if got.is_some() {
                return got;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    #[test]
    fn a_plain_link_holds_a_buffer_only_while_a_frame_is_partial() {
        let (mut client, server) = pair();
        let mut pool = BufPool::new(4096);
        let mut link = Link::plain(server);
        let frame = masked_text(b"hello tracker");
        client.write_all(&frame[..5]).expect("write");
        std::thread::sleep(Duration::from_millis(20));
        let mut input = link.take_input();
        assert!(matches!(
            link.receive(&mut input, &mut pool),
            Ok(Received::Data { drained: true })
        ));
        link.restore_input(input, &mut pool);
        assert!(link.held() > 0, "five bytes of a frame are kept");
        client.write_all(&frame[5..]).expect("write");
        assert_eq!(
            next_text(&mut link, &mut pool).as_deref(),
            Some(&b"hello tracker"[..])
        );
        assert_eq!(link.held(), 0, "an idle link holds no buffer");
        ws::write_frame(link.output(&mut pool), ws::OP_TEXT, b"reply");
        link.flush(&mut pool).expect("flush");
        assert_eq!(link.held(), 0, "written output goes back to the pool");
        let mut reply = [0u8; 7];
        client.read_exact(&mut reply).expect("read");
        assert_eq!(&reply, b"\x81\x05reply");
    }

    #[test]
    fn a_tls_link_holds_no_buffer_once_idle() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls_pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
            .expect("key");
        let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).expect("root");
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (client, server) = pair();
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let tls_client =
            rustls::ClientConnection::new(Arc::new(client_config), name).expect("client");
        // The client runs blocking on its own thread: handshake, one frame, read the reply.
        let frame = masked_text(b"over tls");
        let client_thread = std::thread::spawn(move || {
            let mut stream = rustls::StreamOwned::new(tls_client, client);
            stream.write_all(&frame).expect("client write");
            let mut reply = [0u8; 7];
            stream.read_exact(&mut reply).expect("client read");
            reply
        });
        let mut pool = BufPool::new(4096);
        let conn = UnbufferedServerConnection::new(Arc::new(server_config)).expect("server");
        let mut link = Link::tls(server, conn);
        // Handshake records go out at each flush, as the loop does after every read.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut text = None;
        while text.is_none() && Instant::now() < deadline {
            let mut input = link.take_input();
            let _ = link.receive(&mut input, &mut pool).expect("receive");
            let mut ws = Assembler::default();
            let limits = ws::Limits {
                max_frame: 1 << 16,
                max_message: 1 << 16,
                binary: false,
            };
            if let Ok(Some((used, Frame::Text(r)))) = ws.next(input.data_mut(), limits) {
                text = Some(input.data()[r].to_vec());
                input.consume(used);
            }
            link.restore_input(input, &mut pool);
            link.flush(&mut pool).expect("flush");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(text.as_deref(), Some(&b"over tls"[..]));
        assert!(!link.tls_handshaking());
        ws::write_frame(link.output(&mut pool), ws::OP_TEXT, b"reply");
        link.flush(&mut pool).expect("flush");
        assert_eq!(&client_thread.join().expect("client"), b"\x81\x05reply");
        assert_eq!(link.held(), 0, "an idle TLS link holds no buffer");
    }
}

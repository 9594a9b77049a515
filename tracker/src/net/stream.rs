//! A client's byte stream (plain TCP or TLS over TCP) and the capture of forwarding headers
//! from a trusted proxy's upgrade request.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::rc::Rc;

use mio::net::TcpStream;
use tungstenite::handshake::server::{Callback, ErrorResponse as HttpError, Request, Response};

/// A client byte stream: plain TCP or TLS over TCP.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Stream {
    /// True while a TLS session has not finished its handshake.
    pub(super) fn tls_handshaking(&self) -> bool {
        matches!(self, Stream::Tls(s) if s.conn.is_handshaking())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// The forwarding headers (`X-Forwarded-For`, `X-Real-IP`) of a request from a trusted
/// proxy, kept for after the handshake.
pub(super) type Forwarded = Rc<RefCell<Option<(Option<String>, Option<String>)>>>;

/// Captures the forwarding headers, only for connections from trusted proxies.
pub(super) struct ForwardedHeaders(pub(super) Option<Forwarded>);

impl Callback for ForwardedHeaders {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, HttpError> {
        if let Some(slot) = self.0 {
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            *slot.borrow_mut() = Some((header("x-forwarded-for"), header("x-real-ip")));
        }
        Ok(response)
    }
}

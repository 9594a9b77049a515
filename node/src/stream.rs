//! A data channel as a byte stream: [`PeerStream`] implements `AsyncRead` and `AsyncWrite`,
//! so a channel can be piped like a socket (`tokio::io::copy`). Writes are cut into
//! messages of at most `max_message_size`; a write waits while the channel's send buffer is
//! full, so back-pressure reaches the writer. Shutdown sends an end-of-stream frame, which
//! the reader sees as EOF.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tidepool_protocol::PeerId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::link::Link;
use crate::node::Inner;
use crate::wire::{self, flags};
use crate::{Channel, NodeError};

/// What the channel pump hands a stream.
#[derive(Debug)]
pub(crate) enum Item {
    Data(Bytes),
    /// The peer shut its writing half down (with a last payload, possibly empty).
    End(Bytes),
}

type SendFuture = Pin<Box<dyn Future<Output = Result<(), NodeError>> + Send>>;

/// A byte stream to one peer over one channel; see the module docs.
pub struct PeerStream {
    inner: Arc<Inner>,
    link: Arc<Link>,
    peer: PeerId,
    channel: Channel,
    rx: mpsc::Receiver<Item>,
    current: Bytes,
    eof: bool,
    sending: Option<SendFuture>,
    shut: bool,
}

impl std::fmt::Debug for PeerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerStream")
            .field("peer", &self.peer)
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

pub(crate) fn open(
    inner: &Arc<Inner>,
    link: Arc<Link>,
    peer: PeerId,
    channel: Channel,
) -> Result<PeerStream, NodeError> {
    // Sixteen messages of read-ahead: enough to keep the pipe full, small enough that a slow
    // reader stops the pump and, through the SCTP window, the sender.
    let (tx, rx) = mpsc::channel(16);
    let mut streams = inner
        .streams
        .lock()
        .map_err(|_| NodeError::WebRtc("stream table poisoned".into()))?;
    if streams
        .get(&(peer, channel))
        .is_some_and(|s| !s.is_closed())
    {
        return Err(NodeError::StreamBusy);
    }
    streams.insert((peer, channel), tx);
    Ok(PeerStream {
        inner: inner.clone(),
        link,
        peer,
        channel,
        rx,
        current: Bytes::new(),
        eof: false,
        sending: None,
        shut: false,
    })
}

impl Drop for PeerStream {
    fn drop(&mut self) {
        if let Ok(mut s) = self.inner.streams.lock() {
            s.remove(&(self.peer, self.channel));
        }
    }
}

fn io_err(e: NodeError) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, e.to_string())
}

impl PeerStream {
    fn poll_sending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(f) = self.sending.as_mut() {
            let r = ready!(f.as_mut().poll(cx));
            self.sending = None;
            r.map_err(io_err)?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(&mut self, flags: u8, payload: &[u8]) {
        let link = self.link.clone();
        let channel = self.channel;
        let frame = wire::data(flags, 0, payload);
        self.sending = Some(Box::pin(
            async move { link.send_frame(channel, frame).await },
        ));
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.current.is_empty() {
                let n = self.current.len().min(buf.remaining());
                buf.put_slice(&self.current[..n]);
                self.current.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.rx.poll_recv(cx)) {
                Some(Item::Data(b)) => self.current = b,
                Some(Item::End(b)) => {
                    self.current = b;
                    self.eof = true;
                }
                // The connection closed without an end-of-stream frame.
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer connection closed before the end of the stream",
                    )));
                }
            }
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stream already shut down",
            )));
        }
        // One message in flight at a time: the next write waits for the previous send,
        // which itself waits for room in the channel's send buffer.
        ready!(self.poll_sending(cx))?;
        let n = buf.len().min(self.inner.config.max_message_size);
        self.start_send(0, &buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_sending(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_sending(cx))?;
        if !self.shut {
            self.shut = true;
            self.start_send(flags::END_OF_STREAM, &[]);
            ready!(self.poll_sending(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

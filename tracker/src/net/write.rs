//! The write path: frames are queued in the connection's WebSocket buffer and written once
//! per loop turn (one syscall for everything a turn produced for that connection), and a
//! reader whose queue passes `max_outgoing_queue` is closed as a slow reader.

use std::io;

use tungstenite::{Message, Utf8Bytes};

use super::EventLoop;
use crate::metrics::{CloseReason, OutKind, bump};

impl EventLoop {
    /// Queues a text frame for the end of the turn. False if the connection is gone or was
    /// closed for reading too slowly.
    pub(super) fn queue(
        &mut self,
        slot: usize,
        kind: OutKind,
        frame: impl Into<Utf8Bytes>,
    ) -> bool {
        let frame: Utf8Bytes = frame.into();
        let len = frame.len() as u64;
        let Some(ws) = self.conns.get_mut(slot).and_then(|c| c.ws()) else {
            return false;
        };
        // Counted once queued; a frame refused here closes its connection, counted there.
        match ws.write(Message::Text(frame)) {
            Ok(()) => {}
            // Kept in the buffer; the socket's next writable event flushes it.
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(tungstenite::Error::WriteBufferFull(_)) => {
                self.close(slot, CloseReason::SlowReader);
                return false;
            }
            Err(e) => {
                tracing::debug!("write failed: {e}");
                self.close(slot, CloseReason::Io);
                return false;
            }
        }
        let m = &self.worker.shared.metrics.sockets[self.worker.index as usize];
        bump(&m.messages_out[kind as usize], 1);
        bump(&m.bytes_out, len);
        self.mark_dirty(slot);
        true
    }

    /// Lists a connection for the end-of-turn flush (once).
    pub(super) fn mark_dirty(&mut self, slot: usize) {
        if let Some(conn) = self.conns.get_mut(slot)
            && !conn.dirty
        {
            conn.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// Writes out what every dirty connection has queued.
    pub(super) fn flush_dirty(&mut self) {
        for slot in std::mem::take(&mut self.dirty) {
            if let Some(conn) = self.conns.get_mut(slot) {
                conn.dirty = false;
            }
            self.flush(slot);
        }
    }

    fn flush(&mut self, slot: usize) {
        let Some(ws) = self.conns.get_mut(slot).and_then(|c| c.ws()) else {
            return;
        };
        match ws.flush() {
            Ok(()) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(tungstenite::Error::ConnectionClosed) => self.close(slot, CloseReason::Peer),
            Err(e) => {
                tracing::debug!("flush failed: {e}");
                self.close(slot, CloseReason::Io);
            }
        }
    }
}

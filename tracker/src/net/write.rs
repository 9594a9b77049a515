//! The write path: frames are encoded straight into the connection's output buffer and
//! written once per loop turn (one syscall for everything a turn produced for that
//! connection), and a reader whose queue passes `max_outgoing_queue` is closed as a slow
//! reader.

use super::{EventLoop, WRITE_BATCH_BYTES, ws};
use crate::metrics::{CloseReason, OutKind, bump};

impl EventLoop {
    /// Queues a text frame (our own JSON, so UTF-8) for the end of the turn. False if the connection is gone or was
    /// closed for reading too slowly.
    pub(super) fn queue(&mut self, slot: usize, kind: OutKind, frame: &[u8]) -> bool {
        if !self.queue_frame(slot, ws::OP_TEXT, frame) {
            return false;
        }
        // Counted once queued; a frame refused here closes its connection, counted there.
        let m = &self.worker.shared.metrics.sockets[self.worker.index as usize];
        bump(&m.messages_out[kind as usize], 1);
        bump(&m.bytes_out, frame.len() as u64);
        true
    }

    /// Queues a frame of any kind on an open connection.
    pub(super) fn queue_frame(&mut self, slot: usize, opcode: u8, payload: &[u8]) -> bool {
        let limit = self.worker.shared.config.network.max_outgoing_queue;
        let Some(conn) = self.conns.get_mut(slot) else {
            return false;
        };
        if !conn.open {
            return false;
        }
        if conn.link.pending() + payload.len() > limit && conn.link.blocked() {
            // The socket refused the last write, maybe a turn ago: it may have drained since
            // (its writable event is handled after this turn's deliveries).
            let _ = conn.link.flush(&mut self.pool);
        }
        if conn.link.pending() + payload.len() > limit {
            self.close(slot, CloseReason::SlowReader);
            return false;
        }
        ws::write_frame(conn.link.output(&mut self.pool), opcode, payload);
        if conn.link.unflushed() >= WRITE_BATCH_BYTES && !conn.link.blocked() {
            // A large turn for one connection goes out as it grows, not all at the end (a
            // socket that refused the last write is retried at its writable event instead).
            if let Err(e) = conn.link.flush(&mut self.pool) {
                tracing::debug!("write failed: {e}");
                self.close(slot, CloseReason::Io);
                return false;
            }
        }
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
            let Some(conn) = self.conns.get_mut(slot) else {
                continue;
            };
            conn.dirty = false;
            if let Err(e) = conn.link.flush(&mut self.pool) {
                tracing::debug!("flush failed: {e}");
                self.close(slot, CloseReason::Io);
            }
        }
    }
}

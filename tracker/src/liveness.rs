//! When each connection was last heard from, published by its socket worker and read by the
//! swarm workers when another connection claims a peer id (takeover after silence).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::swarm::{ConnId, Liveness};

/// One connection slot: which connection holds it, and when it was last heard from.
#[derive(Debug, Default)]
struct Slot {
    /// `ConnId::serial` of the connection in this slot; 0 when the slot is free.
    serial: AtomicU64,
    /// Milliseconds after `epoch` of the last frame or pong.
    heard_ms: AtomicU64,
}

/// Per socket worker, one slot per possible connection (`max_connections_per_worker`):
/// 16 bytes each, written only by the owning worker.
#[derive(Debug)]
pub(crate) struct LivenessTable {
    epoch: Instant,
    workers: Vec<Box<[Slot]>>,
}

impl LivenessTable {
    pub(crate) fn new(socket_workers: usize, slots_per_worker: usize) -> Self {
        Self {
            epoch: Instant::now(),
            workers: (0..socket_workers)
                .map(|_| (0..slots_per_worker).map(|_| Slot::default()).collect())
                .collect(),
        }
    }

    fn slot(&self, id: ConnId) -> Option<&Slot> {
        self.workers.get(id.worker as usize)?.get(id.slot as usize)
    }

    fn millis(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// A connection took its slot.
    pub(crate) fn opened(&self, id: ConnId, now: Instant) {
        if let Some(slot) = self.slot(id) {
            slot.heard_ms.store(self.millis(now), Ordering::Relaxed);
            slot.serial.store(id.serial, Ordering::Release);
        }
    }

    /// A frame or pong arrived.
    pub(crate) fn heard(&self, id: ConnId, now: Instant) {
        if let Some(slot) = self.slot(id) {
            slot.heard_ms.store(self.millis(now), Ordering::Relaxed);
        }
    }

    /// The connection closed.
    pub(crate) fn closed(&self, id: ConnId) {
        if let Some(slot) = self.slot(id) {
            slot.serial.store(0, Ordering::Release);
        }
    }
}

impl Liveness for LivenessTable {
    fn quiet_for(&self, id: ConnId, now: Instant) -> Duration {
        let Some(slot) = self.slot(id) else {
            return Duration::MAX;
        };
        if slot.serial.load(Ordering::Acquire) != id.serial {
            return Duration::MAX;
        }
        let heard = slot.heard_ms.load(Ordering::Relaxed);
        // The slot may have changed hands while reading; then the owner is gone.
        if slot.serial.load(Ordering::Acquire) != id.serial {
            return Duration::MAX;
        }
        Duration::from_millis(self.millis(now).saturating_sub(heard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_time_follows_frames_and_a_closed_or_replaced_owner_is_gone() {
        let t = LivenessTable::new(2, 4);
        let t0 = Instant::now();
        let a = ConnId {
            instance: 0,
            worker: 1,
            slot: 3,
            serial: 7,
        };
        t.opened(a, t0);
        assert_eq!(
            t.quiet_for(a, t0 + Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        t.heard(a, t0 + Duration::from_secs(4));
        assert_eq!(
            t.quiet_for(a, t0 + Duration::from_secs(5)),
            Duration::from_secs(1)
        );
        t.closed(a);
        assert_eq!(t.quiet_for(a, t0), Duration::MAX);
        let b = ConnId { serial: 8, ..a };
        t.opened(b, t0);
        assert_eq!(t.quiet_for(a, t0), Duration::MAX, "slot reused by another");
        assert_eq!(t.quiet_for(b, t0), Duration::ZERO);
        let out_of_range = ConnId { slot: 99, ..a };
        assert_eq!(t.quiet_for(out_of_range, t0), Duration::MAX);
    }
}

//! Channels between workers bounded twice: by message count and by the bytes the messages
//! hold, so a burst of large announces cannot queue a gigabyte in one inbox.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};

/// A message that can say how many bytes it holds.
pub(crate) trait Weigh {
    /// Bytes held, including what the message owns on the heap.
    fn weight(&self) -> usize;
}

/// The sending half. Cloned for every producer; all share one byte budget.
#[derive(Debug)]
pub(crate) struct Tx<T> {
    inner: Sender<T>,
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl<T> Clone for Tx<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            bytes: self.bytes.clone(),
            max_bytes: self.max_bytes,
        }
    }
}

/// The receiving half.
#[derive(Debug)]
pub(crate) struct Rx<T> {
    inner: Receiver<T>,
    bytes: Arc<AtomicUsize>,
}

/// A channel holding at most `capacity` messages and `max_bytes` bytes of them. A single
/// message heavier than `max_bytes` is always refused: the limit is a promise.
pub(crate) fn bounded<T: Weigh>(capacity: usize, max_bytes: usize) -> (Tx<T>, Rx<T>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        Tx {
            inner: tx,
            bytes: bytes.clone(),
            max_bytes,
        },
        Rx { inner: rx, bytes },
    )
}

impl<T: Weigh> Tx<T> {
    /// Sends without blocking; `Full` when either bound would be passed.
    pub(crate) fn try_send(&self, msg: T) -> Result<(), TrySendError<T>> {
        let w = msg.weight();
        let before = self.bytes.fetch_add(w, Ordering::Relaxed);
        if before.saturating_add(w) > self.max_bytes {
            self.bytes.fetch_sub(w, Ordering::Relaxed);
            return Err(TrySendError::Full(msg));
        }
        self.inner.try_send(msg).inspect_err(|_| {
            self.bytes.fetch_sub(w, Ordering::Relaxed);
        })
    }
}

impl<T: Weigh> Rx<T> {
    /// The next message, if one is waiting.
    pub(crate) fn try_recv(&self) -> Result<T, TryRecvError> {
        let msg = self.inner.try_recv()?;
        self.bytes.fetch_sub(msg.weight(), Ordering::Relaxed);
        Ok(msg)
    }

    /// The next message, waiting at most `timeout` for one.
    pub(crate) fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        let msg = self.inner.recv_timeout(timeout)?;
        self.bytes.fetch_sub(msg.weight(), Ordering::Relaxed);
        Ok(msg)
    }

    /// True when no message waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// Messages waiting.
    pub(crate) fn len(&self) -> usize {
        self.inner.len()
    }

    /// Bytes waiting.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Weigh for (crate::swarm::ConnId, crate::swarm::Request) {
    fn weight(&self) -> usize {
        self.1.weight()
    }
}

impl Weigh for (crate::swarm::ConnId, crate::swarm::Output) {
    fn weight(&self) -> usize {
        self.1.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Blob(usize);
    impl Weigh for Blob {
        fn weight(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn refuses_past_either_bound_and_frees_bytes_on_receive() {
        let (tx, rx) = bounded::<Blob>(3, 100);
        assert!(tx.try_send(Blob(60)).is_ok());
        assert!(matches!(tx.try_send(Blob(50)), Err(TrySendError::Full(_))));
        assert_eq!(rx.bytes(), 60, "a refused message holds nothing");
        assert!(tx.try_send(Blob(40)).is_ok());
        assert!(matches!(tx.try_send(Blob(1)), Err(TrySendError::Full(_))));
        assert_eq!(rx.try_recv().map(|b| b.0).ok(), Some(60));
        assert_eq!(rx.bytes(), 40);
        assert!(tx.try_send(Blob(10)).is_ok());
        assert!(tx.try_send(Blob(10)).is_ok());
        assert!(
            matches!(tx.try_send(Blob(1)), Err(TrySendError::Full(_))),
            "count bound"
        );
        assert!(
            matches!(
                bounded::<Blob>(3, 100).0.try_send(Blob(101)),
                Err(TrySendError::Full(_))
            ),
            "heavier than the whole budget"
        );
    }
}

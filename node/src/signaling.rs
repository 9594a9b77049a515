//! The tracker connection: one WebSocket, reconnected with exponential backoff when it drops,
//! carrying announces out and offers, answers and announce responses in. Peer connections do
//! not depend on it: they stay up while it reconnects.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tidepool_protocol::tracker::{Decoder, ServerMessage};
use tidepool_protocol::{OfferId, PeerId};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// What the tracker connection reports to the node.
#[derive(Debug)]
pub(crate) enum TrackerIn {
    /// Connected (again); anything queued before was dropped.
    Up,
    /// The connection failed or dropped; a reconnect follows after the backoff.
    Down(String),
    /// The reply to an announce; `peers` counts the swarm, us included.
    AnnounceResponse { interval: u64, peers: u64 },
    /// Another peer's offer.
    Offer {
        from: PeerId,
        offer_id: OfferId,
        sdp: String,
    },
    /// An answer to one of our offers.
    Answer {
        from: PeerId,
        offer_id: OfferId,
        sdp: String,
    },
    /// A `failure reason` from the tracker.
    Failure(String),
}

/// Runs until `out` is closed (the node is leaving). Frames sent while disconnected are
/// dropped: offers and answers are stale by the time a reconnect succeeds.
pub(crate) async fn run(
    url: String,
    reconnect_min: Duration,
    reconnect_max: Duration,
    mut out: mpsc::UnboundedReceiver<Vec<u8>>,
    tx: mpsc::UnboundedSender<TrackerIn>,
) {
    let mut backoff = reconnect_min;
    let mut decoder = Decoder::default();
    loop {
        let connect = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await;
        let mut ws = match connect {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => {
                let _ = tx.send(TrackerIn::Down(format!("connecting to {url}: {e}")));
                if !wait_or_leave(&mut out, &mut backoff, reconnect_max).await {
                    return;
                }
                continue;
            }
            Err(_) => {
                let _ = tx.send(TrackerIn::Down(format!("connecting to {url}: timed out")));
                if !wait_or_leave(&mut out, &mut backoff, reconnect_max).await {
                    return;
                }
                continue;
            }
        };
        while out.try_recv().is_ok() {}
        backoff = reconnect_min;
        if tx.send(TrackerIn::Up).is_err() {
            return;
        }
        let reason = loop {
            tokio::select! {
                frame = out.recv() => match frame {
                    Some(frame) => {
                        let text = String::from_utf8(frame).unwrap_or_default();
                        if let Err(e) = ws.send(Message::text(text)).await {
                            break format!("send failed: {e}");
                        }
                    }
                    None => {
                        // Leaving: the stopped announce was queued before the close.
                        let _ = ws.close(None).await;
                        return;
                    }
                },
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => {
                        let mut bytes = text.as_bytes().to_vec();
                        if let Some(m) = decoder.decode_server(&mut bytes, to_owned_message)
                            && tx.send(m).is_err()
                        {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        break format!("tracker closed the connection: {frame:?}");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break format!("tracker connection failed: {e}"),
                    None => break "tracker connection ended".to_owned(),
                },
            }
        };
        if tx.send(TrackerIn::Down(reason)).is_err() {
            return;
        }
        if !wait_or_leave(&mut out, &mut backoff, reconnect_max).await {
            return;
        }
    }
}

/// Sleeps for the backoff (with jitter so a restarted tracker is not hit by every node at
/// once), discarding queued frames. False if the node left meanwhile.
async fn wait_or_leave(
    out: &mut mpsc::UnboundedReceiver<Vec<u8>>,
    backoff: &mut Duration,
    max: Duration,
) -> bool {
    let jitter = 0.5 + fastrand::f64();
    let deadline = tokio::time::Instant::now() + backoff.mul_f64(jitter);
    *backoff = (*backoff * 2).min(max);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return true,
            frame = out.recv() => if frame.is_none() { return false },
        }
    }
}

fn to_owned_message(
    m: Result<ServerMessage<'_>, tidepool_protocol::tracker::DecodeError>,
) -> Option<TrackerIn> {
    match m {
        Ok(ServerMessage::Announce(r)) => Some(TrackerIn::AnnounceResponse {
            interval: r.interval,
            peers: r.complete + r.incomplete,
        }),
        Ok(ServerMessage::Offer(o)) => Some(TrackerIn::Offer {
            from: o.peer_id,
            offer_id: o.offer_id,
            sdp: o.offer.sdp()?.to_owned(),
        }),
        Ok(ServerMessage::Answer(a)) => Some(TrackerIn::Answer {
            from: a.peer_id,
            offer_id: a.offer_id,
            sdp: a.answer.sdp()?.to_owned(),
        }),
        Ok(ServerMessage::Error(e)) => Some(TrackerIn::Failure(e.failure_reason.into_owned())),
        Ok(ServerMessage::Scrape(_)) => None,
        Err(e) => {
            tracing::debug!("undecodable tracker frame: {e}");
            None
        }
    }
}

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
    /// The tracker refused the token (HTTP 401/403): no reconnect follows.
    Unauthorized(String),
}

/// Runs until `out` is closed (the node is leaving). Frames sent while disconnected are
/// dropped: offers and answers are stale by the time a reconnect succeeds.
pub(crate) async fn run(
    url: String,
    token: Option<String>,
    reconnect_min: Duration,
    reconnect_max: Duration,
    mut out: mpsc::UnboundedReceiver<Vec<u8>>,
    tx: mpsc::UnboundedSender<TrackerIn>,
) {
    let mut backoff = reconnect_min;
    let mut decoder = Decoder::default();
    // Logs and errors name the URL without any token a user put in its query.
    let shown = redact(&url);
    loop {
        let request = match request(&url, token.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(TrackerIn::Unauthorized(format!("bad tracker request: {e}")));
                return;
            }
        };
        let connect = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(request),
        )
        .await;
        let mut ws = match connect {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp)))
                if matches!(resp.status().as_u16(), 401 | 403) =>
            {
                // Shown on a terminal: no control characters from the far side.
                let body: String = resp
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                    .unwrap_or_default()
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(200)
                    .collect();
                let _ = tx.send(TrackerIn::Unauthorized(format!(
                    "{shown} refused the token (HTTP {}): {body}",
                    resp.status().as_u16()
                )));
                return;
            }
            Ok(Err(e)) => {
                let _ = tx.send(TrackerIn::Down(format!("connecting to {shown}: {e}")));
                if !wait_or_leave(&mut out, &mut backoff, reconnect_max).await {
                    return;
                }
                continue;
            }
            Err(_) => {
                let _ = tx.send(TrackerIn::Down(format!("connecting to {shown}: timed out")));
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

/// The upgrade request, with the token as a bearer header.
fn request(
    url: &str,
    token: Option<&str>,
) -> Result<
    tokio_tungstenite::tungstenite::handshake::client::Request,
    tokio_tungstenite::tungstenite::Error,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut req = url.into_client_request()?;
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().map_err(|_| {
            tokio_tungstenite::tungstenite::Error::Url(
                tokio_tungstenite::tungstenite::error::UrlError::UnableToConnect(
                    "the token holds characters a header cannot".into(),
                ),
            )
        })?;
        req.headers_mut().insert("authorization", value);
    }
    Ok(req)
}

/// `url` with the value of any `token` query parameter hidden, for logs.
pub(crate) fn redact(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("token", _)) => "token=…".to_owned(),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_in_a_tracker_url_are_hidden_from_logs() {
        assert_eq!(
            redact("wss://t.example/?token=a.b.c"),
            "wss://t.example/?token=…"
        );
        assert_eq!(
            redact("ws://127.0.0.1:8000/announce?x=1&token=a.b.c&y=2"),
            "ws://127.0.0.1:8000/announce?x=1&token=…&y=2"
        );
        assert_eq!(redact("ws://127.0.0.1:8000"), "ws://127.0.0.1:8000");
    }

    #[test]
    fn the_token_travels_as_a_bearer_header() {
        let req = request("ws://127.0.0.1:1/", Some("h.p.s")).expect("request");
        assert_eq!(req.headers()["authorization"], "Bearer h.p.s");
        assert!(request("ws://127.0.0.1:1/", Some("bad\ntoken")).is_err());
    }
}

//! Decoding a client's text frame and acting on it: rate limit, announce (membership bound,
//! access list) and scrape (split per swarm worker, or the shared full-scrape snapshot).

use std::time::{Duration, Instant};

use crossbeam_channel::TrySendError;
use tidepool_protocol::InfoHash;
use tidepool_protocol::tracker::{
    Action, ClientMessage, ErrorResponse, ScrapeHashes, ScrapeResponse,
};

use super::connection::{
    Change, MAX_PENDING_SCRAPES, MembershipLimits, PendingScrape, TooManySwarms,
};
use super::{Dest, EventLoop};
use crate::auth::{Denied, Pools};
use crate::cluster::InstanceId;
use crate::metrics::{ErrorKind, InKind, OutKind, bump};
use crate::swarm::{Announce, AnswerPart, Request};
use tidepool_protocol::tracker::AnnounceEvent;

/// The reply to a frame over the connection's rate limit (sent without reading the frame).
const RATE_LIMITED: &str = r#"{"failure reason":"rate limit exceeded: slow down"}"#;

impl EventLoop {
    /// A text frame from an open connection: rate limit, then decode and act.
    pub(super) fn handle_text(&mut self, slot: usize, frame: &str, now: Instant) {
        bump(&self.metrics().bytes_in, frame.len() as u64);
        let n = &self.worker.shared.config.network;
        let (rate, burst) = (n.max_messages_per_second, n.message_burst);
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if !conn.bucket.take(rate, burst, now) {
            // Not decoded at all: a flooder costs a refill check and a reply.
            self.count_in(InKind::RateLimited);
            self.count_error(ErrorKind::RateLimited);
            self.queue(slot, OutKind::Error, RATE_LIMITED.as_bytes());
            return;
        }
        self.handle_request(slot, frame, now);
    }

    /// Decodes a request and acts on it. Offers and answers keep their exact bytes from the
    /// frame (verbatim decoding), so forwarding them copies instead of re-encoding.
    fn handle_request(&mut self, slot: usize, frame: &str, now: Instant) {
        enum Step {
            Reply(String),
            Announce(Announce),
            Scrape(ScrapeHashes),
        }
        let step = self.decoder.decode_client_verbatim(frame, |msg| match msg {
            Err(e) => {
                let mut out = Vec::new();
                e.to_response().encode(&mut out);
                Step::Reply(String::from_utf8(out).unwrap_or_default())
            }
            Ok(ClientMessage::Scrape(s)) => Step::Scrape(s.info_hashes),
            Ok(ClientMessage::Announce(a)) => Step::Announce(Announce {
                info_hash: a.info_hash,
                peer_id: a.peer_id,
                event: a.event,
                numwant: a.numwant,
                seeder: a.left.is_some_and(|l| l.is_zero()),
                offers: a
                    .offers
                    .iter()
                    .map(|o| (o.offer_id, o.offer.to_json_string().into_boxed_str()))
                    .collect(),
                answer: a.answer.map(|ans| AnswerPart {
                    to_peer_id: ans.to_peer_id,
                    offer_id: ans.offer_id,
                    answer: ans.answer.to_json_string().into_boxed_str(),
                }),
                replaces: None,
            }),
        });
        match step {
            Step::Reply(frame) => {
                self.count_in(InKind::Invalid);
                self.count_error(ErrorKind::InvalidRequest);
                self.queue(slot, OutKind::Error, frame.as_bytes());
            }
            Step::Announce(a) => {
                self.count_in(if a.answer.is_some() {
                    InKind::Answer
                } else {
                    InKind::Announce
                });
                self.forward_announce(slot, a, now);
            }
            Step::Scrape(hashes) => {
                self.count_in(InKind::Scrape);
                self.forward_scrape(slot, hashes, now);
            }
        }
    }

    pub(super) fn count_in(&self, kind: InKind) {
        bump(&self.metrics().messages_in[kind as usize], 1);
    }

    pub(super) fn count_error(&self, kind: ErrorKind) {
        bump(&self.metrics().errors[kind as usize], 1);
    }

    /// Queues a failure reply naming the request's action (and swarm, when known), which the
    /// npm client needs to treat it as a request error rather than a broken socket.
    pub(super) fn failure(
        &mut self,
        slot: usize,
        kind: ErrorKind,
        reason: &str,
        action: Action,
        info_hash: Option<InfoHash>,
    ) {
        self.count_error(kind);
        let mut out = Vec::new();
        ErrorResponse {
            failure_reason: reason.into(),
            action: Some(action),
            info_hash,
        }
        .encode(&mut out);
        self.queue(slot, OutKind::Error, &out);
    }

    fn forward_announce(&mut self, slot: usize, mut a: Announce, now: Instant) {
        let denied = self.conns.get(slot).and_then(|c| {
            let grant = c.grant.as_ref()?;
            // An answer names the offerer's swarm but joins nothing, and leaving is always
            // allowed: only the pool counts. Otherwise the role is checked the way the swarm
            // counts seeders (`left` 0, or `completed`).
            let seeder = match (&a.answer, a.event) {
                (Some(_), _) | (None, AnnounceEvent::Stopped) => None,
                (None, event) => Some(a.seeder || event == AnnounceEvent::Completed),
            };
            match seeder {
                Some(seeder) => grant.check_announce(&a.info_hash, seeder).err(),
                None => (!grant.admits(&a.info_hash)).then_some(Denied::Pool),
            }
        });
        if let Some(denied) = denied {
            let kind = match denied {
                Denied::Pool => ErrorKind::TokenPool,
                Denied::Role => ErrorKind::TokenRole,
            };
            let reason = denied.reason();
            self.failure(slot, kind, reason, Action::Announce, Some(a.info_hash));
            return;
        }
        if !self.access.get().allows(&a.info_hash) {
            let reason = "info_hash is not allowed on this tracker";
            self.failure(
                slot,
                ErrorKind::AccessDenied,
                reason,
                Action::Announce,
                Some(a.info_hash),
            );
            return;
        }
        let p = &self.worker.shared.config.protocol;
        let limits = MembershipLimits {
            max_swarms: p.max_swarms_per_connection,
            max_ids: p.max_peer_ids_per_swarm,
            timeout: self.worker.shared.config.membership_timeout(),
        };
        let dest = self.dest(&a.info_hash);
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let (info_hash, peer_id) = (a.info_hash, a.peer_id);
        let change = match conn.swarms.announce(
            info_hash,
            peer_id,
            a.event,
            a.answer.is_some(),
            now,
            limits,
        ) {
            Ok(change) => change,
            Err(TooManySwarms) => {
                let reason = format!(
                    "too many swarms on one connection (limit {}); send `stopped` for torrents you removed",
                    limits.max_swarms
                );
                self.failure(
                    slot,
                    ErrorKind::SwarmLimit,
                    &reason,
                    Action::Announce,
                    Some(info_hash),
                );
                return;
            }
        };
        if let Change::Replaced(old, _) = change {
            a.replaces = Some(old);
        }
        let id = conn.id;
        let sent = match dest {
            Dest::Local(shard) => self.worker.to_swarms[shard]
                .requests
                .try_send((id, Request::Announce(a)))
                .map_err(|e| match e {
                    TrySendError::Full(_) => "tracker is overloaded; retry later",
                    TrySendError::Disconnected(_) => "tracker is shutting down",
                }),
            Dest::Remote(owner) => {
                if self.send_remote(owner, id, Request::Announce(a)) {
                    Ok(())
                } else {
                    Err("tracker is overloaded; retry later")
                }
            }
        };
        if let Err(reason) = sent {
            if let Some(conn) = self.conns.get_mut(slot) {
                conn.swarms.undo(info_hash, peer_id, change);
            }
            self.failure(
                slot,
                ErrorKind::Overloaded,
                reason,
                Action::Announce,
                Some(info_hash),
            );
        }
    }

    fn forward_scrape(&mut self, slot: usize, hashes: ScrapeHashes, now: Instant) {
        let grant = self.conns.get(slot).and_then(|c| c.grant.as_deref());
        // A token limits scrapes to its pools too: a full scrape would list every pool.
        let admitted = grant.is_none_or(|g| match &hashes {
            ScrapeHashes::All => g.pools == Pools::Any,
            listed => listed.as_slice().iter().all(|h| g.admits(h)),
        });
        if !admitted {
            let reason = Denied::Pool.reason();
            self.failure(slot, ErrorKind::TokenPool, reason, Action::Scrape, None);
            return;
        }
        let requested = match hashes {
            ScrapeHashes::All => return self.full_scrape(slot, now),
            other => other.as_slice().to_vec(),
        };
        if requested.is_empty() {
            // A scrape of an empty list: answer at once.
            let mut out = Vec::new();
            ScrapeResponse::default().encode(&mut out);
            self.queue(slot, OutKind::Scrape, &out);
            return;
        }
        let shards = self.worker.to_swarms.len();
        let timeout = Duration::from_millis(self.worker.shared.config.workers.reply_timeout_ms);
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.scrapes.len() >= MAX_PENDING_SCRAPES {
            let reason = "too many scrapes in flight on this connection; wait for the replies";
            self.failure(
                slot,
                ErrorKind::ScrapesInFlight,
                reason,
                Action::Scrape,
                None,
            );
            return;
        }
        let id = conn.id;
        self.next_request_id += 1;
        let request_id = self.next_request_id;
        let mut per_shard: Vec<Vec<InfoHash>> = vec![Vec::new(); shards];
        let mut remote: Vec<(InstanceId, Vec<InfoHash>)> = Vec::new();
        for h in &requested {
            match self.dest(h) {
                Dest::Local(shard) => per_shard[shard].push(*h),
                Dest::Remote(owner) => match remote.iter_mut().find(|(o, _)| *o == owner) {
                    Some((_, hashes)) => hashes.push(*h),
                    None => remote.push((owner, vec![*h])),
                },
            }
        }
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        conn.scrapes.push(PendingScrape {
            request_id,
            hashes_left: requested.len(),
            files: Vec::new(),
            requested,
            deadline: now + timeout,
        });
        // Parts for other instances go first: a part they cannot take fails the scrape at
        // once, like a full local inbox, instead of after the reply timeout.
        let remote_sent = remote.into_iter().all(|(owner, info_hashes)| {
            let req = Request::Scrape {
                request_id,
                info_hashes,
            };
            self.send_remote(owner, id, req)
        });
        if !remote_sent {
            return self.scrape_overloaded(slot, request_id);
        }
        for (lanes, info_hashes) in self.worker.to_swarms.iter().zip(per_shard) {
            if info_hashes.is_empty() {
                continue;
            }
            let req = Request::Scrape {
                request_id,
                info_hashes,
            };
            if lanes.requests.try_send((id, req)).is_err() {
                return self.scrape_overloaded(slot, request_id);
            }
        }
    }

    /// A part of a scrape could not be sent: the scrape fails at once. Parts already sent
    /// come back to no pending scrape and are counted there.
    fn scrape_overloaded(&mut self, slot: usize, request_id: u64) {
        if let Some(conn) = self.conns.get_mut(slot) {
            conn.scrapes.retain(|p| p.request_id != request_id);
        }
        let reason = "tracker is overloaded; retry later";
        self.failure(slot, ErrorKind::Overloaded, reason, Action::Scrape, None);
    }

    /// A scrape without `info_hash`: refused unless enabled; then at most one per interval
    /// per connection, answered from the snapshot every requester shares.
    fn full_scrape(&mut self, slot: usize, now: Instant) {
        let shared = self.worker.shared.clone();
        if !shared.config.protocol.full_scrape {
            let reason = "full scrape (a scrape without info_hash) is disabled on this tracker; name the info_hash";
            self.failure(
                slot,
                ErrorKind::FullScrapeDisabled,
                reason,
                Action::Scrape,
                None,
            );
            return;
        }
        let interval = shared.full_scrape.interval();
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn
            .last_full_scrape
            .is_some_and(|t| now.saturating_duration_since(t) < interval)
        {
            let reason = format!("full scrape at most once every {} s", interval.as_secs());
            self.failure(
                slot,
                ErrorKind::FullScrapeRateLimited,
                &reason,
                Action::Scrape,
                None,
            );
            return;
        }
        conn.last_full_scrape = Some(now);
        let (frame, rebuilt) = shared.full_scrape.frame(now);
        if rebuilt {
            bump(&self.metrics().full_scrape_rebuilds, 1);
        }
        self.queue(slot, OutKind::Scrape, frame.as_bytes());
    }
}

//! A quick, closed-loop load for a smoke measurement of messages per second (the real load
//! tester is `tidepool-load-test`). Each connection joins a swarm, then repeatedly announces
//! with offers (real-sized SDP), answers every offer it receives, and waits for its own
//! announce response before the next request.
//!
//! `cargo run --release -p tidepool-tracker --example quick_load -- ws://127.0.0.1:8000 200 20 10`
//! (URL, connections, swarms, seconds)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SDP: &str = "v=0\r\no=rtc 1483316455 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\na=msid-semantic:WMS *\r\na=ice-options:ice2,trickle\r\na=fingerprint:sha-256 C7:C5:22:57:36:99:60:0B:5C:BA:12:04:AF:BC:75:80:ED:5B:60:7C:9B:C9:12:73:2A:B5:09:F6:78:C4:AC:48\r\nm=application 46280 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 127.0.0.1\r\na=mid:0\r\na=sendrecv\r\na=sctp-port:5000\r\na=max-message-size:262144\r\na=setup:actpass\r\na=ice-ufrag:vVL4\r\na=ice-pwd:bbF4/mIKgAqPrWia5JVyZW\r\na=candidate:1 1 UDP 2114977791 127.0.0.1 46280 typ host\r\na=end-of-candidates\r\n";

fn id(prefix: u8, n: u32) -> String {
    let mut b = [b'x'; 20];
    b[0] = prefix;
    b[1..5].copy_from_slice(&n.to_le_bytes());
    b.iter().map(|&c| c as char).collect()
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    received: AtomicU64,
    offers_in: AtomicU64,
    answers_in: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = args
        .first()
        .cloned()
        .unwrap_or_else(|| "ws://127.0.0.1:8000".into());
    let conns: u32 = args.get(1).map_or(Ok(200), |s| s.parse())?;
    let swarms: u32 = args.get(2).map_or(Ok(20), |s| s.parse())?;
    let secs: u64 = args.get(3).map_or(Ok(10), |s| s.parse())?;
    let counts = Arc::new(Counts::default());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (url, counts) = (url.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(&url).await?;
            let info_hash = id(b'h', c % swarms);
            let peer_id = id(b'p', c);
            let mut round = 0u32;
            while Instant::now() < deadline {
                round += 1;
                let offers: Vec<Value> = (0..2)
                    .map(|i| json!({"offer_id": id(b'o', round * 2 + i), "offer": {"type": "offer", "sdp": SDP}}))
                    .collect();
                let req = json!({"action": "announce", "info_hash": info_hash, "peer_id": peer_id, "numwant": 2, "offers": offers});
                ws.send(Message::text(req.to_string())).await?;
                counts.sent.fetch_add(1, Ordering::Relaxed);
                // Read until our own announce response, answering offers on the way.
                loop {
                    let Some(msg) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await? else {
                        return Ok::<_, anyhow::Error>(());
                    };
                    let Message::Text(text) = msg? else { continue };
                    counts.received.fetch_add(1, Ordering::Relaxed);
                    let v: Value = serde_json::from_str(&text)?;
                    if v.get("offer").is_some() {
                        counts.offers_in.fetch_add(1, Ordering::Relaxed);
                        let answer = json!({"action": "announce", "info_hash": info_hash, "peer_id": peer_id,
                            "to_peer_id": v["peer_id"], "offer_id": v["offer_id"], "answer": {"type": "answer", "sdp": SDP}});
                        ws.send(Message::text(answer.to_string())).await?;
                        counts.sent.fetch_add(1, Ordering::Relaxed);
                    } else if v.get("answer").is_some() {
                        counts.answers_in.fetch_add(1, Ordering::Relaxed);
                    } else if v.get("interval").is_some() {
                        break;
                    }
                }
            }
            let _ = ws.close(None).await;
            Ok(())
        }));
    }
    let start = Instant::now();
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            eprintln!("connection error: {e}");
        }
    }
    let s = start.elapsed().as_secs_f64();
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    println!(
        "{conns} connections, {swarms} swarms, {s:.1} s: requests in {:.0}/s, frames out {:.0}/s \
         (offers delivered {:.0}/s, answers delivered {:.0}/s)",
        get(&counts.sent) / s,
        get(&counts.received) / s,
        get(&counts.offers_in) / s,
        get(&counts.answers_in) / s,
    );
    Ok(())
}

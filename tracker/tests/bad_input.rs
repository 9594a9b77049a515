//! Abuse over real sockets: each bad input gets a clear failure or close, and a well-behaved
//! client on the same tracker keeps being served.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// A bystander announces and gets its response: the tracker still serves others.
async fn still_served(url: &str) {
    let mut c = Client::connect(url).await;
    let h = num_id(b'b', 0);
    let r = c.announce(&h, &num_id(b'b', 1), json!({})).await;
    assert_eq!(r["action"], "announce");
    assert!(r["interval"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_wrong_types_and_bad_ids_get_failures_and_the_connection_stays_open() {
    let tracker = start(config(2, 2));
    let mut c = Client::connect(&tracker.url()).await;
    let h = num_id(b'h', 1);
    let p = num_id(b'p', 1);
    let cases = [
        ("{\"action\":\"announce\",".to_owned(), None, None),
        ("[1,2,3]".to_owned(), None, None),
        (json!({"action": "announce", "info_hash": h, "peer_id": "short"}).to_string(), Some("announce"), Some(&h)),
        (json!({"action": "announce", "info_hash": format!("{h}x"), "peer_id": p}).to_string(), Some("announce"), None),
        (json!({"action": "announce", "info_hash": h, "peer_id": format!("{}Ā", &num_id(b'p', 1)[..19])}).to_string(), Some("announce"), Some(&h)),
        (json!({"action": "announce", "info_hash": h, "peer_id": p, "numwant": "many"}).to_string(), Some("announce"), Some(&h)),
        (json!({"action": "teleport", "info_hash": h}).to_string(), None, Some(&h)),
        (json!({"action": "announce", "info_hash": h, "peer_id": p, "offers": offers(11, "x")}).to_string(), Some("announce"), Some(&h)),
        (json!({"action": "scrape", "info_hash": [h, 5]}).to_string(), Some("scrape"), None),
        (format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000)), None, None),
    ];
    for (frame, action, info_hash) in cases {
        c.send_text(frame.clone()).await;
        let reply = c.recv().await;
        let reason = reply["failure reason"]
            .as_str()
            .unwrap_or_else(|| panic!("no failure for {frame:.80}: {reply}"));
        assert!(!reason.is_empty());
        assert_eq!(reply["action"].as_str(), action, "{frame:.80}");
        assert_eq!(
            reply["info_hash"].as_str(),
            info_hash.map(String::as_str),
            "{frame:.80}"
        );
    }
    // The same connection still works.
    let r = c.announce(&h, &p, json!({})).await;
    assert_eq!(r["incomplete"], json!(1));
    still_served(&tracker.url()).await;
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_are_refused_with_a_close() {
    let tracker = start(config(1, 1));
    let mut c = Client::connect(&tracker.url()).await;
    c.ws.send(Message::binary(br#"{"action":"scrape"}"#.to_vec()))
        .await
        .expect("send");
    assert_eq!(c.closed().await, Some(1003));
    still_served(&tracker.url()).await;
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_with_a_close() {
    let tracker = start(config(1, 1));
    let mut c = Client::connect(&tracker.url()).await;
    let huge = json!({"action": "scrape", "pad": "x".repeat(100 * 1024)}).to_string();
    let _ = c.ws.send(Message::text(huge)).await;
    let code = c.closed().await;
    assert!(matches!(code, Some(1009) | None), "{code:?}");
    still_served(&tracker.url()).await;
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impostor_cannot_announce_answer_or_evict_as_another_peer_id() {
    let tracker = start(config(2, 2));
    let mut owner = Client::connect(&tracker.url()).await;
    let mut impostor = Client::connect(&tracker.url()).await;
    let mut third = Client::connect(&tracker.url()).await;
    let h = num_id(b'h', 2);
    let victim = num_id(b'v', 0);
    owner.announce(&h, &victim, json!({"left": 5})).await;
    let r = impostor.announce(&h, &victim, json!({"left": 0})).await;
    assert_eq!(
        r["failure reason"],
        "peer_id is in use by another connection"
    );
    assert_eq!(r["action"], "announce");
    let r = impostor
        .announce(&h, &victim, json!({"event": "stopped"}))
        .await;
    assert!(r["failure reason"].is_string());
    // Answering as the victim is refused too.
    third.announce(&h, &num_id(b't', 0), json!({})).await;
    impostor
        .send(announce_msg(&h, &victim, json!({"to_peer_id": num_id(b't', 0), "offer_id": "o", "answer": {"type": "answer", "sdp": "evil"}})))
        .await;
    assert!(impostor.recv().await["failure reason"].is_string());
    third.expect_silence(Duration::from_millis(200)).await;
    // The impostor leaves; the owner stays, counted as the leecher it said it was.
    drop(impostor);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = third.scrape(json!(h)).await;
    assert_eq!(s["files"][&h]["incomplete"], json!(2));
    assert_eq!(s["files"][&h]["complete"], json!(0));
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarms_per_connection_are_bounded() {
    let mut cfg = config(1, 2);
    cfg.protocol.max_swarms_per_connection = 3;
    let tracker = start(cfg);
    let mut c = Client::connect(&tracker.url()).await;
    for s in 0..3u32 {
        assert!(
            c.announce(&num_id(b'h', s), &num_id(b'p', 0), json!({}))
                .await["interval"]
                .is_u64()
        );
    }
    let r = c
        .announce(&num_id(b'h', 3), &num_id(b'p', 0), json!({}))
        .await;
    assert_eq!(
        r["failure reason"],
        "too many swarms on one connection (limit 3); send `stopped` for torrents you removed"
    );
    // Re-announcing to a joined swarm is fine.
    assert!(
        c.announce(&num_id(b'h', 1), &num_id(b'p', 0), json!({}))
            .await["interval"]
            .is_u64()
    );
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_frames_does_not_starve_other_clients() {
    let tracker = start(config(1, 1));
    let url = tracker.url();
    let flooder = tokio::spawn({
        let url = url.clone();
        async move {
            let mut f = Client::connect(&url).await;
            for _ in 0..3000 {
                f.send_text("{\"action\":".into()).await;
            }
            let mut failures = 0;
            while failures < 3000 {
                assert!(f.recv().await["failure reason"].is_string());
                failures += 1;
            }
            failures
        }
    });
    let started = Instant::now();
    still_served(&url).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        flooder.await.expect("flooder"),
        3000,
        "every bad frame answered"
    );
    tracker.shutdown();
}

/// A client that stops reading while offers are flooded at it is closed once its outgoing
/// queue fills; the flooder and everyone else keep being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_is_closed_and_memory_stays_bounded() {
    let mut cfg = config(1, 1);
    cfg.network.max_message_size = 16 * 1024;
    cfg.network.max_frame_size = 16 * 1024;
    cfg.network.max_outgoing_queue = 32 * 1024;
    // The flooder here must be served as fast as it asks; the rate limit has its own test.
    cfg.network.max_messages_per_second = 0;
    let tracker = start(cfg);
    let addr = tracker.local_addr();
    // The victim: a tiny receive buffer, and it never reads after its first response.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let tcp = socket.connect(addr).await.expect("connect");
    let (ws, _) = tokio_tungstenite::client_async(
        format!("ws://{addr}/"),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await
    .expect("handshake");
    let mut victim = Client { ws };
    let h = num_id(b'h', 9);
    victim.announce(&h, &num_id(b'v', 0), json!({})).await;

    let mut flooder = Client::connect(&tracker.url()).await;
    let sdp = "a=candidate:1 1 UDP 2114977791 127.0.0.1 46280 typ host\r\n".repeat(20);
    let mut sent = 0;
    for i in 0..3000u32 {
        flooder
            .send(announce_msg(&h, &num_id(b'f', 0), json!({"offers": [{"offer_id": num_id(b'o', i), "offer": {"type": "offer", "sdp": sdp}}]})))
            .await;
        let r = flooder.recv().await;
        assert!(r["interval"].is_u64(), "flooder keeps being answered: {r}");
        sent += 1;
        if r["incomplete"] == json!(1) {
            break; // the victim was closed and its peer removed
        }
    }
    assert!(sent < 3000, "the victim was never closed");
    still_served(&tracker.url()).await;
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_handshake_is_cut_off() {
    let mut cfg = config(1, 1);
    cfg.network.handshake_timeout_ms = 500;
    let tracker = start(cfg);
    let mut tcp = tokio::net::TcpStream::connect(tracker.local_addr())
        .await
        .expect("connect");
    let started = Instant::now();
    let request = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n";
    let mut closed = false;
    for byte in request {
        if tcp.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    if !closed {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(
            matches!(n, Ok(0) | Err(_)),
            "connection should be closed: {n:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cut off near the 0.5 s limit"
    );
    still_served(&tracker.url()).await;
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_connections_are_refused_at_accept() {
    let mut cfg = config(1, 1);
    cfg.network.max_connections_per_worker = 3;
    let tracker = start(cfg);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Client::connect(&tracker.url()).await);
    }
    let refused = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(tracker.url()))
        .await
        .expect("answered in time");
    assert!(refused.is_err(), "fourth connection must be refused");
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    still_served(&tracker.url()).await;
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_over_the_rate_limit_get_failures_and_the_bucket_refills() {
    let mut cfg = config(1, 1);
    cfg.network.max_messages_per_second = 20;
    cfg.network.message_burst = 20;
    let tracker = start(cfg);
    let mut flooder = Client::connect(&tracker.url()).await;
    let h = num_id(b'h', 1);
    for _ in 0..100 {
        flooder
            .send(json!({"action": "scrape", "info_hash": h}))
            .await;
    }
    let (mut served, mut limited) = (0, 0);
    for _ in 0..100 {
        let r = flooder.recv().await;
        if r["files"].is_object() {
            served += 1;
        } else {
            assert_eq!(r["failure reason"], "rate limit exceeded: slow down");
            limited += 1;
        }
    }
    // The burst of 20, plus what refilled (20/s) while the 100 frames were read.
    assert!((20..=30).contains(&served), "served {served}");
    assert_eq!(served + limited, 100);
    // Others are unaffected, and the flooder is served again once the bucket refills.
    still_served(&tracker.url()).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(flooder.scrape(json!(h)).await["files"].is_object());
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_offers_are_refused_and_numwant_caps_the_fan_out() {
    let mut cfg = config(1, 1);
    cfg.protocol.max_offers = 3;
    let tracker = start(cfg);
    let url = tracker.url();
    let h = num_id(b'h', 1);
    let mut others = Vec::new();
    for i in 0..5 {
        let mut c = Client::connect(&url).await;
        c.announce(&h, &num_id(b'o', i), json!({})).await;
        others.push(c);
    }
    let mut c = Client::connect(&url).await;
    let r = c
        .announce(&h, &num_id(b'p', 0), json!({"offers": offers(4, "x")}))
        .await;
    assert!(
        r["failure reason"]
            .as_str()
            .is_some_and(|s| s.contains("offers")),
        "{r}"
    );
    // numwant 2 with 3 offers: exactly two peers get one offer each.
    let r = c
        .announce(
            &h,
            &num_id(b'p', 0),
            json!({"numwant": 2, "offers": offers(3, "y")}),
        )
        .await;
    assert_eq!(r["incomplete"], json!(6));
    let mut delivered = 0;
    for o in &mut others {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        if let Ok(Some(Ok(Message::Text(_)))) =
            tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut o.ws)).await
        {
            delivered += 1;
        }
    }
    assert_eq!(delivered, 2);
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_summing_past_the_message_limit_are_closed_with_1009() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let tracker = start(config(1, 1));
    let mut c = Client::connect(&tracker.url()).await;
    // Each fragment is under the 64 KiB frame limit; together they are over the message limit.
    let part = vec![b'x'; 40 * 1024];
    let first = Frame::message(part.clone(), OpCode::Data(Data::Text), false);
    let _ = c.ws.send(Message::Frame(first)).await;
    let rest = Frame::message(part, OpCode::Data(Data::Continue), true);
    let _ = c.ws.send(Message::Frame(rest)).await;
    let code = c.closed().await;
    assert!(matches!(code, Some(1009) | None), "{code:?}");
    still_served(&tracker.url()).await;
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permessage_deflate_is_not_negotiated_and_compressed_frames_are_refused() {
    let tracker = start(config(1, 1));
    let mut s = tokio::net::TcpStream::connect(tracker.local_addr())
        .await
        .expect("connect");
    let req = "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
               Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n";
    s.write_all(req.as_bytes()).await.expect("write");
    let head = response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "no extension may be accepted: {head}"
    );
    // A masked text frame with RSV1 set (as if compressed): a protocol error, close 1002.
    let payload = b"{}";
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x80 | 0x40 | 0x1, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("not closed in time"),
        }
    }
    // Close frame: opcode 0x8, then the code 1002 big-endian.
    assert!(got.len() >= 4 && got[0] == 0x88, "{got:?}");
    assert_eq!(u16::from_be_bytes([got[2], got[3]]), 1002);
    still_served(&tracker.url()).await;
    tracker.shutdown();
}

/// Reads an HTTP response head from a raw socket.
async fn response_head(s: &mut tokio::net::TcpStream) -> String {
    let mut buf = vec![0u8; 4096];
    let mut head = String::new();
    while !head.contains("\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("in time")
            .expect("read");
        assert!(n > 0, "closed during handshake: {head}");
        head.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_heads_trickled_a_byte_at_a_time_or_ending_lines_in_bare_lf_are_answered_at_once() {
    let tracker = start(config(1, 1));
    let crlf = "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let mut s = tokio::net::TcpStream::connect(tracker.local_addr())
        .await
        .expect("connect");
    s.set_nodelay(true).expect("nodelay");
    for b in crlf.as_bytes() {
        s.write_all(&[*b]).await.expect("write");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let head = response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Bare LF line ends (httparse accepts them): answered now, not at the handshake timeout.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(tracker.local_addr())
        .await
        .expect("connect");
    s.write_all(crlf.replace("\r\n", "\n").as_bytes())
        .await
        .expect("write");
    let head = response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // A plain HTTP request is refused with a status and a reason, then closed.
    let mut s = tokio::net::TcpStream::connect(tracker.local_addr())
        .await
        .expect("connect");
    s.write_all(b"GET /announce HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let head = response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    still_served(&tracker.url()).await;
    tracker.shutdown();
}

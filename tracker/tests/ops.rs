//! Operating a public tracker, over real sockets: the metrics endpoint scraped with a real
//! HTTP client, access lists (allow, deny, reload, purge, broken files), and client addresses
//! behind trusted proxies feeding the per-address connection limit.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tidepool_tracker::access::AccessListMode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The hex form the access list file uses for a test id.
fn hex(id: &str) -> String {
    id.chars().map(|c| format!("{:02x}", c as u32)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_announces_offers_bad_json_binary_frames_and_closes() {
    let tracker = start(config_with_metrics());
    let (status, kind, text) = http_get(&tracker, "/metrics");
    assert_eq!(status, 200);
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    assert_eq!(sample(&text, "tidepool_connections{worker=\"0\"}"), 0);
    assert_eq!(
        sample(&text, "tidepool_messages_in_total{kind=\"announce\"}"),
        0
    );

    let url = tracker.url();
    let h = num_id(b'h', 1);
    let mut a = Client::connect(&url).await;
    let mut b = Client::connect(&url).await;
    a.announce(&h, &num_id(b'a', 0), json!({"left": 0})).await;
    b.send(announce_msg(
        &h,
        &num_id(b'b', 0),
        json!({"offers": offers(1, "m")}),
    ))
    .await;
    b.recv().await;
    a.recv().await; // the offer
    b.send_text("{not json".into()).await;
    assert!(b.recv().await["failure reason"].is_string());

    let text = wait_for_sample(&tracker, "tidepool_leechers{shard=\"0\"}", 1).await;
    assert_eq!(sample(&text, "tidepool_seeders{shard=\"0\"}"), 1);
    assert_eq!(sample(&text, "tidepool_swarms{shard=\"0\"}"), 1);
    assert_eq!(sample(&text, "tidepool_connections{worker=\"0\"}"), 2);
    assert_eq!(
        sample(&text, "tidepool_connections_accepted_total{worker=\"0\"}"),
        2
    );
    assert_eq!(
        sample(&text, "tidepool_messages_in_total{kind=\"announce\"}"),
        2
    );
    assert_eq!(
        sample(&text, "tidepool_messages_in_total{kind=\"invalid\"}"),
        1
    );
    assert_eq!(
        sample(&text, "tidepool_messages_out_total{kind=\"announce\"}"),
        2
    );
    assert_eq!(
        sample(&text, "tidepool_messages_out_total{kind=\"offer\"}"),
        1
    );
    assert_eq!(
        sample(&text, "tidepool_errors_total{kind=\"invalid_request\"}"),
        1
    );
    assert!(sample(&text, "tidepool_message_bytes_in_total{worker=\"0\"}") > 100);
    assert!(sample(&text, "tidepool_swarm_requests_total{shard=\"0\"}") >= 2);

    // A binary frame closes b with 1003; the tracker counts why, and a's peer stays.
    b.ws.send(Message::binary(vec![1, 2, 3]))
        .await
        .expect("send");
    assert_eq!(b.closed().await, Some(1003));
    let text = wait_for_sample(&tracker, "tidepool_leechers{shard=\"0\"}", 0).await;
    assert_eq!(
        sample(
            &text,
            "tidepool_connections_closed_total{reason=\"binary\"}"
        ),
        1
    );
    assert_eq!(sample(&text, "tidepool_connections{worker=\"0\"}"), 1);
    assert_eq!(sample(&text, "tidepool_seeders{shard=\"0\"}"), 1);
    drop(a);
    wait_for_sample(&tracker, "tidepool_connections{worker=\"0\"}", 0).await;

    let (status, _, _) = http_get(&tracker, "/nope");
    assert_eq!(status, 404);
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_json_reports_swarms_peers_rates_and_top_swarms() {
    let tracker = start(config_with_metrics());
    let url = tracker.url();
    let big = num_id(b'h', 1);
    let small = num_id(b'h', 2);
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = Client::connect(&url).await;
        c.announce(&big, &num_id(b'p', i), json!({"left": i})).await;
        clients.push(c);
    }
    clients[0]
        .announce(&small, &num_id(b'p', 0), json!({}))
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let stats = loop {
        // Keep announcing so the rate window always holds traffic.
        clients[1]
            .announce(&big, &num_id(b'p', 1), json!({"left": 1}))
            .await;
        let (status, kind, body) = http_get(&tracker, "/stats.json");
        assert_eq!((status, kind.as_str()), (200, "application/json"));
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        if v["peers"] == json!(4) && v["announces_per_sec"].as_f64() > Some(0.0) {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stats never settled: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(stats["swarms"], json!(2));
    assert_eq!(stats["seeders"], json!(1), "left: 0 is a seeder");
    assert_eq!(stats["leechers"], json!(3));
    assert_eq!(stats["connections"], json!(3));
    assert_eq!(stats["top_swarms"][0]["info_hash"], json!(hex(&big)));
    assert_eq!(stats["top_swarms"][0]["leechers"], json!(2));
    assert_eq!(stats["top_swarms"][1]["info_hash"], json!(hex(&small)));
    let (_, kind, html) = http_get(&tracker, "/stats");
    assert!(kind.starts_with("text/html"));
    assert!(html.contains(&hex(&big)), "server-rendered top swarm");
    tracker.shutdown();
}

fn access_config(mode: AccessListMode, file: &std::path::Path) -> tidepool_tracker::Config {
    let mut c = config_with_metrics();
    c.access_list.mode = mode;
    c.access_list.path = Some(file.to_owned());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_refuses_unlisted_swarms_and_reload_purges_newly_denied_peers() {
    let dir = temp_dir("allow");
    let file = dir.join("allow.txt");
    let (a_hash, b_hash) = (num_id(b'h', 1), num_id(b'h', 2));
    std::fs::write(&file, format!("# hosted\n{}\n", hex(&a_hash))).expect("write");
    let tracker = start(access_config(AccessListMode::Allow, &file));
    let url = tracker.url();
    let mut c = Client::connect(&url).await;
    let mut other = Client::connect(&url).await;
    let ok = c.announce(&a_hash, &num_id(b'p', 1), json!({})).await;
    assert_eq!(ok["incomplete"], json!(1));
    other.announce(&a_hash, &num_id(b'p', 2), json!({})).await;
    let refused = c.announce(&b_hash, &num_id(b'p', 1), json!({})).await;
    assert_eq!(
        refused["failure reason"],
        json!("info_hash is not allowed on this tracker")
    );
    assert_eq!(refused["info_hash"], json!(b_hash));

    // Swap the list: a is now refused and its two peers are purged; nobody is disconnected.
    std::fs::write(&file, format!("{}\n", hex(&b_hash))).expect("rewrite");
    assert_eq!(tracker.reload_access_list().expect("reloads"), 1);
    let text = wait_for_sample(
        &tracker,
        "tidepool_access_list_peers_purged_total{shard=\"0\"}",
        2,
    )
    .await;
    assert_eq!(sample(&text, "tidepool_access_list_reloads_total"), 2);
    assert_eq!(sample(&text, "tidepool_connections{worker=\"0\"}"), 2);
    let scrape = other.scrape(json!(a_hash)).await;
    assert_eq!(scrape["files"][&a_hash]["incomplete"], json!(0));
    let refused = c.announce(&a_hash, &num_id(b'p', 1), json!({})).await;
    assert!(refused["failure reason"].is_string(), "{refused}");
    let ok = c.announce(&b_hash, &num_id(b'p', 1), json!({})).await;
    assert_eq!(
        ok["incomplete"],
        json!(1),
        "the same connection goes on being served"
    );
    let text = wait_for_sample(&tracker, "tidepool_errors_total{kind=\"access_denied\"}", 2).await;
    assert_eq!(sample(&text, "tidepool_access_list_entries"), 1);
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_list_refuses_listed_swarms_and_a_broken_file_keeps_the_old_list() {
    let dir = temp_dir("deny");
    let file = dir.join("deny.txt");
    let (bad, good) = (num_id(b'h', 1), num_id(b'h', 2));
    std::fs::write(&file, format!("{}\n", hex(&bad))).expect("write");
    let tracker = start(access_config(AccessListMode::Deny, &file));
    let mut c = Client::connect(&tracker.url()).await;
    assert!(c.announce(&bad, &num_id(b'p', 1), json!({})).await["failure reason"].is_string());
    assert_eq!(
        c.announce(&good, &num_id(b'p', 1), json!({})).await["incomplete"],
        json!(1)
    );

    std::fs::write(&file, "not a hash\n").expect("rewrite");
    let err = tracker
        .reload_access_list()
        .expect_err("broken file refused");
    assert!(err.to_string().contains("line 1"), "{err}");
    assert!(c.announce(&bad, &num_id(b'p', 1), json!({})).await["failure reason"].is_string());
    std::fs::remove_file(&file).expect("remove");
    assert!(
        tracker.reload_access_list().is_err(),
        "a missing file is refused too"
    );
    let (_, _, text) = http_get(&tracker, "/metrics");
    assert_eq!(
        sample(&text, "tidepool_access_list_reload_failures_total"),
        2
    );
    assert_eq!(sample(&text, "tidepool_access_list_entries"), 1);
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_list_reloads_on_its_interval_without_a_signal() {
    let dir = temp_dir("interval");
    let file = dir.join("allow.txt");
    let h = num_id(b'h', 7);
    std::fs::write(&file, "").expect("write");
    let mut cfg = access_config(AccessListMode::Allow, &file);
    cfg.access_list.reload_interval_secs = 1;
    let tracker = start(cfg);
    let mut c = Client::connect(&tracker.url()).await;
    assert!(c.announce(&h, &num_id(b'p', 1), json!({})).await["failure reason"].is_string());
    std::fs::write(&file, hex(&h)).expect("rewrite");
    wait_for_sample(&tracker, "tidepool_access_list_entries", 1).await;
    assert_eq!(
        c.announce(&h, &num_id(b'p', 1), json!({})).await["incomplete"],
        json!(1)
    );
    tracker.shutdown();
}

/// Connects with extra request headers, as a reverse proxy would.
async fn connect_with(url: &str, headers: &[(&'static str, &str)]) -> Client {
    Client::try_connect_with(url, headers)
        .await
        .expect("connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_limit_applies_to_clients_forwarded_by_a_trusted_proxy() {
    let mut cfg = config_with_metrics();
    cfg.network.trusted_proxies = vec!["127.0.0.0/8".parse().expect("cidr")];
    cfg.network.max_connections_per_ip = 2;
    let tracker = start(cfg);
    let url = tracker.url();
    let h = num_id(b'h', 1);
    let xff = [("x-forwarded-for", "198.51.100.1, 203.0.113.5")];
    let mut first = connect_with(&url, &xff).await;
    let _second = connect_with(&url, &xff).await;
    // The third connection from the same forwarded client is closed with 1008 (policy).
    let mut third = connect_with(&url, &xff).await;
    assert_eq!(third.closed().await, Some(1008));
    // Another client behind the same proxy, named by X-Real-IP, is served.
    let mut other = connect_with(&url, &[("x-real-ip", "203.0.113.6")]).await;
    assert_eq!(
        other.announce(&h, &num_id(b'p', 1), json!({})).await["incomplete"],
        json!(1)
    );
    assert_eq!(
        first.announce(&h, &num_id(b'p', 2), json!({})).await["incomplete"],
        json!(2)
    );
    let (_, _, text) = http_get(&tracker, "/metrics");
    assert_eq!(
        sample(
            &text,
            "tidepool_connections_refused_total{reason=\"per_ip\"}"
        ),
        1
    );
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_from_untrusted_peers_do_not_dodge_the_per_address_limit() {
    let mut cfg = config_with_metrics();
    cfg.network.max_connections_per_ip = 2;
    let tracker = start(cfg);
    let url = tracker.url();
    let _a = connect_with(&url, &[("x-forwarded-for", "192.0.2.1")]).await;
    let _b = connect_with(&url, &[("x-forwarded-for", "192.0.2.2")]).await;
    // Refused at accept: the TCP connection is dropped before any handshake.
    let refused = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async({
            let mut r = url.as_str().into_client_request().expect("request");
            r.headers_mut()
                .insert("x-forwarded-for", "192.0.2.3".parse().expect("value"));
            r
        }),
    )
    .await
    .expect("in time");
    assert!(
        refused.is_err(),
        "third loopback connection must be refused"
    );
    let (_, _, text) = http_get(&tracker, "/metrics");
    assert_eq!(
        sample(
            &text,
            "tidepool_connections_refused_total{reason=\"per_ip\"}"
        ),
        1
    );
    drop(_a);
    // Closing one frees its slot.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(Ok(_)) =
            tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url.as_str())).await
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracker.shutdown();
}

#[test]
fn a_connection_limit_the_descriptor_limit_cannot_hold_stops_the_start_with_both_numbers() {
    let mut cfg = config(2, 1);
    cfg.network.max_connections_per_worker = 1 << 40;
    let err = match tidepool_tracker::Tracker::start(cfg) {
        Ok(_) => panic!("started with more connections than descriptors"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("max_connections_per_worker = 1099511627776"),
        "{err}"
    );
    assert!(err.contains("may open only"), "{err}");
    // The default (0) takes what the limit allows and starts.
    let tracker = tidepool_tracker::Tracker::start(config(2, 1)).expect("default starts");
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_hold_no_buffers_and_a_partial_frame_holds_one_until_it_completes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = config_with_metrics();
    cfg.network.read_buffer_size = 16 * 1024;
    let tracker = start(cfg);
    let lent = "tidepool_connection_buffer_bytes{worker=\"0\"}";
    // Fifty clients announce, then stay connected and quiet.
    let mut idle = Vec::new();
    for i in 0..50u32 {
        let mut c = Client::connect(&tracker.url()).await;
        c.announce(&num_id(b'h', i % 5), &num_id(b'p', i), json!({}))
            .await;
        idle.push(c);
    }
    wait_for_sample(&tracker, lent, 0).await;
    // A raw client upgrades, then sends half of a frame and stops.
    let mut raw = tokio::net::TcpStream::connect(tracker.local_addr())
        .await
        .expect("connect");
    raw.set_nodelay(true).expect("nodelay");
    raw.write_all(
        b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .expect("upgrade");
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = raw.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed during the upgrade");
        head.extend_from_slice(&buf[..n]);
    }
    let payload = br#"{"action":"scrape","info_hash":"aaaaaaaaaaaaaaaaaaaa"}"#;
    let mask = [9u8, 8, 7, 6];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    raw.write_all(&frame[..20]).await.expect("half a frame");
    // One read buffer is lent while the frame is partial, and only to that connection.
    wait_for_sample(&tracker, lent, 16 * 1024).await;
    raw.write_all(&frame[20..]).await.expect("the rest");
    let n = raw.read(&mut buf).await.expect("scrape reply");
    assert!(n > 2 && buf[0] == 0x81, "a text frame answers the scrape");
    wait_for_sample(&tracker, lent, 0).await;
    drop(idle);
    tracker.shutdown();
}

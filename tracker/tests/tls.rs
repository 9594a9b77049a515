//! wss: the tracker serves TLS from PEM files; a client trusting the generated self-signed
//! certificate completes an offer/answer exchange over it.

mod common;

use common::*;
use serde_json::json;

fn tls_files() -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("self-signed certificate");
    let dir = std::env::temp_dir().join(format!(
        "tidepool-tls-{}-{}",
        std::process::id(),
        fastrand_suffix()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    (cert_path, key_path, cert.cert.der().to_vec())
}

fn fastrand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

async fn wss_client(url: &str, der: &[u8]) -> Client {
    Client::connect_wss(url, &[der]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_round_trip_with_offer_and_answer() {
    let (cert, key, der) = tls_files();
    let mut cfg = config(2, 1);
    cfg.network.tls_cert = Some(cert.clone());
    cfg.network.tls_key = Some(key);
    let tracker = start(cfg);
    assert!(tracker.url().starts_with("wss://"));
    let url = format!("wss://localhost:{}", tracker.local_addr().port());
    let mut a = wss_client(&url, &der).await;
    let mut b = wss_client(&url, &der).await;
    let h = num_id(b'h', 1);
    a.announce(&h, &num_id(b'a', 0), json!({})).await;
    b.send(announce_msg(
        &h,
        &num_id(b'b', 0),
        json!({"offers": offers(1, "tls")}),
    ))
    .await;
    assert_eq!(b.recv().await["incomplete"], json!(2));
    let offer = a.recv().await;
    assert!(
        offer["offer"]["sdp"]
            .as_str()
            .is_some_and(|s| s.contains("tls"))
    );
    a.send(announce_msg(&h, &num_id(b'a', 0), json!({"to_peer_id": num_id(b'b', 0), "offer_id": offer["offer_id"], "answer": {"type": "answer", "sdp": "ok"}}))).await;
    assert_eq!(b.recv().await["answer"]["sdp"], "ok");
    // A plain-text client cannot speak to the TLS port, and does not disturb it.
    let plain = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}", tracker.local_addr().port())),
    )
    .await
    .expect("answered");
    assert!(plain.is_err());
    assert!(a.scrape(json!(h)).await["files"][&h]["incomplete"] == json!(2));
    tracker.shutdown();
    let _ = std::fs::remove_dir_all(cert.parent().expect("dir"));
}

#[test]
fn bad_certificate_paths_fail_at_start_with_a_clear_error() {
    let mut cfg = config(1, 1);
    cfg.network.tls_cert = Some("/nonexistent/cert.pem".into());
    cfg.network.tls_key = Some("/nonexistent/key.pem".into());
    let err = tidepool_tracker::Tracker::start(cfg).expect_err("missing files");
    assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
}

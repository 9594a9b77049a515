//! Private pools over real sockets: tokens in the URL or a bearer header admit a connection;
//! missing, forged, foreign-key, expired, early and revoked tokens get HTTP 401 before the
//! upgrade (counted by reason); a token limits announces and scrapes to its pools and role;
//! a token that expires while connected closes its connection with 1008; reloads revoke and
//! rotate keys; a peer limit refuses connections past it.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use serde_json::json;
use tidepool_protocol::InfoHash;
use tidepool_tracker::Tracker;
use tidepool_tracker::auth::{Claims, Jwk, JwkSet, KeyKind, Role, SigningKey, unix_now};
use tokio_tungstenite::tungstenite::Error as WsError;

/// A pool and its info hash as a client sends it (20 latin1 code points).
fn pool(name: &str) -> (InfoHash, String) {
    let hash = InfoHash::of_pool(name);
    (hash, id(hash.0))
}

fn claims(pools: &[InfoHash], ttl: u64) -> Claims {
    Claims::new(pools.iter().map(InfoHash::to_hex).collect(), ttl)
}

/// Writes a key set of `keys` (public parts) and returns the file.
fn write_keys(dir: &std::path::Path, keys: &[&Jwk]) -> std::path::PathBuf {
    let path = dir.join("keys.jwks");
    JwkSet::public(keys).save(&path).expect("write keys");
    path
}

/// A tracker requiring tokens from `keys` (no clock leeway, so expiry is exact).
fn start_private(dir: &std::path::Path, keys: &[&Jwk]) -> Tracker {
    let mut cfg = config_with_metrics();
    cfg.auth.keys = Some(write_keys(dir, keys));
    cfg.auth.revoked = Some(dir.join("revoked.txt"));
    cfg.auth.leeway_secs = 0;
    std::fs::write(dir.join("revoked.txt"), "# none yet\n").expect("write");
    start(cfg)
}

fn signer(jwk: &Jwk) -> SigningKey {
    SigningKey::from_jwk(jwk).expect("signing key")
}

/// The HTTP status a refused handshake got.
async fn refused_status(url: &str, headers: &[(&'static str, &str)]) -> u16 {
    match Client::try_connect_with(url, headers).await {
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, the upgrade succeeded"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_and_bearer_tokens_admit_while_missing_forged_foreign_expired_and_early_ones_get_401()
{
    let dir = temp_dir("auth-401");
    let ed = Jwk::generate(KeyKind::EdDsa, "ed").expect("keygen");
    let hs = Jwk::generate(KeyKind::Hs256, "hs").expect("keygen");
    let tracker = start_private(&dir, &[&ed, &hs]);
    let url = tracker.url();
    let (hash, info_hash) = pool("private-1");

    // Both algorithms, both places a token travels.
    let t_ed = signer(&ed).issue(&claims(&[hash], 60)).expect("issue");
    let t_hs = signer(&hs).issue(&claims(&[hash], 60)).expect("issue");
    let mut a = Client::connect(&format!("{url}/?token={t_ed}")).await;
    let bearer = format!("Bearer {t_hs}");
    let mut b = Client::try_connect_with(&url, &[("authorization", &bearer)])
        .await
        .expect("bearer admitted");
    assert_eq!(
        a.announce(&info_hash, &num_id(b'p', 1), json!({})).await["incomplete"],
        json!(1)
    );
    assert_eq!(
        b.announce(&info_hash, &num_id(b'p', 2), json!({})).await["incomplete"],
        json!(2)
    );

    // What is refused, and why.
    let foreign = Jwk::generate(KeyKind::EdDsa, "ed").expect("keygen");
    let forged = signer(&foreign).issue(&claims(&[hash], 60)).expect("issue");
    let unknown_kid = signer(&Jwk::generate(KeyKind::EdDsa, "other").expect("keygen"))
        .issue(&claims(&[hash], 60))
        .expect("issue");
    let mut expired = claims(&[hash], 0);
    expired.exp = unix_now() - 10;
    let expired = signer(&ed).issue(&expired).expect("issue");
    let mut early = claims(&[hash], 600);
    early.nbf = Some(unix_now() + 300);
    let early = signer(&ed).issue(&early).expect("issue");
    for (token, why) in [
        (None, "missing"),
        (Some("not-a-jwt".to_owned()), "malformed"),
        (Some(forged), "bad_signature"),
        (Some(unknown_kid), "unknown_key"),
        (Some(expired), "expired"),
        (Some(early), "not_yet_valid"),
    ] {
        let target = match &token {
            Some(t) => format!("{url}/?token={t}"),
            None => url.clone(),
        };
        assert_eq!(refused_status(&target, &[]).await, 401, "{why}");
        let (_, _, text) = http_get(&tracker, "/metrics");
        assert_eq!(
            sample(
                &text,
                &format!("tidepool_auth_refusals_total{{reason=\"{why}\"}}")
            ),
            1,
            "{why}"
        );
    }
    let (_, _, text) = http_get(&tracker, "/metrics");
    assert_eq!(sample(&text, "tidepool_auth_accepted_total"), 2);
    assert_eq!(sample(&text, "tidepool_auth_keys"), 2);
    // The clients admitted before are served throughout.
    assert_eq!(
        a.scrape(json!(info_hash.clone())).await["files"][&info_hash]["incomplete"],
        json!(2)
    );
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_401_comes_before_any_upgrade_with_a_reason_and_a_bearer_challenge() {
    let dir = temp_dir("auth-raw");
    let ed = Jwk::generate(KeyKind::EdDsa, "ed").expect("keygen");
    let tracker = start_private(&dir, &[&ed]);
    let mut tcp = std::net::TcpStream::connect(tracker.local_addr()).expect("connect");
    tcp.set_read_timeout(Some(WAIT)).expect("timeout");
    tcp.write_all(
        b"GET /?token=a.b.c HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .expect("write");
    let mut response = String::new();
    tcp.read_to_string(&mut response).expect("read to close");
    assert!(
        response.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
        "{response}"
    );
    assert!(
        response.contains("WWW-Authenticate: Bearer\r\n"),
        "{response}"
    );
    assert!(response.ends_with("the token is malformed\n"), "{response}");
    assert!(!response.contains("101"), "{response}");
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_limits_announces_answers_and_scrapes_to_its_pools_and_role() {
    let dir = temp_dir("auth-pools");
    let ed = Jwk::generate(KeyKind::EdDsa, "ed").expect("keygen");
    let tracker = start_private(&dir, &[&ed]);
    let url = tracker.url();
    let (mine, mine_id) = pool("mine");
    let (_, theirs_id) = pool("theirs");
    let key = signer(&ed);

    let token = key.issue(&claims(&[mine], 60)).expect("issue");
    let mut c = Client::connect(&format!("{url}/?token={token}")).await;
    let refused = c.announce(&theirs_id, &num_id(b'p', 1), json!({})).await;
    assert_eq!(
        refused["failure reason"],
        json!("your token does not admit you to this pool")
    );
    assert_eq!(refused["info_hash"], json!(theirs_id));
    // The connection stays, and its own pool is served.
    assert_eq!(
        c.announce(&mine_id, &num_id(b'p', 1), json!({})).await["incomplete"],
        json!(1)
    );
    assert!(
        c.scrape(json!([mine_id.clone(), theirs_id.clone()])).await["failure reason"].is_string()
    );
    assert!(c.scrape(json!(null)).await["failure reason"].is_string());
    assert_eq!(
        c.scrape(json!(mine_id.clone())).await["files"][&mine_id]["incomplete"],
        json!(1)
    );
    // An answer addressed into a pool the token does not list is refused too.
    let answer = json!({"to_peer_id": num_id(b'p', 9), "offer_id": num_id(b'o', 1),
        "answer": {"type": "answer", "sdp": "v=0"}});
    assert!(c.announce(&theirs_id, &num_id(b'p', 1), answer).await["failure reason"].is_string());

    // Roles: a seed-only token may not announce as a leecher, a fetch-only one not as a seeder.
    let mut seed = claims(&[mine], 60);
    seed.role = Some(Role::Seed);
    let mut s = Client::connect(&format!(
        "{url}/?token={}",
        key.issue(&seed).expect("issue")
    ))
    .await;
    let leeching = s
        .announce(&mine_id, &num_id(b's', 1), json!({"left": 10}))
        .await;
    assert!(
        leeching["failure reason"]
            .as_str()
            .is_some_and(|r| r.contains("role")),
        "{leeching}"
    );
    assert_eq!(
        s.announce(&mine_id, &num_id(b's', 1), json!({"left": 0}))
            .await["complete"],
        json!(1)
    );
    let mut fetch = claims(&[mine], 60);
    fetch.role = Some(Role::Fetch);
    let mut f = Client::connect(&format!(
        "{url}/?token={}",
        key.issue(&fetch).expect("issue")
    ))
    .await;
    assert!(
        f.announce(&mine_id, &num_id(b'f', 1), json!({"left": 0}))
            .await["failure reason"]
            .is_string()
    );
    assert_eq!(
        f.announce(&mine_id, &num_id(b'f', 1), json!({"left": 5}))
            .await["incomplete"],
        json!(2)
    );

    // A fetch-only token cannot pass for a seeder with `completed` either, and may always
    // leave (a finished fetcher's `stopped` carries left 0).
    let completed = f
        .announce(
            &mine_id,
            &num_id(b'f', 1),
            json!({"left": 5, "event": "completed"}),
        )
        .await;
    assert!(completed["failure reason"].is_string(), "{completed}");
    let left = f
        .announce(
            &mine_id,
            &num_id(b'f', 1),
            json!({"left": 0, "event": "stopped"}),
        )
        .await;
    assert!(left["failure reason"].is_null(), "{left}");

    // A token for every pool.
    let any = Claims::new(vec!["*".into()], 60);
    let mut all =
        Client::connect(&format!("{url}/?token={}", key.issue(&any).expect("issue"))).await;
    assert_eq!(
        all.announce(&theirs_id, &num_id(b'a', 1), json!({})).await["incomplete"],
        json!(1)
    );
    let (_, _, text) = http_get(&tracker, "/metrics");
    assert_eq!(
        sample(&text, "tidepool_errors_total{kind=\"token_pool\"}"),
        4
    );
    assert_eq!(
        sample(&text, "tidepool_errors_total{kind=\"token_role\"}"),
        3
    );
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_while_connected_closes_its_connection_with_1008() {
    let dir = temp_dir("auth-expiry");
    let ed = Jwk::generate(KeyKind::EdDsa, "ed").expect("keygen");
    let tracker = start_private(&dir, &[&ed]);
    let (hash, info_hash) = pool("short-lived");
    let key = signer(&ed);
    let short = key.issue(&claims(&[hash], 2)).expect("issue");
    let long = key.issue(&claims(&[hash], 600)).expect("issue");
    let mut soon = Client::connect(&format!("{}/?token={short}", tracker.url())).await;
    let mut stays = Client::connect(&format!("{}/?token={long}", tracker.url())).await;
    assert!(soon.announce(&info_hash, &num_id(b'p', 1), json!({})).await["incomplete"].is_number());
    let opened = std::time::Instant::now();
    assert_eq!(soon.closed().await, Some(1008));
    let after = opened.elapsed();
    assert!(
        after <= Duration::from_secs(4),
        "closed {after:?} after the announce"
    );
    wait_for_sample(
        &tracker,
        "tidepool_connections_closed_total{reason=\"token_expired\"}",
        1,
    )
    .await;
    assert_eq!(
        stays
            .announce(&info_hash, &num_id(b'p', 2), json!({}))
            .await["incomplete"],
        json!(1),
        "the expired peer left the swarm; the other is served"
    );
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_revoke_tokens_and_rotate_keys_closing_connections_they_no_longer_admit() {
    let dir = temp_dir("auth-reload");
    let k1 = Jwk::generate(KeyKind::EdDsa, "k1").expect("keygen");
    let k2 = Jwk::generate(KeyKind::EdDsa, "k2").expect("keygen");
    let tracker = start_private(&dir, &[&k1]);
    let url = tracker.url();
    let (hash, info_hash) = pool("rotating");
    let revoked_claims = claims(&[hash], 600);
    let jti = revoked_claims.jti.clone().expect("jti");
    let revoked = signer(&k1).issue(&revoked_claims).expect("issue");
    let old = signer(&k1).issue(&claims(&[hash], 600)).expect("issue");
    let new = signer(&k2).issue(&claims(&[hash], 600)).expect("issue");
    let mut r = Client::connect(&format!("{url}/?token={revoked}")).await;
    let mut o = Client::connect(&format!("{url}/?token={old}")).await;
    assert_eq!(
        refused_status(&format!("{url}/?token={new}"), &[]).await,
        401
    );

    // Revocation: the open connection is closed, and the token is refused from then on.
    std::fs::write(dir.join("revoked.txt"), format!("{jti}  # leaked\n")).expect("write");
    tracker.reload_auth().expect("reload");
    assert_eq!(r.closed().await, Some(1008));
    assert_eq!(
        refused_status(&format!("{url}/?token={revoked}"), &[]).await,
        401
    );
    assert!(o.announce(&info_hash, &num_id(b'o', 1), json!({})).await["incomplete"].is_number());

    // Rotation: k2 added, both work; k1 removed, its connections close.
    write_keys(&dir, &[&k1, &k2]);
    tracker.reload_auth().expect("reload");
    let mut n = Client::connect(&format!("{url}/?token={new}")).await;
    assert!(o.announce(&info_hash, &num_id(b'o', 1), json!({})).await["incomplete"].is_number());
    write_keys(&dir, &[&k2]);
    tracker.reload_auth().expect("reload");
    assert_eq!(o.closed().await, Some(1008));
    assert_eq!(
        n.announce(&info_hash, &num_id(b'n', 1), json!({})).await["incomplete"],
        json!(1)
    );
    // A broken key file keeps the keys in force.
    std::fs::write(dir.join("keys.jwks"), "{\"keys\": [{\"kty\": \"RSA\"}]}").expect("write");
    assert!(tracker.reload_auth().is_err());
    let mut again = Client::connect(&format!("{url}/?token={new}")).await;
    assert!(
        again
            .announce(&info_hash, &num_id(b'n', 2), json!({}))
            .await["incomplete"]
            .is_number()
    );
    // A key replaced under the same id: what the old material admitted is closed.
    let k2_again = Jwk::generate(KeyKind::EdDsa, "k2").expect("keygen");
    write_keys(&dir, &[&k2_again]);
    tracker.reload_auth().expect("reload");
    assert_eq!(again.closed().await, Some(1008));
    assert_eq!(n.closed().await, Some(1008));
    let (_, _, text) = http_get(&tracker, "/metrics");
    assert_eq!(sample(&text, "tidepool_auth_reload_failures_total"), 1);
    assert_eq!(
        sample(
            &text,
            "tidepool_connections_closed_total{reason=\"token_revoked\"}"
        ),
        4
    );
    assert_eq!(
        sample(&text, "tidepool_auth_refusals_total{reason=\"revoked\"}"),
        1
    );
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_limit_refuses_connections_past_it_with_429_and_a_close_frees_a_place() {
    let dir = temp_dir("auth-peers");
    let ed = Jwk::generate(KeyKind::EdDsa, "ed").expect("keygen");
    let tracker = start_private(&dir, &[&ed]);
    let (hash, _) = pool("limited");
    let mut limited = claims(&[hash], 600);
    limited.peers = Some(2);
    let token = signer(&ed).issue(&limited).expect("issue");
    let url = format!("{}/?token={token}", tracker.url());
    let a = Client::connect(&url).await;
    let _b = Client::connect(&url).await;
    // Temporary, so 429 (clients retry it), not the final 401.
    assert_eq!(refused_status(&url, &[]).await, 429);
    drop(a);
    // The close reaches the tracker asynchronously: retry until the place is free.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match Client::try_connect_with(&url, &[]).await {
            Ok(_) => break,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the place never came free: {e}"),
        }
    }
    let (_, _, text) = http_get(&tracker, "/metrics");
    assert!(sample(&text, "tidepool_auth_refusals_total{reason=\"peer_limit\"}") >= 1);
    tracker.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_no_token_is_asked_for_and_a_token_is_ignored() {
    let tracker = start(config(1, 1));
    let (_, info_hash) = pool("public");
    let mut c = Client::connect(&format!("{}/?token=whatever", tracker.url())).await;
    assert_eq!(
        c.announce(&info_hash, &num_id(b'p', 1), json!({})).await["incomplete"],
        json!(1)
    );
    tracker.shutdown();
}

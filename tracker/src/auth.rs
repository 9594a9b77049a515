//! Signed tokens for private pools: verification keys (a JWK set), the claims a token carries,
//! what a verified token grants a connection, and the key generation and issuing behind
//! `tidepool-tracker token`. JWT parsing and claim validation are `jsonwebtoken`'s; the
//! signatures (Ed25519, HMAC-SHA-2) are `ring`'s, through the provider below.
//!
//! A token is checked once, when the connection's upgrade request arrives; afterwards the
//! connection carries a [`Grant`] and each announce costs one lookup in it.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ahash::{AHashMap, AHashSet};
use base64::Engine as _;
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::SecureRandom as _;
use serde::{Deserialize, Serialize};
use tidepool_protocol::InfoHash;

/// Most verification keys in one key set (each one is a few dozen bytes).
const MAX_KEYS: usize = 256;
/// Most entries in a revocation list.
const MAX_REVOKED: usize = 1_000_000;
/// Most pools one token may list (a token rides in an 8 KiB request head anyway).
const MAX_POOLS: usize = 256;

/// The role a token may restrict its bearer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May announce only as a seeder (`left` = 0): serves, never fetches.
    Seed,
    /// May announce only as a leecher (`left` > 0): fetches; once complete it is no longer
    /// announced.
    Fetch,
}

/// The claims of a tidepool token (a JWT's payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Expiry, seconds since the Unix epoch (required).
    pub exp: u64,
    /// Not valid before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Token id: what a revocation list names, and what the peer limit counts by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// Who it was issued to (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The pools (info hashes, 40 hex digits) the bearer may join; `"*"` for every pool.
    pub pools: Vec<String>,
    /// Restricts announces to seeding or to fetching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Most connections open at once with this token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<u32>,
}

impl Claims {
    /// Claims for `pools` (40-hex info hashes, or `"*"`), valid from now for `ttl_secs`, with
    /// a random `jti` and no role or peer limit.
    pub fn new(pools: Vec<String>, ttl_secs: u64) -> Self {
        let now = unix_now();
        Self {
            exp: now.saturating_add(ttl_secs),
            nbf: None,
            iat: Some(now),
            jti: Some(random_jti()),
            sub: None,
            pools,
            role: None,
            peers: None,
        }
    }
}

/// Which pools a grant admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pools {
    /// Every pool (`"*"`).
    Any,
    /// These info hashes (sorted).
    Listed(Box<[InfoHash]>),
}

/// What a verified token lets its connection do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The pools it may announce and scrape in.
    pub pools: Pools,
    /// Seeding or fetching only.
    pub role: Option<Role>,
    /// When the connection must close (Unix seconds, the clock leeway included).
    pub expires: u64,
    /// The key it was signed with.
    pub kid: Option<Arc<str>>,
    /// A fingerprint of that key's material, so a reload that replaces a key under the same
    /// id (or without one) still closes the connections it admitted.
    pub key: u64,
    /// What identifies the token: its `jti`, else its signature.
    pub id: Arc<str>,
    /// Most connections open at once with this token.
    pub peers: Option<u32>,
}

/// Why the announce of a granted connection is refused, with the reason sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The pool is not among the token's.
    Pool,
    /// A seed-only token announced as a leecher, or a fetch-only one as a seeder.
    Role,
}

impl Denied {
    /// The client-facing failure reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Pool => "your token does not admit you to this pool",
            Self::Role => "your token does not allow this role in the pool (seed or fetch only)",
        }
    }
}

impl Grant {
    /// Whether the token lists `info_hash`.
    pub fn admits(&self, info_hash: &InfoHash) -> bool {
        match &self.pools {
            Pools::Any => true,
            Pools::Listed(list) => list.binary_search(info_hash).is_ok(),
        }
    }

    /// Whether an announce into `info_hash` (as a seeder or not) is allowed.
    pub fn check_announce(&self, info_hash: &InfoHash, seeder: bool) -> Result<(), Denied> {
        if !self.admits(info_hash) {
            return Err(Denied::Pool);
        }
        match (self.role, seeder) {
            (Some(Role::Seed), false) | (Some(Role::Fetch), true) => Err(Denied::Role),
            _ => Ok(()),
        }
    }
}

/// Why a token was refused (each is a `reason` label on the refusal counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No token in the request.
    Missing,
    /// Not a JWT, or its claims are not tidepool's.
    Malformed,
    /// Signed with a key id (or algorithm) this tracker does not hold.
    UnknownKey,
    /// The signature does not verify.
    BadSignature,
    /// Past its `exp`.
    Expired,
    /// Before its `nbf`.
    NotYetValid,
    /// On the revocation list.
    Revoked,
    /// As many connections as its `peers` claim allows are already open.
    PeerLimit,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Refused {}

impl Refused {
    /// Every reason, in the order of [`Refused::index`].
    pub const ALL: [Refused; 8] = [
        Self::Missing,
        Self::Malformed,
        Self::UnknownKey,
        Self::BadSignature,
        Self::Expired,
        Self::NotYetValid,
        Self::Revoked,
        Self::PeerLimit,
    ];

    /// What the client is told (the body of the 401).
    pub fn message(self) -> &'static str {
        match self {
            Self::Missing => "a token is required: ?token=… in the URL or Authorization: Bearer",
            Self::Malformed => "the token is malformed",
            Self::UnknownKey => "the token's key is unknown to this tracker",
            Self::BadSignature => "the token's signature is invalid",
            Self::Expired => "the token has expired",
            Self::NotYetValid => "the token is not valid yet",
            Self::Revoked => "the token was revoked",
            Self::PeerLimit => "the token's peer limit is reached",
        }
    }

    /// The metric label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Revoked => "revoked",
            Self::PeerLimit => "peer_limit",
        }
    }

    /// Position in [`Refused::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// Why a key set, revocation list or signing key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file's content is wrong.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Signing failed.
    #[error("signing the token: {0}")]
    Sign(String),
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn invalid(path: &Path, reason: impl Into<String>) -> KeyError {
    KeyError::Invalid {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// One key as a JSON Web Key (RFC 7517/8037): `OKP`/`Ed25519` with `x` (and `d`, the private
/// seed, in an issuer's file) for EdDSA, or `oct` with `k` for HMAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// `OKP` or `oct`.
    pub kty: String,
    /// `Ed25519` for `OKP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// Ed25519 public key, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// Ed25519 private seed, base64url (issuer's file only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d: Option<String>,
    /// HMAC secret, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<String>,
    /// Key id: tokens name it in their header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// `EdDSA`, `HS256`, `HS384` or `HS512`.
    pub alg: String,
}

/// A set of keys, as tracker configs hold them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JwkSet {
    /// The keys.
    pub keys: Vec<Jwk>,
}

impl JwkSet {
    /// The public parts of `keys`.
    pub fn public(keys: &[&Jwk]) -> Self {
        Self {
            keys: keys.iter().map(|k| k.public()).collect(),
        }
    }

    /// Writes the set to `path` whole (a temporary file renamed over it, so a crash never
    /// leaves half a set), readable by its owner only: HMAC keys in it are secrets.
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let fail = |e: std::io::Error| KeyError::Read {
            path: path.display().to_string(),
            source: e,
        };
        let text = serde_json::to_string_pretty(self).map_err(|e| invalid(path, e.to_string()))?;
        let tmp = path.with_extension("jwks.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(fail)?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.write_all(b"\n"))
            .and_then(|()| file.sync_all())
            .map_err(fail)?;
        std::fs::rename(&tmp, path).map_err(fail)
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .ok()
}

/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410): the seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The algorithm families `token keygen` makes keys for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// Ed25519 signatures: the tracker holds only the public key.
    EdDsa,
    /// HMAC-SHA-256: the tracker and the issuer share one secret.
    Hs256,
}

impl Jwk {
    /// A new random key with id `kid` (private: `d` for EdDSA, `k` for HMAC).
    pub fn generate(kind: KeyKind, kid: &str) -> Result<Self, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let mut secret = [0u8; 32];
        rng.fill(&mut secret)
            .map_err(|_| KeyError::Sign("the system random source failed".into()))?;
        Ok(match kind {
            KeyKind::EdDsa => {
                let pair = ed25519_pair(&secret)
                    .ok_or_else(|| KeyError::Sign("Ed25519 key generation failed".into()))?;
                Self {
                    kty: "OKP".into(),
                    crv: Some("Ed25519".into()),
                    x: Some(b64(ring::signature::KeyPair::public_key(&pair).as_ref())),
                    d: Some(b64(&secret)),
                    k: None,
                    kid: Some(kid.into()),
                    alg: "EdDSA".into(),
                }
            }
            KeyKind::Hs256 => Self {
                kty: "oct".into(),
                crv: None,
                x: None,
                d: None,
                k: Some(b64(&secret)),
                kid: Some(kid.into()),
                alg: "HS256".into(),
            },
        })
    }

    /// The part a tracker needs: the public key for EdDSA; the secret itself for HMAC.
    pub fn public(&self) -> Self {
        Self {
            d: None,
            ..self.clone()
        }
    }

    fn algorithm(&self) -> Option<Algorithm> {
        match (self.kty.as_str(), self.alg.as_str()) {
            ("OKP", "EdDSA") if self.crv.as_deref() == Some("Ed25519") => Some(Algorithm::EdDSA),
            ("oct", "HS256") => Some(Algorithm::HS256),
            ("oct", "HS384") => Some(Algorithm::HS384),
            ("oct", "HS512") => Some(Algorithm::HS512),
            _ => None,
        }
    }

    fn decoding_key(&self) -> Result<(Algorithm, DecodingKey), String> {
        let alg = self.algorithm().ok_or_else(|| {
            format!(
                "key {:?}: only OKP/Ed25519 with alg EdDSA and oct with alg HS256/384/512 are \
                 supported (kty {:?}, alg {:?})",
                self.kid, self.kty, self.alg
            )
        })?;
        let bytes = match alg {
            Algorithm::EdDSA => self.x.as_deref().and_then(unb64).filter(|x| x.len() == 32),
            // RFC 7518 §3.2: a secret at least as long as the hash.
            _ => self.k.as_deref().and_then(unb64).filter(|k| {
                k.len()
                    >= match alg {
                        Algorithm::HS384 => 48,
                        Algorithm::HS512 => 64,
                        _ => 32,
                    }
            }),
        }
        .ok_or_else(|| {
            format!(
                "key {:?}: `x` must be a 32-byte Ed25519 public key and `k` an HMAC secret at \
                 least as long as its hash (32, 48 or 64 bytes), base64url",
                self.kid
            )
        })?;
        Ok((
            alg,
            if alg == Algorithm::EdDSA {
                DecodingKey::from_ed_der(&bytes)
            } else {
                DecodingKey::from_secret(&bytes).map_err(|e| e.to_string())?
            },
        ))
    }
}

fn ed25519_pair(seed: &[u8]) -> Option<ring::signature::Ed25519KeyPair> {
    let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
    pkcs8.extend_from_slice(seed);
    ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).ok()
}

/// A private key an issuer signs with.
#[derive(Debug)]
pub struct SigningKey {
    kid: Option<String>,
    alg: Algorithm,
    key: EncodingKey,
}

impl SigningKey {
    /// Reads an issuer's key file (a JWK with `d` or `k`, as `token keygen` writes it).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let jwk: Jwk = serde_json::from_str(&read(path)?)
            .map_err(|e| invalid(path, format!("not a JSON Web Key: {e}")))?;
        Self::from_jwk(&jwk).map_err(|reason| invalid(path, reason))
    }

    /// The signing key of a private JWK.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, String> {
        let alg = jwk.algorithm().ok_or("unsupported key type or algorithm")?;
        let key = if alg == Algorithm::EdDSA {
            let seed = jwk
                .d
                .as_deref()
                .and_then(unb64)
                .filter(|d| d.len() == 32)
                .ok_or("an EdDSA signing key needs `d`, its 32-byte private seed")?;
            let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
            pkcs8.extend_from_slice(&seed);
            EncodingKey::from_ed_der(&pkcs8)
        } else {
            let secret = jwk
                .k
                .as_deref()
                .and_then(unb64)
                .ok_or("an HMAC key needs `k`")?;
            EncodingKey::from_secret(&secret).map_err(|e| e.to_string())?
        };
        Ok(Self {
            kid: jwk.kid.clone(),
            alg,
            key,
        })
    }

    /// Signs `claims` into a token.
    pub fn issue(&self, claims: &Claims) -> Result<String, KeyError> {
        install_provider();
        let mut header = Header::new(self.alg);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| KeyError::Sign(e.to_string()))
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random token id (16 bytes, base64url).
pub fn random_jti() -> String {
    let mut id = [0u8; 16];
    // A failed system random source leaves zeros: the id is then only less unique.
    let _ = ring::rand::SystemRandom::new().fill(&mut id);
    b64(&id)
}

/// What the tracker verifies tokens with: keys by id, the revocation list, the clock leeway.
#[derive(Debug, Default)]
pub struct Verifier {
    keys: AHashMap<Option<String>, (Algorithm, DecodingKey, u64)>,
    /// The keys' fingerprints, for re-checking open connections after a reload.
    prints: AHashSet<u64>,
    revoked: AHashSet<String>,
    leeway: u64,
}

impl Verifier {
    /// Loads the key set (a JWK set file, or one JWK) and the revocation list (one token id
    /// per line, `#` comments), refusing the whole file on any bad entry.
    pub fn load(keys: &Path, revoked: Option<&Path>, leeway: u64) -> Result<Self, KeyError> {
        let text = read(keys)?;
        let set: JwkSet = serde_json::from_str::<JwkSet>(&text)
            .or_else(|_| serde_json::from_str::<Jwk>(&text).map(|k| JwkSet { keys: vec![k] }))
            .map_err(|e| invalid(keys, format!("not a JWK set or a JWK: {e}")))?;
        let mut v = Self::from_set(&set, leeway).map_err(|reason| invalid(keys, reason))?;
        if let Some(path) = revoked {
            v.revoked = load_revoked(path)?;
        }
        Ok(v)
    }

    /// A verifier holding `set`'s keys.
    pub fn from_set(set: &JwkSet, leeway: u64) -> Result<Self, String> {
        if set.keys.is_empty() {
            return Err("the key set holds no key".into());
        }
        if set.keys.len() > MAX_KEYS {
            return Err(format!("more than {MAX_KEYS} keys"));
        }
        let mut keys = AHashMap::new();
        for jwk in &set.keys {
            let (alg, key) = jwk.decoding_key()?;
            let print = fingerprint(alg, &key);
            if keys.insert(jwk.kid.clone(), (alg, key, print)).is_some() {
                return Err(format!("key id {:?} appears twice", jwk.kid));
            }
        }
        if keys.len() > 1 && keys.contains_key(&None) {
            return Err("with several keys, each needs a `kid`".into());
        }
        Ok(Self {
            prints: keys.values().map(|(_, _, print)| *print).collect(),
            keys,
            revoked: AHashSet::new(),
            leeway,
        })
    }

    /// Keys held.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Token ids revoked.
    pub fn revoked_count(&self) -> usize {
        self.revoked.len()
    }

    /// Verifies `token` at `now` (Unix seconds): signature, expiry, not-before, revocation,
    /// and that its claims are tidepool's.
    pub fn verify(&self, token: &str, now: u64) -> Result<Grant, Refused> {
        install_provider();
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refused::Malformed)?;
        let (alg, key, print) = match self.keys.get(&header.kid) {
            Some(k) => k,
            // A token without a kid is tried against the only key, if there is one.
            None if header.kid.is_none() && self.keys.len() == 1 => {
                self.keys.values().next().ok_or(Refused::UnknownKey)?
            }
            None => return Err(Refused::UnknownKey),
        };
        if header.alg != *alg {
            return Err(Refused::UnknownKey);
        }
        let mut validation = Validation::new(*alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e
            .kind()
        {
            JwtErrorKind::InvalidSignature => Refused::BadSignature,
            JwtErrorKind::ExpiredSignature => Refused::Expired,
            JwtErrorKind::ImmatureSignature => Refused::NotYetValid,
            JwtErrorKind::InvalidAlgorithm => Refused::UnknownKey,
            _ => Refused::Malformed,
        })?;
        let claims = data.claims;
        // jsonwebtoken reads the clock itself; check against ours too, so tests and the
        // expiry timer agree with what was accepted.
        if claims.exp.saturating_add(self.leeway) <= now {
            return Err(Refused::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(self.leeway))
        {
            return Err(Refused::NotYetValid);
        }
        let id: Arc<str> = match &claims.jti {
            Some(jti) => jti.as_str().into(),
            None => token.rsplit('.').next().unwrap_or_default().into(),
        };
        if self.revoked.contains(&*id) {
            return Err(Refused::Revoked);
        }
        Ok(Grant {
            pools: parse_pools(&claims.pools).ok_or(Refused::Malformed)?,
            role: claims.role,
            expires: claims.exp.saturating_add(self.leeway),
            kid: header.kid.map(Into::into),
            key: *print,
            id,
            peers: claims.peers,
        })
    }

    /// Whether a connection admitted with `grant` would still be admitted under this key set
    /// and revocation list (used after a reload, to close revoked connections).
    pub fn still_admits(&self, grant: &Grant) -> bool {
        self.prints.contains(&grant.key) && !self.revoked.contains(&*grant.id)
    }
}

/// The tracker's token state: the verifier (swapped whole on reload) and the connections
/// open per token id, for tokens with a `peers` claim (an entry lives only while a connection
/// holds it, so the map is bounded by the connection limit).
#[derive(Debug)]
pub(crate) struct SharedAuth {
    pub(crate) verifier: crate::access::Swap<Verifier>,
    /// A hash of the files last loaded (0: none), so unchanged files are not swapped in.
    pub(crate) loaded: std::sync::atomic::AtomicU64,
    in_use: std::sync::Mutex<AHashMap<Arc<str>, u32>>,
}

impl SharedAuth {
    pub(crate) fn new(verifier: Verifier) -> Self {
        Self {
            verifier: crate::access::Swap::new(verifier),
            loaded: std::sync::atomic::AtomicU64::new(0),
            in_use: std::sync::Mutex::new(AHashMap::new()),
        }
    }

    /// Counts one more connection for `grant`'s token; false when its `peers` limit is
    /// reached. Call [`SharedAuth::release`] when that connection closes.
    pub(crate) fn acquire(&self, grant: &Grant) -> bool {
        let Some(limit) = grant.peers else {
            return true;
        };
        let mut in_use = self.in_use.lock().unwrap_or_else(|p| p.into_inner());
        let n = in_use.entry(grant.id.clone()).or_insert(0);
        if *n >= limit {
            if *n == 0 {
                in_use.remove(&grant.id);
            }
            return false;
        }
        *n += 1;
        true
    }

    /// Releases what [`SharedAuth::acquire`] counted.
    pub(crate) fn release(&self, grant: &Grant) {
        if grant.peers.is_none() {
            return;
        }
        let mut in_use = self.in_use.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = in_use.get_mut(&grant.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                in_use.remove(&grant.id);
            }
        }
    }

    /// Tokens counted against a peer limit now.
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.in_use.lock().map(|m| m.len()).unwrap_or_default()
    }
}

/// The first 8 bytes of SHA-256 over a key's algorithm and material.
fn fingerprint(alg: Algorithm, key: &DecodingKey) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(format!("{alg:?}").as_bytes());
    ctx.update(key.try_get_as_bytes().unwrap_or_default());
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_le_bytes(first)
}

fn parse_pools(pools: &[String]) -> Option<Pools> {
    if pools.len() > MAX_POOLS || pools.is_empty() {
        return None;
    }
    if pools.iter().any(|p| p == "*") {
        return Some(Pools::Any);
    }
    let mut list = pools
        .iter()
        .map(|p| InfoHash::from_hex(p))
        .collect::<Option<Vec<_>>>()?;
    list.sort_unstable();
    list.dedup();
    Some(Pools::Listed(list.into_boxed_slice()))
}

fn load_revoked(path: &Path) -> Result<AHashSet<String>, KeyError> {
    let text = read(path)?;
    let mut set = AHashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        if line.len() > 512 || line.contains(char::is_whitespace) {
            return Err(invalid(path, format!("line {}: not a token id", i + 1)));
        }
        if set.len() >= MAX_REVOKED {
            return Err(invalid(path, format!("more than {MAX_REVOKED} entries")));
        }
        set.insert(line.to_owned());
    }
    Ok(set)
}

/// Installs the ring-backed provider once per process (a provider installed earlier by an
/// embedding program stays).
fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = RING.install_default();
    });
}

static RING: CryptoProvider = CryptoProvider {
    signer_factory: ring_signer,
    verifier_factory: ring_verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

fn provider_error(what: &str) -> jsonwebtoken::errors::Error {
    JwtErrorKind::Provider(what.into()).into()
}

fn ring_signer(
    alg: &Algorithm,
    key: &EncodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    Ok(match (alg, key.family()) {
        (Algorithm::EdDSA, AlgorithmFamily::Ed) => Box::new(EdSigner(
            ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(key.as_bytes())
                .map_err(|_| JwtErrorKind::InvalidEddsaKey)?,
        )),
        (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512, AlgorithmFamily::Hmac) => {
            Box::new(Hmac(
                *alg,
                ring::hmac::Key::new(hmac_algorithm(*alg), key.as_bytes()),
            ))
        }
        _ => return Err(provider_error("unsupported algorithm or key")),
    })
}

fn ring_verifier(
    alg: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    let bytes = key.try_get_as_bytes()?;
    Ok(match (alg, key.family()) {
        (Algorithm::EdDSA, AlgorithmFamily::Ed) => Box::new(EdVerifier(bytes.to_vec())),
        (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512, AlgorithmFamily::Hmac) => {
            Box::new(Hmac(
                *alg,
                ring::hmac::Key::new(hmac_algorithm(*alg), bytes),
            ))
        }
        _ => return Err(provider_error("unsupported algorithm or key")),
    })
}

fn hmac_algorithm(alg: Algorithm) -> ring::hmac::Algorithm {
    match alg {
        Algorithm::HS384 => ring::hmac::HMAC_SHA384,
        Algorithm::HS512 => ring::hmac::HMAC_SHA512,
        _ => ring::hmac::HMAC_SHA256,
    }
}

struct EdSigner(ring::signature::Ed25519KeyPair);

impl signature::Signer<Vec<u8>> for EdSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(self.0.sign(msg).as_ref().to_vec())
    }
}

impl JwtSigner for EdSigner {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

struct EdVerifier(Vec<u8>);

impl signature::Verifier<Vec<u8>> for EdVerifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.0)
            .verify(msg, sig)
            .map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for EdVerifier {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

struct Hmac(Algorithm, ring::hmac::Key);

impl signature::Signer<Vec<u8>> for Hmac {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(ring::hmac::sign(&self.1, msg).as_ref().to_vec())
    }
}

impl signature::Verifier<Vec<u8>> for Hmac {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        // Constant-time comparison (ring's).
        ring::hmac::verify(&self.1, msg, sig).map_err(|_| signature::Error::new())
    }
}

impl JwtSigner for Hmac {
    fn algorithm(&self) -> Algorithm {
        self.0
    }
}

impl JwtVerifier for Hmac {
    fn algorithm(&self) -> Algorithm {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(pools: &[&str], exp: u64) -> Claims {
        Claims {
            exp,
            nbf: None,
            iat: None,
            jti: Some("t1".into()),
            sub: None,
            pools: pools.iter().map(|p| (*p).to_owned()).collect(),
            role: None,
            peers: None,
        }
    }

    fn pair(kind: KeyKind, kid: &str) -> (SigningKey, Verifier) {
        let private = Jwk::generate(kind, kid).expect("keygen");
        let signer = SigningKey::from_jwk(&private).expect("signing key");
        let set = JwkSet {
            keys: vec![private.public()],
        };
        (signer, Verifier::from_set(&set, 0).expect("verifier"))
    }

    const POOL: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn eddsa_and_hmac_tokens_verify_and_grant_their_pools() {
        let now = unix_now();
        for kind in [KeyKind::EdDsa, KeyKind::Hs256] {
            let (signer, verifier) = pair(kind, "k1");
            let token = signer.issue(&claims(&[POOL], now + 60)).expect("issue");
            let grant = verifier.verify(&token, now).expect("valid");
            let pool = InfoHash::from_hex(POOL).expect("hex");
            assert!(grant.admits(&pool));
            assert!(!grant.admits(&InfoHash([7; 20])));
            assert_eq!(grant.expires, now + 60);
            assert_eq!(&*grant.id, "t1");
        }
    }

    #[test]
    fn tampered_foreign_expired_early_and_revoked_tokens_are_refused_by_reason() {
        let now = unix_now();
        let (signer, verifier) = pair(KeyKind::EdDsa, "k1");
        let (other, _) = pair(KeyKind::EdDsa, "k1");
        let token = signer.issue(&claims(&[POOL], now + 60)).expect("issue");
        // Flip one character of the payload.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let flipped = if parts[1].ends_with('A') { 'B' } else { 'A' };
        parts[1].pop();
        parts[1].push(flipped);
        assert_eq!(
            verifier.verify(&parts.join("."), now),
            Err(Refused::BadSignature)
        );
        let forged = other.issue(&claims(&["*"], now + 60)).expect("issue");
        assert_eq!(verifier.verify(&forged, now), Err(Refused::BadSignature));
        let expired = signer.issue(&claims(&[POOL], now - 1)).expect("issue");
        assert_eq!(verifier.verify(&expired, now), Err(Refused::Expired));
        let mut early = claims(&[POOL], now + 60);
        early.nbf = Some(now + 30);
        let early = signer.issue(&early).expect("issue");
        assert_eq!(verifier.verify(&early, now), Err(Refused::NotYetValid));
        assert_eq!(verifier.verify("not a token", now), Err(Refused::Malformed));
        assert_eq!(verifier.verify("a.b.c", now), Err(Refused::Malformed));
        let bad_pool = signer.issue(&claims(&["xyz"], now + 60)).expect("issue");
        assert_eq!(verifier.verify(&bad_pool, now), Err(Refused::Malformed));
        let (unknown, _) = pair(KeyKind::EdDsa, "k2");
        let unknown = unknown.issue(&claims(&[POOL], now + 60)).expect("issue");
        assert_eq!(verifier.verify(&unknown, now), Err(Refused::UnknownKey));
        let mut revoking = verifier;
        revoking.revoked.insert("t1".into());
        assert_eq!(revoking.verify(&token, now), Err(Refused::Revoked));
    }

    #[test]
    fn an_hmac_token_cannot_pass_for_an_eddsa_key_or_the_reverse() {
        // alg confusion: a token signed HS256 with the Ed25519 public key as secret.
        let now = unix_now();
        let ed = Jwk::generate(KeyKind::EdDsa, "k1").expect("keygen");
        let verifier = Verifier::from_set(
            &JwkSet {
                keys: vec![ed.public()],
            },
            0,
        )
        .expect("v");
        let public = unb64(ed.x.as_deref().expect("x")).expect("b64");
        let confused = SigningKey {
            kid: Some("k1".into()),
            alg: Algorithm::HS256,
            key: EncodingKey::from_secret(&public).expect("secret"),
        };
        let token = confused.issue(&claims(&["*"], now + 60)).expect("issue");
        assert_eq!(verifier.verify(&token, now), Err(Refused::UnknownKey));
        // The reverse: an EdDSA token under the id of an HMAC key.
        let hs = Jwk::generate(KeyKind::Hs256, "k1").expect("keygen");
        let hs_verifier = Verifier::from_set(
            &JwkSet {
                keys: vec![hs.public()],
            },
            0,
        )
        .expect("v");
        let ed_token = SigningKey::from_jwk(&ed)
            .expect("signer")
            .issue(&claims(&["*"], now + 60))
            .expect("issue");
        assert_eq!(hs_verifier.verify(&ed_token, now), Err(Refused::UnknownKey));
        // alg "none" is not among jsonwebtoken's algorithms at all.
        let none = format!("{}.{}.", b64(br#"{"alg":"none","kid":"k1"}"#), b64(b"{}"));
        assert_eq!(verifier.verify(&none, now), Err(Refused::Malformed));
    }

    #[test]
    fn a_token_listing_more_pools_than_the_bound_is_refused() {
        let now = unix_now();
        let (signer, verifier) = pair(KeyKind::Hs256, "k1");
        let many: Vec<String> = (0..=MAX_POOLS as u32)
            .map(|i| {
                InfoHash::from(i.to_le_bytes().repeat(5).try_into().unwrap_or([0; 20])).to_hex()
            })
            .collect();
        let token = signer.issue(&Claims::new(many, 60)).expect("issue");
        assert_eq!(verifier.verify(&token, now), Err(Refused::Malformed));
        let fits = signer
            .issue(&Claims::new(vec![POOL.into(); MAX_POOLS], 60))
            .expect("issue");
        assert!(verifier.verify(&fits, now).is_ok());
    }

    #[test]
    fn roles_restrict_seeding_and_fetching() {
        let pool = InfoHash::from_hex(POOL).expect("hex");
        let mut grant = Grant {
            pools: Pools::Listed(vec![pool].into_boxed_slice()),
            role: Some(Role::Seed),
            expires: 0,
            kid: None,
            key: 0,
            id: "x".into(),
            peers: None,
        };
        assert_eq!(grant.check_announce(&pool, true), Ok(()));
        assert_eq!(grant.check_announce(&pool, false), Err(Denied::Role));
        grant.role = Some(Role::Fetch);
        assert_eq!(grant.check_announce(&pool, false), Ok(()));
        assert_eq!(grant.check_announce(&pool, true), Err(Denied::Role));
        assert_eq!(
            grant.check_announce(&InfoHash([1; 20]), false),
            Err(Denied::Pool)
        );
    }

    #[test]
    fn peer_limits_count_open_connections_and_forget_closed_ones() {
        let auth = SharedAuth::new(Verifier::default());
        let grant = Grant {
            pools: Pools::Any,
            role: None,
            expires: 0,
            kid: None,
            key: 0,
            id: "x".into(),
            peers: Some(2),
        };
        assert!(auth.acquire(&grant) && auth.acquire(&grant));
        assert!(!auth.acquire(&grant));
        auth.release(&grant);
        assert!(auth.acquire(&grant));
        auth.release(&grant);
        auth.release(&grant);
        assert_eq!(auth.tracked(), 0);
        let none = Grant {
            peers: Some(0),
            ..grant
        };
        assert!(!auth.acquire(&none));
        assert_eq!(auth.tracked(), 0);
    }

    #[test]
    fn key_sets_refuse_duplicates_unsupported_keys_and_short_secrets() {
        let a = Jwk::generate(KeyKind::EdDsa, "a").expect("keygen").public();
        let set = |keys: Vec<Jwk>| Verifier::from_set(&JwkSet { keys }, 0).map(|_| ());
        assert!(set(vec![a.clone(), a.clone()]).is_err());
        assert!(set(vec![]).is_err());
        let mut rsa = a.clone();
        rsa.kty = "RSA".into();
        rsa.alg = "RS256".into();
        assert!(set(vec![rsa]).is_err());
        let mut short = Jwk::generate(KeyKind::Hs256, "h").expect("keygen");
        short.k = Some(b64(b"short"));
        assert!(set(vec![short]).is_err());
        let mut unnamed = a.clone();
        unnamed.kid = None;
        assert!(set(vec![a, unnamed]).is_err());
    }
}

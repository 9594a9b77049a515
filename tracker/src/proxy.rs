//! Client addresses behind reverse proxies, and the per-address connection limit that uses
//! them. Forwarding headers are believed only from configured proxy addresses.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Mutex;

use ahash::AHashMap;

/// An address block such as `10.0.0.0/8`, `::1/128` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` lies in this block (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IP address or CIDR block");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl serde::Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether `ip` is one of the trusted proxies.
pub(crate) fn is_trusted(proxies: &[IpNet], ip: IpAddr) -> bool {
    proxies.iter().any(|net| net.contains(ip))
}

/// The client behind a trusted proxy. `X-Forwarded-For` is read right to left, skipping
/// trusted proxies, so addresses a client wrote into the header itself are never believed;
/// `X-Real-IP` is the fallback for proxies that set only that.
pub(crate) fn forwarded_client(
    proxies: &[IpNet],
    forwarded_for: Option<&str>,
    real_ip: Option<&str>,
) -> Option<IpAddr> {
    if let Some(list) = forwarded_for {
        let mut last = None;
        for hop in list.rsplit(',') {
            let ip: IpAddr = hop.trim().parse().ok()?;
            last = Some(ip);
            if !is_trusted(proxies, ip) {
                return Some(ip);
            }
        }
        // Every hop is a trusted proxy: the leftmost is the best we know.
        return last;
    }
    real_ip.and_then(|s| s.trim().parse().ok())
}

/// Open connections per client address, shared by all socket workers.
#[derive(Debug)]
pub(crate) struct IpLimiter {
    max: u32,
    open: Mutex<AHashMap<IpAddr, u32>>,
}

impl IpLimiter {
    /// `max == 0` turns the limit off (and the map is never touched).
    pub(crate) fn new(max: u32) -> Self {
        Self {
            max,
            open: Mutex::new(AHashMap::new()),
        }
    }

    /// Counts a connection from `ip`; false (and nothing counted) when it is over the limit.
    pub(crate) fn acquire(&self, ip: IpAddr) -> bool {
        if self.max == 0 {
            return true;
        }
        let Ok(mut open) = self.open.lock() else {
            return true;
        };
        let n = open.entry(ip.to_canonical()).or_insert(0);
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    /// Forgets a connection counted by [`IpLimiter::acquire`].
    pub(crate) fn release(&self, ip: IpAddr) {
        if self.max == 0 {
            return;
        }
        if let Ok(mut open) = self.open.lock() {
            let ip = ip.to_canonical();
            if let Some(n) = open.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("valid")).collect()
    }

    #[test]
    fn cidr_blocks_match_their_addresses_only() {
        let n: IpNet = "10.1.0.0/16".parse().expect("valid");
        assert!(n.contains("10.1.200.3".parse().expect("ip")));
        assert!(!n.contains("10.2.0.1".parse().expect("ip")));
        assert!(
            n.contains("::ffff:10.1.0.9".parse().expect("ip")),
            "v4-mapped"
        );
        let one: IpNet = "::1".parse().expect("valid");
        assert!(one.contains("::1".parse().expect("ip")));
        assert!(!one.contains("::2".parse().expect("ip")));
        let all: IpNet = "0.0.0.0/0".parse().expect("valid");
        assert!(all.contains("203.0.113.7".parse().expect("ip")));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("example.com".parse::<IpNet>().is_err());
    }

    #[test]
    fn forwarded_for_skips_trusted_hops_and_ignores_client_written_entries() {
        let proxies = nets(&["10.0.0.0/8"]);
        let got = |xff, real| forwarded_client(&proxies, xff, real).map(|ip| ip.to_string());
        // The client claimed 1.1.1.1; the proxy appended the address it really saw.
        assert_eq!(
            got(Some("1.1.1.1, 203.0.113.9"), None).as_deref(),
            Some("203.0.113.9")
        );
        assert_eq!(
            got(Some("203.0.113.9, 10.0.0.2"), None).as_deref(),
            Some("203.0.113.9")
        );
        assert_eq!(
            got(None, Some(" 198.51.100.4 ")).as_deref(),
            Some("198.51.100.4")
        );
        assert_eq!(got(Some("garbage"), None), None);
        assert_eq!(got(None, None), None);
    }

    #[test]
    fn limiter_counts_per_address_and_frees_on_release() {
        let l = IpLimiter::new(2);
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        assert!(l.acquire(a) && l.acquire(a));
        assert!(!l.acquire(a));
        assert!(l.acquire(b));
        l.release(a);
        assert!(l.acquire(a));
        assert!(IpLimiter::new(0).acquire(a));
    }
}

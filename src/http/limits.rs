//! Connection caps: how many WebSockets may be open at once, in all and per client
//! address. A handshake over a cap is answered before the upgrade, with 503 (the server
//! is full) or 429 (this address has too many), both with `Retry-After`.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Shared by every handshake; created once per server.
#[derive(Debug)]
pub(crate) struct ConnectionLimits {
    /// One permit per open WebSocket.
    global: Arc<Semaphore>,
    /// The configured global maximum, for logs.
    max: usize,
    /// Open WebSockets per address, when a per-address cap is set.
    per_ip: Option<Arc<PerIp>>,
}

#[derive(Debug)]
struct PerIp {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// A WebSocket's place under the caps; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct Admission {
    _global: OwnedSemaphorePermit,
    _per_ip: Option<IpSlot>,
}

#[derive(Debug)]
struct IpSlot {
    ip: IpAddr,
    per_ip: Arc<PerIp>,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self
            .per_ip
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Why a handshake was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// The global cap is reached: 503.
    Server,
    /// This address has its maximum open: 429.
    Address,
}

impl ConnectionLimits {
    /// Caps of `max` WebSockets in all and, if set, `per_ip` per client address.
    pub(crate) fn new(max: usize, per_ip: Option<usize>) -> Self {
        Self {
            global: Arc::new(Semaphore::new(max)),
            max,
            per_ip: per_ip.map(|max| {
                Arc::new(PerIp {
                    max,
                    open: Mutex::new(HashMap::new()),
                })
            }),
        }
    }

    /// The global maximum.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Takes a place for a WebSocket from `ip`, or says which cap is reached.
    pub(crate) fn admit(&self, ip: Option<IpAddr>) -> Result<Admission, Full> {
        let per_ip = match (&self.per_ip, ip) {
            (Some(per_ip), Some(ip)) => {
                let mut open = per_ip
                    .open
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let count = open.entry(ip).or_insert(0);
                if *count >= per_ip.max {
                    return Err(Full::Address);
                }
                *count += 1;
                Some(IpSlot {
                    ip,
                    per_ip: Arc::clone(per_ip),
                })
            }
            _ => None,
        };
        // On failure `per_ip` drops here and gives its place back.
        let global = Arc::clone(&self.global)
            .try_acquire_owned()
            .map_err(|_| Full::Server)?;
        Ok(Admission {
            _global: global,
            _per_ip: per_ip,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));
    const B: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)));

    #[test]
    fn global_cap_frees_a_place_when_an_admission_drops() {
        let limits = ConnectionLimits::new(1, None);
        let first = limits.admit(A).unwrap();
        assert_eq!(limits.admit(B).unwrap_err(), Full::Server);
        drop(first);
        assert!(limits.admit(B).is_ok());
    }

    #[test]
    fn per_address_cap_counts_each_address_apart() {
        let limits = ConnectionLimits::new(10, Some(2));
        let _a1 = limits.admit(A).unwrap();
        let a2 = limits.admit(A).unwrap();
        assert_eq!(limits.admit(A).unwrap_err(), Full::Address);
        assert!(limits.admit(B).is_ok());
        drop(a2);
        assert!(limits.admit(A).is_ok());
    }

    #[test]
    fn refusal_by_the_global_cap_gives_back_the_address_place() {
        let limits = ConnectionLimits::new(1, Some(1));
        let _held = limits.admit(B).unwrap();
        assert_eq!(limits.admit(A).unwrap_err(), Full::Server);
        drop(_held);
        assert!(
            limits.admit(A).is_ok(),
            "A's failed attempt left no count behind"
        );
    }
}

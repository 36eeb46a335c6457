//! A bounded in-process store with TTLs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use courier_core::{Error, Result};

use crate::store::{Begin, IdempotencyStore, LeaseToken};

#[derive(Debug)]
enum Status {
    InProgress { token: LeaseToken, until: Instant },
    Completed { result: Option<Bytes> },
}

#[derive(Debug)]
struct Record {
    fingerprint: String,
    status: Status,
    expires_at: Instant,
}

/// An in-process store (one process only; for tests, the memory backend and single-instance
/// services). Bounded: beyond `capacity` keys, expired records are dropped first, then the
/// records closest to expiry.
#[derive(Debug)]
pub struct MemoryStore {
    records: Mutex<HashMap<String, Record>>,
    capacity: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(1_000_000)
    }
}

impl MemoryStore {
    /// A store holding at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        MemoryStore {
            records: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// Keys currently recorded.
    pub fn len(&self) -> usize {
        self.records.lock().len()
    }

    /// Whether no key is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn make_room(map: &mut HashMap<String, Record>, capacity: usize, now: Instant) {
        if map.len() < capacity {
            return;
        }
        map.retain(|_, r| r.expires_at > now);
        if map.len() >= capacity {
            let mut by_expiry: Vec<(Instant, String)> = map
                .iter()
                .filter(|(_, r)| matches!(r.status, Status::Completed { .. }))
                .map(|(k, r)| (r.expires_at, k.clone()))
                .collect();
            by_expiry.sort();
            let excess = map.len() + 1 - capacity;
            for (_, k) in by_expiry.into_iter().take(excess) {
                map.remove(&k);
            }
        }
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn begin(&self, key: &str, fingerprint: &str, lease: Duration) -> Result<Begin> {
        let now = Instant::now();
        let mut map = self.records.lock();
        if let Some(r) = map.get_mut(key) {
            if r.expires_at > now {
                if r.fingerprint != fingerprint {
                    return Err(Error::IdempotencyConflict {
                        key: key.to_owned(),
                        stored: r.fingerprint.clone(),
                        received: fingerprint.to_owned(),
                    });
                }
                match &r.status {
                    Status::Completed { result } => {
                        return Ok(Begin::Completed {
                            result: result.clone(),
                        })
                    }
                    Status::InProgress { until, .. } if *until > now => {
                        return Ok(Begin::InProgress {
                            retry_after: *until - now,
                        })
                    }
                    Status::InProgress { .. } => {} // lease expired: take over below
                }
            }
        }
        Self::make_room(&mut map, self.capacity, now);
        let token = LeaseToken::new();
        map.insert(
            key.to_owned(),
            Record {
                fingerprint: fingerprint.to_owned(),
                status: Status::InProgress {
                    token: token.clone(),
                    until: now + lease,
                },
                expires_at: now + lease,
            },
        );
        Ok(Begin::Begun(token))
    }

    async fn extend(&self, key: &str, token: &LeaseToken, lease: Duration) -> Result<bool> {
        let now = Instant::now();
        let mut map = self.records.lock();
        match map.get_mut(key) {
            Some(Record {
                status: Status::InProgress { token: t, until },
                expires_at,
                ..
            }) if t == token => {
                *until = now + lease;
                *expires_at = now + lease;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: &LeaseToken,
        fingerprint: &str,
        result: Option<Bytes>,
        ttl: Duration,
    ) -> Result<bool> {
        let now = Instant::now();
        let mut map = self.records.lock();
        let held = matches!(map.get(key), Some(Record { status: Status::InProgress { token: t, .. }, .. }) if t == token);
        let already_completed = matches!(map.get(key), Some(r) if matches!(r.status, Status::Completed { .. }) && r.expires_at > now);
        if !already_completed {
            map.insert(
                key.to_owned(),
                Record {
                    fingerprint: fingerprint.to_owned(),
                    status: Status::Completed { result },
                    expires_at: now + ttl,
                },
            );
        }
        Ok(held)
    }

    async fn release(&self, key: &str, token: &LeaseToken) -> Result<()> {
        let mut map = self.records.lock();
        if matches!(map.get(key), Some(Record { status: Status::InProgress { token: t, .. }, .. }) if t == token)
        {
            map.remove(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lifecycle() {
        let s = MemoryStore::default();
        let lease = Duration::from_secs(5);
        let Begin::Begun(t) = s.begin("k", "fp", lease).await.unwrap() else {
            panic!()
        };
        assert!(matches!(
            s.begin("k", "fp", lease).await.unwrap(),
            Begin::InProgress { .. }
        ));
        assert!(matches!(
            s.begin("k", "other", lease).await.unwrap_err(),
            Error::IdempotencyConflict { .. }
        ));
        assert!(s.extend("k", &t, lease).await.unwrap());
        s.release("k", &t).await.unwrap();
        let Begin::Begun(t2) = s.begin("k", "fp", lease).await.unwrap() else {
            panic!()
        };
        assert!(s
            .complete(
                "k",
                &t2,
                "fp",
                Some(Bytes::from_static(b"r")),
                Duration::from_secs(60)
            )
            .await
            .unwrap());
        assert_eq!(
            s.begin("k", "fp", lease).await.unwrap(),
            Begin::Completed {
                result: Some(Bytes::from_static(b"r"))
            }
        );
    }

    #[tokio::test]
    async fn expired_lease_is_taken_over() {
        let s = MemoryStore::default();
        let Begin::Begun(t1) = s.begin("k", "fp", Duration::from_millis(1)).await.unwrap() else {
            panic!()
        };
        std::thread::sleep(Duration::from_millis(5));
        let Begin::Begun(_t2) = s.begin("k", "fp", Duration::from_secs(5)).await.unwrap() else {
            panic!()
        };
        assert!(
            !s.extend("k", &t1, Duration::from_secs(5)).await.unwrap(),
            "old lease is lost"
        );
    }

    #[tokio::test]
    async fn bounded() {
        let s = MemoryStore::new(10);
        for i in 0..100 {
            let key = format!("k{i}");
            let Begin::Begun(t) = s.begin(&key, "fp", Duration::from_secs(5)).await.unwrap() else {
                panic!()
            };
            s.complete(&key, &t, "fp", None, Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert!(s.len() <= 10);
    }
}

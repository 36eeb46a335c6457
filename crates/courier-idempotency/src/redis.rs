//! Redis store: one string per key. The hot path is two plain commands — `SET … NX PX` claims
//! a key, `SET … PX … GET` completes it — so a message costs Redis no script run; extending and
//! releasing a lease (compare-then-act on the holder's token) are small Lua scripts. The key's
//! expiry is the lease while in progress and the TTL once completed.
//!
//! Record layout (the value of the key):
//!
//! - in progress: `p<token length>:<token><fingerprint>`
//! - completed: `c<fingerprint length>:<fingerprint>0`, or `…1<result bytes>` with a stored result
//!
//! Keys written as hashes by courier before this layout (`s`, `f`, `r`, `t` fields) are still
//! read by `begin`, so completed keys from before an upgrade keep absorbing their duplicates.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::Script;

use courier_core::{Error, Result};

use crate::store::{Begin, IdempotencyStore, LeaseToken};

/// Extend the lease if the caller's token still holds it (ARGV[1] = the record's token prefix).
const EXTEND: &str = r#"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Delete the key if the caller's token still holds it.
const RELEASE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// The oldest Redis with `SET … GET` (used to complete a key and learn who held it, in one step).
const MIN_VERSION: (u32, u32) = (6, 2);

/// An idempotency store in Redis (`redis://` or `rediss://`; Redis 6.2 or later, or a
/// compatible server such as Valkey). Every call is bounded by `op_timeout` (default 2 s), so
/// an unreachable Redis becomes a store error quickly.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    op_timeout: Duration,
    scripts: std::sync::Arc<Scripts>,
}

/// The scripts, hashed once (EVALSHA; loaded again when Redis has forgotten them).
struct Scripts {
    extend: Script,
    release: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn store_err(operation: &'static str, e: impl Into<courier_core::BoxError>) -> Error {
    Error::Store {
        store: "redis",
        operation,
        source: e.into(),
    }
}

/// `major.minor` of an `INFO server` reply's `redis_version`.
fn server_version(info: &str) -> Option<(u32, u32)> {
    let v = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))?
        .trim();
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// The start of a record held by `token`: `p<len>:<token>`.
fn holder_prefix(token: &LeaseToken) -> Vec<u8> {
    format!("p{}:{}", token.0.len(), token.0).into_bytes()
}

fn in_progress(token: &LeaseToken, fingerprint: &str) -> Vec<u8> {
    let mut v = holder_prefix(token);
    v.extend_from_slice(fingerprint.as_bytes());
    v
}

fn completed(fingerprint: &str, result: Option<&Bytes>) -> Vec<u8> {
    let mut v = format!("c{}:{fingerprint}", fingerprint.len()).into_bytes();
    match result {
        Some(r) => {
            v.push(b'1');
            v.extend_from_slice(r);
        }
        None => v.push(b'0'),
    }
    v
}

/// The `s`, `f` and `r` fields of a key in the earlier hash layout.
type HashFields = (Option<String>, Option<String>, Option<Vec<u8>>);

/// A record read back.
#[derive(Debug, PartialEq)]
enum Record {
    InProgress {
        fingerprint: String,
    },
    Completed {
        fingerprint: String,
        result: Option<Bytes>,
    },
}

/// Split `<len>:<rest>` into the `len` bytes after the colon and what follows them.
fn counted(v: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = v.iter().position(|&b| b == b':')?;
    let len: usize = std::str::from_utf8(&v[..colon]).ok()?.parse().ok()?;
    let rest = &v[colon + 1..];
    (rest.len() >= len).then(|| rest.split_at(len))
}

fn decode(v: &[u8]) -> Option<Record> {
    let (&state, body) = v.split_first()?;
    let (first, rest) = counted(body)?;
    match state {
        b'p' => Some(Record::InProgress {
            fingerprint: String::from_utf8_lossy(rest).into_owned(),
        }),
        b'c' => {
            let (&flag, result) = rest.split_first()?;
            Some(Record::Completed {
                fingerprint: String::from_utf8_lossy(first).into_owned(),
                result: (flag == b'1').then(|| Bytes::copy_from_slice(result)),
            })
        }
        _ => None,
    }
}

impl RedisStore {
    /// Connect to `url` (credentials in it are never printed). A server that reports a version
    /// older than Redis 6.2 is a configuration error.
    pub async fn connect(url: &str) -> Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::config(format!("invalid redis URL: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(1);
        let mut conn = tokio::time::timeout(
            Duration::from_secs(5),
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| store_err("connect", "timed out"))?
        .map_err(|e| store_err("connect", e))?;
        // A server that answers INFO with a version older than 6.2 is refused; one that does not
        // say (INFO renamed away, a proxy in front) is let through with a warning.
        let info: redis::RedisResult<String> = tokio::time::timeout(
            Duration::from_secs(5),
            redis::cmd("INFO").arg("server").query_async(&mut conn),
        )
        .await
        .map_err(|_| store_err("connect", "INFO timed out"))?;
        match info.ok().as_deref().and_then(server_version) {
            Some(v) if v < MIN_VERSION => {
                return Err(Error::config(format!(
                    "the Redis idempotency store needs Redis {}.{} or later (SET … GET); the server reports {}.{}",
                    MIN_VERSION.0, MIN_VERSION.1, v.0, v.1,
                )))
            }
            Some(_) => {}
            None => tracing::warn!(
                "could not read the Redis server's version (INFO server): the idempotency store needs Redis 6.2 or later"
            ),
        }
        Ok(RedisStore {
            conn,
            prefix: "courier:idem:".into(),
            op_timeout: Duration::from_secs(2),
            scripts: std::sync::Arc::new(Scripts {
                extend: Script::new(EXTEND),
                release: Script::new(RELEASE),
            }),
        })
    }

    /// Prefix of the Redis keys (default `courier:idem:`).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    fn rkey(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Run one command or pipeline, bounded by `op_timeout`; Redis's own error is left to the
    /// caller to look at.
    async fn bounded<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<redis::RedisResult<T>> {
        tokio::time::timeout(self.op_timeout, f)
            .await
            .map_err(|_| store_err(op, "timed out"))
    }

    /// Run one command or pipeline, bounded by `op_timeout`.
    async fn query<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        self.bounded(op, f).await?.map_err(|e| store_err(op, e))
    }

    async fn script(
        &self,
        op: &'static str,
        script: &Script,
        key: &str,
        args: &[&[u8]],
    ) -> Result<i64> {
        let mut inv = script.key(self.rkey(key));
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.conn.clone();
        self.query(op, inv.invoke_async(&mut conn)).await
    }

    /// Read a key someone else holds or completed: its record and time left. `None` when it is
    /// gone (expired since).
    async fn read(&self, rkey: &str) -> Result<Option<(Record, i64)>> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.get(rkey).pttl(rkey);
        let got: redis::RedisResult<(Option<Vec<u8>>, i64)> =
            self.bounded("begin", pipe.query_async(&mut conn)).await?;
        let (value, pttl) = match got {
            Err(e) if e.code() == Some("WRONGTYPE") => return self.read_hash(rkey).await,
            Err(e) => return Err(store_err("begin", e)),
            Ok(v) => v,
        };
        match value {
            None => Ok(None),
            Some(v) => match decode(&v) {
                Some(r) => Ok(Some((r, pttl))),
                None => Err(store_err(
                    "begin",
                    format!("{rkey} holds a value that is not an idempotency record"),
                )),
            },
        }
    }

    /// A key in the hash layout of earlier courier versions.
    async fn read_hash(&self, rkey: &str) -> Result<Option<(Record, i64)>> {
        let mut conn = self.conn.clone();
        let ((state, fingerprint, result), pttl): (HashFields, i64) = self
            .query(
                "begin",
                redis::pipe()
                    .hget(rkey, &["s", "f", "r"])
                    .pttl(rkey)
                    .query_async(&mut conn),
            )
            .await?;
        let fingerprint = fingerprint.unwrap_or_default();
        Ok(match state.as_deref() {
            Some("c") => Some((
                Record::Completed {
                    fingerprint,
                    result: result.map(Bytes::from),
                },
                pttl,
            )),
            Some(_) => Some((Record::InProgress { fingerprint }, pttl)),
            None => None,
        })
    }
}

fn ms(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn begin(&self, key: &str, fingerprint: &str, lease: Duration) -> Result<Begin> {
        let rkey = self.rkey(key);
        let token = LeaseToken::new();
        let value = in_progress(&token, fingerprint);
        // A key that expires between the failed claim and the read is claimed again; three
        // rounds of that in a row would take a lease as short as a round trip.
        for _ in 0..3 {
            let mut conn = self.conn.clone();
            let claimed: Option<String> = self
                .query(
                    "begin",
                    redis::cmd("SET")
                        .arg(&rkey)
                        .arg(&value)
                        .arg("NX")
                        .arg("PX")
                        .arg(ms(lease))
                        .query_async(&mut conn),
                )
                .await?;
            if claimed.is_some() {
                return Ok(Begin::Begun(token));
            }
            let Some((record, pttl)) = self.read(&rkey).await? else {
                continue;
            };
            let (Record::InProgress {
                fingerprint: stored,
            }
            | Record::Completed {
                fingerprint: stored,
                ..
            }) = &record;
            if stored != fingerprint {
                return Err(Error::IdempotencyConflict {
                    key: key.to_owned(),
                    stored: stored.clone(),
                    received: fingerprint.to_owned(),
                });
            }
            return Ok(match record {
                Record::Completed { result, .. } => Begin::Completed { result },
                Record::InProgress { .. } => Begin::InProgress {
                    retry_after: Duration::from_millis(pttl.max(1) as u64),
                },
            });
        }
        Err(store_err(
            "begin",
            format!("{rkey} kept expiring between claim and read"),
        ))
    }

    fn claims_in_batches(&self) -> bool {
        true
    }

    /// One pipeline of `SET … NX PX`, one per key: one round trip for the whole batch.
    async fn claim_many(
        &self,
        keys: &[(&str, &str)],
        lease: Duration,
    ) -> Result<Vec<Option<LeaseToken>>> {
        let tokens: Vec<LeaseToken> = keys.iter().map(|_| LeaseToken::new()).collect();
        let mut pipe = redis::pipe();
        for ((key, fingerprint), token) in keys.iter().zip(&tokens) {
            pipe.cmd("SET")
                .arg(self.rkey(key))
                .arg(in_progress(token, fingerprint))
                .arg("NX")
                .arg("PX")
                .arg(ms(lease));
        }
        let mut conn = self.conn.clone();
        let claimed: Vec<Option<String>> = self.query("begin", pipe.query_async(&mut conn)).await?;
        if claimed.len() != tokens.len() {
            return Err(store_err(
                "begin",
                format!(
                    "{} replies to a pipeline of {} claims",
                    claimed.len(),
                    tokens.len()
                ),
            ));
        }
        Ok(claimed
            .into_iter()
            .zip(tokens)
            .map(|(ok, token)| ok.map(|_| token))
            .collect())
    }

    async fn extend(&self, key: &str, token: &LeaseToken, lease: Duration) -> Result<bool> {
        let n = self
            .script(
                "extend",
                &self.scripts.extend,
                key,
                &[&holder_prefix(token), ms(lease).to_string().as_bytes()],
            )
            .await?;
        Ok(n == 1)
    }

    async fn complete(
        &self,
        key: &str,
        token: &LeaseToken,
        fingerprint: &str,
        result: Option<Bytes>,
        ttl: Duration,
    ) -> Result<bool> {
        let rkey = self.rkey(key);
        let mut conn = self.conn.clone();
        let previous: Option<Vec<u8>> = self
            .query(
                "complete",
                redis::cmd("SET")
                    .arg(&rkey)
                    .arg(completed(fingerprint, result.as_ref()))
                    .arg("PX")
                    .arg(ms(ttl))
                    .arg("GET")
                    .query_async(&mut conn),
            )
            .await?;
        match previous {
            // Another worker completed the key first (this one had lost its lease): its record
            // stands, result included.
            Some(v) if v.first() == Some(&b'c') => {
                let mut conn = self.conn.clone();
                let () = self
                    .query(
                        "complete",
                        redis::cmd("SET")
                            .arg(&rkey)
                            .arg(v)
                            .arg("PX")
                            .arg(ms(ttl))
                            .query_async(&mut conn),
                    )
                    .await?;
                Ok(false)
            }
            Some(v) => Ok(v.starts_with(&holder_prefix(token))),
            None => Ok(false),
        }
    }

    async fn release(&self, key: &str, token: &LeaseToken) -> Result<()> {
        self.script(
            "release",
            &self.scripts.release,
            key,
            &[&holder_prefix(token)],
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let t = LeaseToken::new();
        assert_eq!(
            decode(&in_progress(&t, "fp:with:colons")),
            Some(Record::InProgress {
                fingerprint: "fp:with:colons".into()
            })
        );
        assert!(in_progress(&t, "fp").starts_with(&holder_prefix(&t)));
        assert!(!in_progress(&LeaseToken::new(), "fp").starts_with(&holder_prefix(&t)));
        let r = Bytes::from_static(b"1:receipt\x00\xff");
        assert_eq!(
            decode(&completed("fp", Some(&r))),
            Some(Record::Completed {
                fingerprint: "fp".into(),
                result: Some(r)
            })
        );
        assert_eq!(
            decode(&completed("", None)),
            Some(Record::Completed {
                fingerprint: "".into(),
                result: None
            })
        );
        for bad in [&b""[..], b"x3:abc0", b"c9:abc0", b"c3abc0", b"cx:abc0"] {
            assert_eq!(decode(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn versions_are_read_from_info() {
        assert_eq!(
            server_version("# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n"),
            Some((7, 0))
        );
        assert_eq!(server_version("redis_version:6.2.0"), Some((6, 2)));
        assert!(server_version("redis_version:6.0.9").unwrap() < MIN_VERSION);
        assert_eq!(server_version("# Server\r\n"), None);
    }
}

//! Redis store: one hash per key, claimed and completed atomically by Lua scripts; the key's
//! expiry is the lease while in progress and the TTL once completed.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::Script;

use courier_core::{Error, Result};

use crate::store::{Begin, IdempotencyStore, LeaseToken};

const BEGIN: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 's', 'f')
if cur[1] then
  if cur[2] ~= ARGV[1] then return {'conflict', cur[2]} end
  if cur[1] == 'c' then
    local r = redis.call('HGET', KEYS[1], 'r')
    if r then return {'completed', '1', r} end
    return {'completed', '0', ''}
  end
  return {'progress', tostring(redis.call('PTTL', KEYS[1]))}
end
redis.call('HSET', KEYS[1], 's', 'p', 'f', ARGV[1], 't', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {'begun'}
"#;

const EXTEND: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 's', 't')
if cur[1] == 'p' and cur[2] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

const COMPLETE: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 's', 't')
if cur[1] == 'c' then return 0 end
local held = 0
if cur[1] == 'p' and cur[2] == ARGV[1] then held = 1 end
redis.call('DEL', KEYS[1])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 's', 'c', 'f', ARGV[2], 'r', ARGV[5])
else
  redis.call('HSET', KEYS[1], 's', 'c', 'f', ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return held
"#;

const RELEASE: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 's', 't')
if cur[1] == 'p' and cur[2] == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// An idempotency store in Redis (`redis://` or `rediss://`). Every call is bounded by
/// `op_timeout` (default 2 s), so an unreachable Redis becomes a store error quickly.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    op_timeout: Duration,
    scripts: std::sync::Arc<Scripts>,
}

/// The scripts, hashed once (EVALSHA; loaded on first use).
struct Scripts {
    begin: Script,
    extend: Script,
    complete: Script,
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

impl RedisStore {
    /// Connect to `url` (credentials in it are never printed).
    pub async fn connect(url: &str) -> Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| Error::config(format!("invalid redis URL: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| store_err("connect", "timed out"))?
        .map_err(|e| store_err("connect", e))?;
        Ok(RedisStore {
            conn,
            prefix: "courier:idem:".into(),
            op_timeout: Duration::from_secs(2),
            scripts: std::sync::Arc::new(Scripts {
                begin: Script::new(BEGIN),
                extend: Script::new(EXTEND),
                complete: Script::new(COMPLETE),
                release: Script::new(RELEASE),
            }),
        })
    }

    /// Prefix of the Redis keys (default `courier:idem:`).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        script: &Script,
        key: &str,
        args: &[Vec<u8>],
    ) -> Result<T> {
        let mut inv = script.key(format!("{}{key}", self.prefix));
        for a in args {
            inv.arg(a.as_slice());
        }
        let mut conn = self.conn.clone();
        tokio::time::timeout(self.op_timeout, inv.invoke_async(&mut conn))
            .await
            .map_err(|_| store_err(op, "timed out"))?
            .map_err(|e| store_err(op, e))
    }
}

fn ms(d: Duration) -> Vec<u8> {
    d.as_millis().max(1).to_string().into_bytes()
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn begin(&self, key: &str, fingerprint: &str, lease: Duration) -> Result<Begin> {
        let token = LeaseToken::new();
        let out: Vec<Vec<u8>> = self
            .run(
                "begin",
                &self.scripts.begin,
                key,
                &[
                    fingerprint.as_bytes().to_vec(),
                    token.0.as_bytes().to_vec(),
                    ms(lease),
                ],
            )
            .await?;
        let tag = out
            .first()
            .map(|t| String::from_utf8_lossy(t).into_owned())
            .unwrap_or_default();
        match tag.as_str() {
            "begun" => Ok(Begin::Begun(token)),
            "conflict" => Err(Error::IdempotencyConflict {
                key: key.to_owned(),
                stored: out
                    .get(1)
                    .map(|f| String::from_utf8_lossy(f).into_owned())
                    .unwrap_or_default(),
                received: fingerprint.to_owned(),
            }),
            "completed" => Ok(Begin::Completed {
                result: (out.get(1).map(Vec::as_slice) == Some(b"1"))
                    .then(|| Bytes::from(out.get(2).cloned().unwrap_or_default())),
            }),
            "progress" => {
                let pttl: i64 = out
                    .get(1)
                    .and_then(|v| String::from_utf8_lossy(v).parse().ok())
                    .unwrap_or(100);
                Ok(Begin::InProgress {
                    retry_after: Duration::from_millis(pttl.max(1) as u64),
                })
            }
            other => Err(store_err(
                "begin",
                format!("unexpected script reply {other:?}"),
            )),
        }
    }

    async fn extend(&self, key: &str, token: &LeaseToken, lease: Duration) -> Result<bool> {
        let n: i64 = self
            .run(
                "extend",
                &self.scripts.extend,
                key,
                &[token.0.as_bytes().to_vec(), ms(lease)],
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
        let has = if result.is_some() {
            b"1".to_vec()
        } else {
            b"0".to_vec()
        };
        let n: i64 = self
            .run(
                "complete",
                &self.scripts.complete,
                key,
                &[
                    token.0.as_bytes().to_vec(),
                    fingerprint.as_bytes().to_vec(),
                    ms(ttl),
                    has,
                    result.map(|r| r.to_vec()).unwrap_or_default(),
                ],
            )
            .await?;
        Ok(n == 1)
    }

    async fn release(&self, key: &str, token: &LeaseToken) -> Result<()> {
        let _: i64 = self
            .run(
                "release",
                &self.scripts.release,
                key,
                &[token.0.as_bytes().to_vec()],
            )
            .await?;
        Ok(())
    }
}

//! The Redis store of the rate limits, shared by every replica pointed at one Redis: the GCRA
//! of `limits::gcra` runs atomically in Redis (one Lua script, `EVALSHA`, Redis's own clock),
//! keys hash-tagged by principal (`mofa:{k:<name>}:...`) or model (`mofa:{m:<model>}:...`) so
//! that one script call's keys share a Redis Cluster slot. `max_parallel` is a sorted set of leases that expire ([`LEASE_TTL`])
//! unless the replica holding them renews them: a replica that dies frees its places.
//!
//! Every round trip has a timeout. A failure marks Redis down (logged once); a health task
//! pings it and marks it up again (logged once); meanwhile `redis_failure` applies (the
//! caller's). It must never log the URL (it may hold a password) nor block the runtime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Outcome, Plan, Slot, LEASE_TTL};
use crate::config::RedisFailure;
use crate::limits::{Denial, Dim, Status};

/// The one script. `check`: charges every bucket or none, takes a lease if asked; answers
/// `{1, backlog_us...}`, `{0, bucket, retry_after_us (-1: never fits), used}` or
/// `{2, in_flight}`. `settle`: corrects token buckets by a signed delta and frees a lease.
/// `renew`: pushes leases' expiry forward. Mirrors `limits::gcra` (keep them in step).
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local op = ARGV[1]
local function store(k, tat)
  if tat > now then
    redis.call('SET', k, string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  else
    redis.call('DEL', k)
  end
end
if op == 'check' then
  local n = tonumber(ARGV[2])
  local new = {}
  local deny, wait, used = 0, 0, 0
  for i = 1, n do
    local limit = tonumber(ARGV[3 * i])
    local period = tonumber(ARGV[3 * i + 1])
    local cost = tonumber(ARGV[3 * i + 2])
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    local inc = math.ceil(cost * period / limit)
    if inc > period then
      if deny == 0 or wait >= 0 then deny, wait, used = i, -1, 0 end
    else
      local nt = math.max(tat, now) + inc
      if nt - now <= period then
        new[i] = nt
      else
        local w = nt - now - period
        if deny == 0 or (wait >= 0 and w > wait) then
          deny, wait = i, w
          used = math.min(limit, math.ceil(math.max(tat - now, 0) * limit / period))
        end
      end
    end
  end
  if deny > 0 then return {0, deny, wait, used} end
  local base = 3 * n + 3
  local maxp = tonumber(ARGV[base])
  if maxp > 0 then
    local lk = KEYS[n + 1]
    redis.call('ZREMRANGEBYSCORE', lk, '-inf', now)
    local count = redis.call('ZCARD', lk)
    if count >= maxp then return {2, count} end
    local ttl = tonumber(ARGV[base + 2])
    redis.call('ZADD', lk, now + ttl, ARGV[base + 1])
    redis.call('PEXPIRE', lk, math.ceil(ttl / 1000) * 2)
  end
  local out = {1}
  for i = 1, n do
    store(KEYS[i], new[i])
    out[i + 1] = new[i] - now
  end
  return out
elseif op == 'settle' then
  local n = tonumber(ARGV[2])
  for i = 1, n do
    local limit = tonumber(ARGV[3 * i])
    local period = tonumber(ARGV[3 * i + 1])
    local delta = tonumber(ARGV[3 * i + 2])
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    local inc = math.ceil(math.abs(delta) * period / limit)
    if delta >= 0 then
      store(KEYS[i], math.max(tat, now) + inc)
    else
      store(KEYS[i], math.max(tat - inc, now))
    end
  end
  local m = ARGV[3 * n + 3]
  if m ~= '' then redis.call('ZREM', KEYS[n + 1], m) end
  return 1
elseif op == 'renew' then
  local ttl = tonumber(ARGV[2])
  for i = 3, #ARGV do
    redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i])
  end
  redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000) * 2)
  return 1
end
return redis.error_reply('unknown op')
"#;

/// How often the health task pings a Redis that is down, and renews leases.
const PROBE_EVERY: Duration = Duration::from_millis(500);
const RENEW_EVERY: Duration = Duration::from_secs(3);

pub struct RedisStore {
    client: Option<redis::Client>,
    conn: RwLock<Option<ConnectionManager>>,
    up: AtomicBool,
    timeout: Duration,
    failure: RedisFailure,
    script: redis::Script,
    /// This replica's lease prefix.
    replica: String,
    next_lease: AtomicU64,
    /// Leases this replica holds: member -> its sorted set (renewed by the health task).
    leases: Mutex<HashMap<String, String>>,
}

/// What the logs say the gateway does while Redis is down.
fn failure_mode(f: RedisFailure) -> &'static str {
    match f {
        RedisFailure::Local => "counting on local buckets (redis_failure = \"local\")",
        RedisFailure::Closed => "refusing keyed requests with 503 (redis_failure = \"closed\")",
    }
}

impl RedisStore {
    /// Connects (waiting at most about a second) and starts the health task.
    pub async fn start(url: &str, timeout: Duration, failure: RedisFailure) -> Arc<RedisStore> {
        let client = match redis::Client::open(url) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(kind = ?e.kind(), "limits.redis_url is not a valid Redis URL");
                None
            }
        };
        let mut id = [0u8; 6];
        let _ = getrandom::getrandom(&mut id);
        let replica: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let store = Arc::new(RedisStore {
            client,
            conn: RwLock::new(None),
            up: AtomicBool::new(false),
            timeout,
            failure,
            script: redis::Script::new(SCRIPT),
            replica,
            next_lease: AtomicU64::new(0),
            leases: Mutex::new(HashMap::new()),
        });
        if !store.probe().await {
            tracing::warn!(
                "redis limits store unavailable at start: {}",
                failure_mode(failure)
            );
        }
        tokio::spawn(health(Arc::downgrade(&store)));
        store
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn mark_down(&self, what: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "redis limits store unavailable ({what}): {}",
                failure_mode(self.failure)
            );
        }
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!("redis limits store answers: limits are shared again");
        }
    }

    fn conn(&self) -> Option<ConnectionManager> {
        self.conn.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Connects if need be and pings; marks the store up or down. Whether it answered.
    async fn probe(&self) -> bool {
        let conn = match self.conn() {
            Some(c) => c,
            None => {
                let Some(client) = self.client.clone() else {
                    return false;
                };
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout.max(Duration::from_millis(500)))
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1)
                    .set_max_delay(200);
                let made = tokio::time::timeout(
                    Duration::from_secs(1),
                    ConnectionManager::new_with_config(client, cfg),
                )
                .await;
                match made {
                    Ok(Ok(c)) => {
                        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                        c
                    }
                    _ => {
                        self.mark_down("cannot connect");
                        return false;
                    }
                }
            }
        };
        let mut c = conn;
        let ping = redis::cmd("PING");
        match tokio::time::timeout(self.timeout, ping.query_async::<String>(&mut c)).await {
            Ok(Ok(_)) => {
                self.mark_up();
                true
            }
            _ => {
                self.mark_down("no answer to PING");
                false
            }
        }
    }

    /// Runs the script with a timeout; marks the store down on any failure.
    async fn run<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T, ()> {
        let Some(mut conn) = self.conn() else {
            self.mark_down("not connected");
            return Err(());
        };
        match tokio::time::timeout(self.timeout, inv.invoke_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.mark_down(if e.is_timeout() { "timeout" } else { "error" });
                Err(())
            }
            Err(_) => {
                self.mark_down("timeout");
                Err(())
            }
        }
    }

    /// Charges `plan` in Redis. `Err`: Redis did not answer (the caller falls back). The
    /// model's buckets (shared by all principals, their own hash tag) are charged first, then
    /// the principal's; a refusal by the second gives the first charge back.
    pub async fn acquire(self: &Arc<Self>, plan: &Plan) -> Result<(Outcome, Option<String>), ()> {
        let (model_part, key_part): (Vec<_>, Vec<_>) = plan
            .charges
            .iter()
            .enumerate()
            .partition(|(_, (s, _))| matches!(s, Slot::Model(..)));
        let mut statuses: Vec<Option<Status>> = vec![None; plan.charges.len()];
        if !model_part.is_empty() {
            let part: Vec<_> = model_part.iter().map(|(_, c)| **c).collect();
            match self.check(&model_tag(plan), &part, plan, None).await? {
                Outcome::Allowed(st) => {
                    for ((i, _), s) in model_part.iter().zip(st) {
                        statuses[*i] = Some(s);
                    }
                }
                other => return Ok((other, None)),
            }
        }
        let refund = |me: &Arc<Self>| {
            if !model_part.is_empty() {
                let back: Vec<_> = model_part
                    .iter()
                    .map(|(_, (s, c))| (*s, *c, -(c.cost as i64)))
                    .collect();
                me.spawn_settle(model_tag(plan), plan.clone(), back, None);
            }
        };
        let member = plan.max_parallel.map(|max| {
            let n = self.next_lease.fetch_add(1, Ordering::Relaxed);
            (max, format!("{}:{n}", self.replica))
        });
        let part: Vec<_> = key_part.iter().map(|(_, c)| **c).collect();
        let tag = tag(plan);
        match self.check(&tag, &part, plan, member.clone()).await {
            Ok(Outcome::Allowed(st)) => {
                for ((i, _), s) in key_part.iter().zip(st) {
                    statuses[*i] = Some(s);
                }
                let lease = member.map(|(_, m)| {
                    self.leases
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(m.clone(), lease_key(&tag));
                    m
                });
                let st = statuses.into_iter().flatten().collect();
                Ok((Outcome::Allowed(st), lease))
            }
            Ok(other) => {
                refund(self);
                Ok((other, None))
            }
            Err(()) => {
                refund(self);
                Err(())
            }
        }
    }

    /// One `check` of the script: `charges` (all under `tag`), and a lease if asked.
    async fn check(
        &self,
        tag: &str,
        charges: &[(Slot, crate::limits::Charge)],
        plan: &Plan,
        lease: Option<(u32, String)>,
    ) -> Result<Outcome, ()> {
        let mut inv = self.script.prepare_invoke();
        for (slot, _) in charges {
            inv.key(bucket_key(tag, *slot, plan));
        }
        inv.key(lease_key(tag));
        inv.arg("check").arg(charges.len());
        for (_, c) in charges {
            inv.arg(c.rate.limit).arg(c.rate.period_us).arg(c.cost);
        }
        let (max, member) = lease.unwrap_or((0, String::new()));
        inv.arg(max).arg(member).arg(LEASE_TTL.as_micros() as u64);
        let r: Vec<i64> = self.run(&inv).await?;
        match r.first() {
            Some(1) => Ok(Outcome::Allowed(
                charges
                    .iter()
                    .zip(r.iter().skip(1))
                    .map(|((_, c), &backlog)| c.rate.status(backlog.max(0) as u64, 0))
                    .collect(),
            )),
            Some(0) => {
                let i = r.get(1).copied().unwrap_or(1).max(1) as usize - 1;
                let (_, c) = charges.get(i).ok_or(())?;
                let wait = r.get(2).copied().unwrap_or(-1);
                Ok(Outcome::Limited(Denial {
                    dim: c.dim,
                    limit: c.rate.limit,
                    used: r.get(3).copied().unwrap_or(0).max(0) as u64,
                    requested: c.cost,
                    retry_after_us: (wait >= 0).then_some(wait as u64),
                }))
            }
            Some(2) => Ok(Outcome::Parallel(max)),
            _ => Err(()),
        }
    }

    /// Corrects the token buckets by `delta` and frees `lease`, in tasks of their own.
    pub fn settle(self: &Arc<Self>, plan: Plan, delta: i64, lease: Option<String>) {
        if let Some(m) = &lease {
            self.leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(m);
        }
        let (model_part, key_part): (Vec<_>, Vec<_>) = if delta != 0 {
            plan.token_charges()
                .map(|(s, c)| (s, c, delta))
                .partition(|(s, _, _)| matches!(s, Slot::Model(..)))
        } else {
            (Vec::new(), Vec::new())
        };
        if !model_part.is_empty() {
            self.spawn_settle(model_tag(&plan), plan.clone(), model_part, None);
        }
        if !key_part.is_empty() || lease.is_some() {
            self.spawn_settle(tag(&plan), plan, key_part, lease);
        }
    }

    /// One `settle` of the script (under `tag`), in a task of its own.
    fn spawn_settle(
        self: &Arc<Self>,
        tag: String,
        plan: Plan,
        deltas: Vec<(Slot, crate::limits::Charge, i64)>,
        lease: Option<String>,
    ) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // a lease expires by itself
        };
        let me = self.clone();
        rt.spawn(async move {
            let mut inv = me.script.prepare_invoke();
            for (slot, _, _) in &deltas {
                inv.key(bucket_key(&tag, *slot, &plan));
            }
            inv.key(lease_key(&tag));
            inv.arg("settle").arg(deltas.len());
            for (_, c, d) in &deltas {
                inv.arg(c.rate.limit).arg(c.rate.period_us).arg(*d);
            }
            inv.arg(lease.as_deref().unwrap_or(""));
            let _ = me.run::<i64>(&inv).await;
        });
    }

    /// Pushes the expiry of every lease this replica holds.
    async fn renew(&self) {
        let mut by_set: HashMap<String, Vec<String>> = HashMap::new();
        for (m, set) in self.leases.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            by_set.entry(set.clone()).or_default().push(m.clone());
        }
        for (set, members) in by_set {
            let mut inv = self.script.prepare_invoke();
            inv.key(set)
                .arg("renew")
                .arg(LEASE_TTL.as_micros() as u64)
                .arg(members);
            if self.run::<i64>(&inv).await.is_err() {
                return;
            }
        }
    }
}

/// Pings a Redis that is down until it answers; renews leases while it is up. Ends when the
/// store is dropped.
async fn health(store: Weak<RedisStore>) {
    let mut since_renew = Duration::ZERO;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(s) = store.upgrade() else { return };
        if !s.is_up() {
            s.probe().await;
        }
        since_renew += PROBE_EVERY;
        if since_renew >= RENEW_EVERY && s.is_up() {
            since_renew = Duration::ZERO;
            s.renew().await;
        }
    }
}

/// The hash tag of a model's buckets (all principals together).
fn model_tag(plan: &Plan) -> String {
    format!("{{m:{}}}", plan.model_name)
}

/// The hash tag of a principal: every key of one script call shares it.
fn tag(plan: &Plan) -> String {
    if plan.who == 0 {
        "{anon}".into()
    } else {
        format!("{{k:{}}}", plan.name)
    }
}

fn bucket_key(tag: &str, slot: Slot, _plan: &Plan) -> String {
    let dim = |d: Dim| match d {
        Dim::Requests => "rpm",
        Dim::Tokens => "tpm",
    };
    match slot {
        Slot::Key(d) => format!("mofa:{tag}:{}", dim(d)),
        Slot::Model(_, d) => format!("mofa:{tag}:{}", dim(d)),
    }
}

fn lease_key(tag: &str) -> String {
    format!("mofa:{tag}:inflight")
}

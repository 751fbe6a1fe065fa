//! The Redis store of the rate limits, shared by every replica pointed at one Redis: the GCRA
//! of `limits::gcra` runs atomically in Redis (one Lua script, `EVALSHA`, Redis's own clock),
//! keys hash-tagged by principal (`mofa:{k:<name>}:...`) or model (`mofa:{m:<model>}:...`) so
//! that one script call's keys share a Redis Cluster slot. `max_parallel` is a sorted set of leases that expire ([`LEASE_TTL`])
//! unless the replica holding them renews them: a replica that dies frees its places.
//!
//! A request makes one round trip: what it settles at its end (token correction, freed lease)
//! waits, per hash tag, for that tag's next call, or for the flusher ([`FLUSH_AFTER`]).
//!
//! Every round trip has a timeout. A call that fails on a broken connection (Redis restarted,
//! or closed an idle one) is sent once more on a fresh connection within the same timeout,
//! before anything falls back. A failure marks Redis down (logged once); a health task pings it
//! and marks it up again (logged once), and a request may ask for a ping at once
//! ([`RedisStore::probe_now`]); meanwhile `redis_failure` applies (the caller's).
//!
//! Redis may come back empty (a restart without persistence). Every new connection starts an
//! *epoch*: the first call of each hash tag in it carries a floor per bucket, what this replica
//! last saw of it (the local shadow, `memory`), and the script moves the bucket up to it; with
//! it, what this replica admitted locally while Redis was down (its debt, charged once). So a
//! restart neither forgets what was spent nor buys anyone a fresh allowance.
//!
//! It must never log the URL (it may hold a password) nor block the runtime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use tokio::sync::Notify;

use super::memory::MemoryStore;
use super::{Outcome, Plan, Slot, LEASE_TTL};
use crate::config::RedisFailure;
use crate::limits::{Charge, Denial, Dim, Rate, Status};

/// The one script, one call per request. Every op first applies what this replica settled
/// since its last call under the tag: a bucket's `floor` (microseconds ahead of now it is at
/// least: the first call of an epoch), token corrections (`adjust`, a signed count per bucket)
/// and freed leases (the members after the fixed arguments). `check` then charges every bucket
/// or none and takes a lease if asked; it answers `{1, backlog_us...}`, `{0, bucket,
/// retry_after_us (-1: never fits), used}` or `{2, in_flight}`. `settle` only applies.
/// `renew` pushes the given leases' expiry forward. ARGV: op, n, then per bucket `limit,
/// period_us, cost, adjust, floor`, then `max_parallel (0: no lease), member, lease_ttl_us`, then
/// the members to free (or, for `renew`, to renew). The clock is Redis's own (`TIME`); an op
/// written `check@<us>` runs at that time instead (the test that holds this script against
/// `limits::gcra`, which it mirrors: see `same_decisions_as_the_rust_gcra`).
const SCRIPT: &str = r#"
local op, at = string.match(ARGV[1], '^(%a+)@?(%d*)$')
local now
if at ~= nil and at ~= '' then
  now = tonumber(at)
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local n = tonumber(ARGV[2])
local base = 5 * n + 3
local lk = KEYS[n + 1]
local function store(k, tat)
  if tat > now then
    redis.call('SET', k, string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  else
    redis.call('DEL', k)
  end
end
if op == 'renew' then
  local ttl = tonumber(ARGV[base + 2])
  for i = base + 3, #ARGV do
    redis.call('ZADD', lk, 'XX', now + ttl, ARGV[i])
  end
  redis.call('PEXPIRE', lk, math.ceil(ttl / 1000) * 2)
  return 1
end
if #ARGV > base + 2 then redis.call('ZREM', lk, unpack(ARGV, base + 3)) end
local tats, adjusted = {}, {}
if n > 0 then
  local got = redis.call('MGET', unpack(KEYS, 1, n))
  for i = 1, n do
    local tat = tonumber(got[i]) or 0
    local floor = tonumber(ARGV[5 * i + 2])
    if floor > 0 and now + floor > tat then
      tat = now + floor
      adjusted[i] = true
    end
    local adj = tonumber(ARGV[5 * i + 1])
    if adj ~= 0 then
      local inc = math.ceil(math.abs(adj) * tonumber(ARGV[5 * i - 1]) / tonumber(ARGV[5 * i - 2]))
      if adj > 0 then tat = math.max(tat, now) + inc else tat = math.max(tat - inc, now) end
      adjusted[i] = true
    end
    tats[i] = tat
  end
end
local function keep()
  for i = 1, n do
    if adjusted[i] then store(KEYS[i], tats[i]) end
  end
end
if op ~= 'check' then
  keep()
  return 1
end
local new = {}
local deny, wait, used = 0, 0, 0
for i = 1, n do
  local limit = tonumber(ARGV[5 * i - 2])
  local period = tonumber(ARGV[5 * i - 1])
  local cost = tonumber(ARGV[5 * i])
  local tat = tats[i]
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
if deny > 0 then
  keep()
  return {0, deny, wait, used}
end
local maxp = tonumber(ARGV[base])
if maxp > 0 then
  local count = redis.call('ZCARD', lk)
  if count >= maxp then
    redis.call('ZREMRANGEBYSCORE', lk, '-inf', now)
    count = redis.call('ZCARD', lk)
  end
  if count >= maxp then
    keep()
    return {2, count}
  end
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
"#;

/// How often the health task pings a Redis that is down, and renews leases.
const PROBE_EVERY: Duration = Duration::from_millis(500);
const RENEW_EVERY: Duration = Duration::from_secs(3);
/// The longest a settlement waits for its tag's next check before it is sent on its own:
/// other replicas see a freed place at most this late (plus a round trip).
pub(super) const FLUSH_AFTER: Duration = Duration::from_millis(10);
/// The most freed leases kept for one tag while Redis does not answer; older ones are
/// dropped (they expire by themselves, [`LEASE_TTL`]).
const MAX_PENDING_FREES: usize = 4096;

/// What this replica settled under one hash tag and has not told Redis yet.
#[derive(Debug, Default)]
struct Pending {
    /// The principal of a key tag (for its floors; `None` for a model's tag).
    who: Option<usize>,
    /// Token corrections and local debt: per bucket, its rate and the sum of the deltas.
    adjust: Vec<(Slot, Charge, i64)>,
    /// Leases to free.
    free: Vec<String>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.adjust.is_empty() && self.free.is_empty()
    }

    fn add(&mut self, slot: Slot, charge: Charge, delta: i64) {
        match self.adjust.iter_mut().find(|(s, _, _)| *s == slot) {
            Some(a) => a.2 = a.2.saturating_add(delta),
            None => self.adjust.push((slot, charge, delta)),
        }
    }

    /// The summed correction of `slot` (taken out), 0 when there is none.
    fn take_adjust(&mut self, slot: Slot) -> i64 {
        match self.adjust.iter().position(|(s, _, _)| *s == slot) {
            Some(i) => self.adjust.swap_remove(i).2,
            None => 0,
        }
    }

    fn free(&mut self, members: impl IntoIterator<Item = String>) {
        self.free.extend(members);
        if self.free.len() > MAX_PENDING_FREES {
            let over = self.free.len() - MAX_PENDING_FREES;
            self.free.drain(..over);
        }
    }
}

/// A connection being made, that every caller joins.
type Connecting = Shared<BoxFuture<'static, Option<(u64, MultiplexedConnection)>>>;

/// The connection to Redis: one multiplexed connection, numbered (its epoch), replaced when a
/// call finds it broken; at most one being made at a time.
#[derive(Default)]
struct Link {
    ready: Option<(u64, MultiplexedConnection)>,
    connecting: Option<Connecting>,
    made: u64,
}

/// Whether an error means the connection is gone (worth a fresh one).
fn broken(e: &redis::RedisError) -> bool {
    e.is_unrecoverable_error() || e.is_io_error() || e.is_connection_dropped()
}

pub(super) struct RedisStore {
    client: Option<redis::Client>,
    link: Mutex<Link>,
    up: AtomicBool,
    timeout: Duration,
    failure: RedisFailure,
    script: redis::Script,
    /// This replica's lease prefix.
    replica: String,
    next_lease: AtomicU64,
    /// Leases this replica holds: member -> its hash tag (renewed by the health task).
    leases: Mutex<HashMap<String, String>>,
    /// Settlements not yet sent, by hash tag (one per principal and per model of the config):
    /// folded into the tag's next `check`, or sent by the flusher within [`FLUSH_AFTER`].
    pending: Mutex<HashMap<String, Pending>>,
    /// Wakes the flusher when a tag's settlements stop being empty.
    flush: Notify,
    /// The connection (its number is the epoch) in which each tag last sent its floors (one
    /// entry per tag of the config): a new connection may reach a Redis that restarted empty.
    floored: Mutex<HashMap<String, u64>>,
    /// The local buckets, which mirror what Redis said: the floors.
    shadow: Arc<MemoryStore>,
    /// When the last ping of [`RedisStore::probe_soon`] started, in ms since `born`.
    last_probe_ms: AtomicU64,
    born: std::time::Instant,
}

/// What the logs say the gateway does while Redis is down.
fn failure_mode(f: RedisFailure) -> &'static str {
    match f {
        RedisFailure::Local => "counting on local buckets (redis_failure = \"local\")",
        RedisFailure::Closed => "refusing keyed requests with 503 (redis_failure = \"closed\")",
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RedisStore {
    /// Connects (waiting at most about a second) and starts the health task and the flusher.
    /// `shadow` is the memory store: set from every answer, the source of the floors.
    pub(super) async fn start(
        url: &str,
        timeout: Duration,
        failure: RedisFailure,
        shadow: Arc<MemoryStore>,
    ) -> Arc<RedisStore> {
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
            link: Mutex::new(Link::default()),
            up: AtomicBool::new(false),
            timeout,
            failure,
            script: redis::Script::new(SCRIPT),
            replica,
            next_lease: AtomicU64::new(0),
            leases: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            flush: Notify::new(),
            floored: Mutex::new(HashMap::new()),
            shadow,
            last_probe_ms: AtomicU64::new(0),
            born: std::time::Instant::now(),
        });
        if !store.probe(Duration::from_secs(1).max(timeout)).await {
            tracing::warn!(
                "redis limits store unavailable at start: {}",
                failure_mode(failure)
            );
        }
        tokio::spawn(health(Arc::downgrade(&store)));
        tokio::spawn(flusher(Arc::downgrade(&store)));
        store
    }

    pub(super) fn is_up(&self) -> bool {
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

    /// The connection and its number: the current one, or a new one (joining the one being
    /// made, if any). `None`: Redis cannot be reached now.
    async fn connection(self: &Arc<Self>) -> Option<(u64, MultiplexedConnection)> {
        let connecting = {
            let mut link = lock(&self.link);
            if let Some(c) = &link.ready {
                return Some(c.clone());
            }
            match &link.connecting {
                Some(c) => c.clone(),
                None => {
                    let client = self.client.clone()?;
                    let cfg = AsyncConnectionConfig::new()
                        .set_connection_timeout(self.timeout.max(Duration::from_millis(500)))
                        .set_response_timeout(self.timeout);
                    let me = Arc::downgrade(self);
                    let c = async move {
                        let made = client
                            .get_multiplexed_async_connection_with_config(&cfg)
                            .await
                            .ok();
                        let me = me.upgrade()?;
                        let mut link = lock(&me.link);
                        link.connecting = None;
                        let made = made?;
                        link.made += 1;
                        let numbered = (link.made, made);
                        link.ready = Some(numbered.clone());
                        Some(numbered)
                    }
                    .boxed()
                    .shared();
                    link.connecting = Some(c.clone());
                    // It runs to its end even if every caller gives up waiting.
                    tokio::spawn(c.clone());
                    c
                }
            }
        };
        connecting.await
    }

    /// Drops connection `n` (found broken): the next call makes a new one.
    fn drop_connection(&self, n: u64) {
        let mut link = lock(&self.link);
        if link.ready.as_ref().is_some_and(|(m, _)| *m == n) {
            link.ready = None;
        }
    }

    fn ms_since_born(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Starts a ping in the background unless one started within the last 100 ms: a request
    /// that finds the store down in `local` mode, so that the next ones use Redis as soon as
    /// it answers, not at the health task's next ping.
    pub(super) fn probe_soon(self: &Arc<Self>) {
        let now = self.ms_since_born();
        let last = self.last_probe_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 100
            && self
                .last_probe_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let me = self.clone();
            tokio::spawn(async move { me.probe(me.timeout).await });
        }
    }

    /// Connects if need be and pings (once more on a fresh connection if the one it had is
    /// broken), within `within`; marks the store up or down. Whether it answered.
    async fn probe(self: &Arc<Self>, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        for _ in 0..2 {
            let Ok(Some((n, mut c))) = tokio::time::timeout_at(deadline, self.connection()).await
            else {
                break;
            };
            let ping = redis::cmd("PING");
            match tokio::time::timeout_at(deadline, ping.query_async::<String>(&mut c)).await {
                Ok(Ok(_)) => {
                    self.mark_up();
                    return true;
                }
                Ok(Err(e)) if broken(&e) => self.drop_connection(n),
                _ => break,
            }
        }
        self.mark_down("no answer to PING");
        false
    }

    /// One call of the script under `tag` (see [`RedisStore::invocation`]), within the store's
    /// timeout: with the tag's floors when it has not sent them on this connection, and once
    /// more on a fresh connection when the first try finds the connection broken. Marks the
    /// store up when it answers, down when it fails.
    async fn call<T: redis::FromRedisValue>(
        self: &Arc<Self>,
        tag: &str,
        who: Option<usize>,
        op: &str,
        buckets: &[(Slot, Rate, u64, i64)],
        lease: (u32, &str),
        members: &[String],
    ) -> Result<T, ()> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut retried = false;
        let failed = loop {
            let Ok(Some((n, mut conn))) =
                tokio::time::timeout_at(deadline, self.connection()).await
            else {
                break "cannot connect";
            };
            let floors = self.floors(tag, who, n, buckets);
            let inv = self.invocation(tag, op, buckets, floors.as_deref(), lease, members);
            match tokio::time::timeout_at(deadline, inv.invoke_async::<T>(&mut conn)).await {
                Ok(Ok(v)) => {
                    // A check carries every bucket of its tag (a settle, some of them).
                    if floors.is_some() && op == "check" {
                        lock(&self.floored).insert(tag.to_string(), n);
                    }
                    self.mark_up();
                    return Ok(v);
                }
                Ok(Err(e)) if broken(&e) => {
                    // Redis restarted, or closed an idle connection: once more on a new one.
                    self.drop_connection(n);
                    if retried {
                        break "connection lost";
                    }
                    retried = true;
                }
                Ok(Err(e)) if e.is_timeout() => break "timeout",
                Ok(Err(_)) => break "error",
                Err(_) => break "timeout",
            }
        };
        self.mark_down(failed);
        Err(())
    }

    /// The floors of `buckets` for a call under `tag` on connection `epoch`: `None` when the
    /// tag sent them on it already; else, per bucket, how far ahead of now this replica last saw
    /// it, less the debt this call charges (which the shadow counts already).
    fn floors(
        &self,
        tag: &str,
        who: Option<usize>,
        epoch: u64,
        buckets: &[(Slot, Rate, u64, i64)],
    ) -> Option<Vec<u64>> {
        if buckets.is_empty() || lock(&self.floored).get(tag) == Some(&epoch) {
            return None;
        }
        Some(
            buckets
                .iter()
                .map(|(slot, rate, _, adjust)| {
                    let seen = match (slot, who) {
                        (Slot::Model(..), _) => self.shadow.backlog(0, *slot),
                        (Slot::Key(_), Some(w)) => self.shadow.backlog(w, *slot),
                        (Slot::Key(_), None) => 0,
                    };
                    let owed = u64::try_from(*adjust).map_or(0, |a| rate.cost_us(a));
                    seen.saturating_sub(owed)
                })
                .collect(),
        )
    }

    /// Charges `plan` in Redis. `Err`: Redis did not answer (the caller falls back). The
    /// model's buckets (shared by all principals, their own hash tag) are charged first, then
    /// the principal's; a refusal by the second gives the first charge back.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        plan: &Plan,
    ) -> Result<(Outcome, Option<String>), ()> {
        let has_model = plan
            .charges
            .iter()
            .any(|(s, _)| matches!(s, Slot::Model(..)));
        if !has_model {
            // The usual case: one call.
            let member = self.member(plan);
            let tag = tag(plan);
            let outcome = self
                .check(&tag, Some(plan.who), &plan.charges, member.clone())
                .await?;
            return Ok(self.keep_lease(outcome, member, &tag));
        }
        let (model_part, key_part): (Vec<_>, Vec<_>) = plan
            .charges
            .iter()
            .enumerate()
            .partition(|(_, (s, _))| matches!(s, Slot::Model(..)));
        let mut statuses: Vec<Option<Status>> = vec![None; plan.charges.len()];
        let mtag = model_tag(plan);
        let part: Vec<_> = model_part.iter().map(|(_, c)| **c).collect();
        match self.check(&mtag, None, &part, None).await? {
            Outcome::Allowed(st) => {
                for ((i, _), s) in model_part.iter().zip(st) {
                    statuses[*i] = Some(s);
                }
            }
            other => return Ok((other, None)),
        }
        let member = self.member(plan);
        let part: Vec<_> = key_part.iter().map(|(_, c)| **c).collect();
        let tag = tag(plan);
        let outcome = self
            .check(&tag, Some(plan.who), &part, member.clone())
            .await;
        if !matches!(outcome, Ok(Outcome::Allowed(_))) {
            // Give the model's charge back (with its tag's next call).
            let mut back = Pending::default();
            for (_, (slot, c)) in &model_part {
                back.add(*slot, *c, -(c.cost as i64));
            }
            self.defer(&mtag, back);
        }
        match self.keep_lease(outcome?, member, &tag) {
            (Outcome::Allowed(st), lease) => {
                for ((i, _), s) in key_part.iter().zip(st) {
                    statuses[*i] = Some(s);
                }
                let st = statuses.into_iter().flatten().collect();
                Ok((Outcome::Allowed(st), lease))
            }
            other => Ok(other),
        }
    }

    /// A fresh lease member for `plan` when it counts requests in flight.
    fn member(&self, plan: &Plan) -> Option<(u32, String)> {
        plan.max_parallel.map(|max| {
            let n = self.next_lease.fetch_add(1, Ordering::Relaxed);
            (max, format!("{}:{n}", self.replica))
        })
    }

    /// Records the lease of an allowed check (so that it is renewed), and returns it.
    fn keep_lease(
        &self,
        outcome: Outcome,
        member: Option<(u32, String)>,
        tag: &str,
    ) -> (Outcome, Option<String>) {
        match outcome {
            Outcome::Allowed(st) => {
                let lease = member.map(|(_, m)| {
                    lock(&self.leases).insert(m.clone(), tag.to_string());
                    m
                });
                (Outcome::Allowed(st), lease)
            }
            other => (other, None),
        }
    }

    /// One call of the script under `tag`, in its ARGV layout (see [`SCRIPT`]): `op` over
    /// `buckets` (slot, rate, cost, adjust) with their `floors` (none: 0), the lease to take
    /// (`max_parallel`, member; 0: none), and `members` to free (or, for `renew`, to renew).
    fn invocation(
        &self,
        tag: &str,
        op: &str,
        buckets: &[(Slot, Rate, u64, i64)],
        floors: Option<&[u64]>,
        lease: (u32, &str),
        members: &[String],
    ) -> redis::ScriptInvocation<'_> {
        let mut inv = self.script.prepare_invoke();
        for (slot, ..) in buckets {
            inv.key(bucket_key(tag, *slot));
        }
        inv.key(lease_key(tag));
        inv.arg(op).arg(buckets.len());
        for (i, (_, rate, cost, adjust)) in buckets.iter().enumerate() {
            let floor = floors.and_then(|f| f.get(i)).copied().unwrap_or(0);
            inv.arg(rate.limit)
                .arg(rate.period_us)
                .arg(*cost)
                .arg(*adjust)
                .arg(floor);
        }
        inv.arg(lease.0)
            .arg(lease.1)
            .arg(LEASE_TTL.as_micros() as u64)
            .arg(members);
        inv
    }

    /// Leases freed by a call that failed: freeing is idempotent, so they are sent again with
    /// the tag's next call. (A token correction may have been applied: it is not sent twice.)
    fn free_again(&self, tag: &str, free: Vec<String>) {
        if !free.is_empty() {
            self.defer(
                tag,
                Pending {
                    free,
                    ..Pending::default()
                },
            );
        }
    }

    /// One `check` of the script: `charges` (all under `tag`, of principal `who` for a key's
    /// tag), and a lease if asked, with what this replica settled under `tag` since its last
    /// call.
    async fn check(
        self: &Arc<Self>,
        tag: &str,
        who: Option<usize>,
        charges: &[(Slot, Charge)],
        lease: Option<(u32, String)>,
    ) -> Result<Outcome, ()> {
        let mut pending = self.take(tag);
        let buckets: Vec<_> = charges
            .iter()
            .map(|(slot, c)| {
                let adjust = pending.as_mut().map_or(0, |p| p.take_adjust(*slot));
                (*slot, c.rate, c.cost, adjust)
            })
            .collect();
        let frees = match pending {
            Some(mut p) => {
                let frees = std::mem::take(&mut p.free);
                // Corrections of buckets this call does not carry wait for the flusher.
                if !p.adjust.is_empty() {
                    self.defer(tag, p);
                }
                frees
            }
            None => Vec::new(),
        };
        let (max, member) = lease.unwrap_or((0, String::new()));
        let Ok(r) = self
            .call::<Vec<i64>>(tag, who, "check", &buckets, (max, &member), &frees)
            .await
        else {
            self.free_again(tag, frees);
            return Err(());
        };
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
                let (slot, c) = charges.get(i).ok_or(())?;
                let wait = r.get(2).copied().unwrap_or(-1);
                if let Ok(w) = u64::try_from(wait) {
                    // Refused: the bucket is this far ahead (see the script), for the shadow.
                    let backlog = (c.rate.period_us + w).saturating_sub(c.rate.cost_us(c.cost));
                    self.shadow.raise(who.unwrap_or(0), *slot, backlog);
                }
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

    fn has_pending(&self) -> bool {
        lock(&self.pending).values().any(|p| !p.is_empty())
    }

    /// Takes what is pending under `tag`.
    fn take(&self, tag: &str) -> Option<Pending> {
        let mut pending = lock(&self.pending);
        pending.get_mut(tag).and_then(|p| {
            (!p.is_empty()).then(|| Pending {
                who: p.who,
                adjust: std::mem::take(&mut p.adjust),
                free: std::mem::take(&mut p.free),
            })
        })
    }

    /// Adds `more` to what is pending under `tag`; wakes the flusher when it was empty.
    fn defer(&self, tag: &str, more: Pending) {
        let mut pending = lock(&self.pending);
        let p = match pending.get_mut(tag) {
            Some(p) => p,
            None => pending.entry(tag.to_string()).or_default(),
        };
        let was_empty = p.is_empty();
        p.who = p.who.or(more.who);
        for (slot, c, d) in more.adjust {
            p.add(slot, c, d);
        }
        p.free(more.free);
        drop(pending);
        if was_empty {
            self.flush.notify_one();
        }
    }

    /// Defers `deltas` of `plan`'s buckets (and `lease` to free), each under its tag.
    fn defer_plan(
        &self,
        plan: &Plan,
        deltas: impl Iterator<Item = (Slot, Charge, i64)>,
        lease: Option<String>,
    ) {
        let mut key = Pending {
            who: Some(plan.who),
            free: lease.into_iter().collect(),
            ..Pending::default()
        };
        let mut model = Pending::default();
        for (slot, c, d) in deltas.filter(|(_, _, d)| *d != 0) {
            match slot {
                Slot::Model(..) => model.add(slot, c, d),
                Slot::Key(_) => key.add(slot, c, d),
            }
        }
        if !model.is_empty() {
            self.defer(&model_tag(plan), model);
        }
        if !key.is_empty() {
            self.defer(&tag(plan), key);
        }
    }

    /// The request is over: its token buckets are corrected by `delta` and `lease` is freed,
    /// with the tag's next call (this replica's next request of the same principal), or by the
    /// flusher within [`FLUSH_AFTER`]. Never waits.
    pub(super) fn settle(&self, plan: Plan, delta: i64, lease: Option<String>) {
        if let Some(m) = &lease {
            lock(&self.leases).remove(m);
        }
        self.defer_plan(
            &plan,
            plan.token_charges().map(|(s, c)| (s, c, delta)),
            lease,
        );
    }

    /// `plan` was admitted on the local buckets while Redis did not answer (or `delta` tokens
    /// corrected one such): charged to Redis with the tags' next calls, once.
    pub(super) fn owe(&self, plan: &Plan, delta: Option<i64>) {
        match delta {
            None => self.defer_plan(
                plan,
                plan.charges.iter().map(|(s, c)| (*s, *c, c.cost as i64)),
                None,
            ),
            Some(d) => self.defer_plan(plan, plan.token_charges().map(|(s, c)| (s, c, d)), None),
        }
    }

    /// Sends everything pending, one `settle` call per tag.
    async fn flush_all(self: &Arc<Self>) {
        let all: Vec<(String, Pending)> = {
            let mut pending = lock(&self.pending);
            pending
                .iter_mut()
                .filter(|(_, p)| !p.is_empty())
                .map(|(t, p)| {
                    let taken = Pending {
                        who: p.who,
                        adjust: std::mem::take(&mut p.adjust),
                        free: std::mem::take(&mut p.free),
                    };
                    (t.clone(), taken)
                })
                .collect()
        };
        for (tag, p) in all {
            let buckets: Vec<_> = p
                .adjust
                .iter()
                .map(|(slot, c, d)| (*slot, c.rate, 0, *d))
                .collect();
            let sent = self
                .call::<i64>(&tag, p.who, "settle", &buckets, (0, ""), &p.free)
                .await;
            if sent.is_err() {
                self.free_again(&tag, p.free);
            }
        }
    }

    /// Pushes the expiry of every lease this replica holds.
    async fn renew(self: &Arc<Self>) {
        let mut by_tag: HashMap<String, Vec<String>> = HashMap::new();
        for (m, tag) in lock(&self.leases).iter() {
            by_tag.entry(tag.clone()).or_default().push(m.clone());
        }
        for (tag, members) in by_tag {
            if self
                .call::<i64>(&tag, None, "renew", &[], (0, ""), &members)
                .await
                .is_err()
            {
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
            s.probe(s.timeout).await;
        }
        since_renew += PROBE_EVERY;
        if since_renew >= RENEW_EVERY && s.is_up() {
            since_renew = Duration::ZERO;
            s.renew().await;
        }
    }
}

/// Sends the settlements that no check took within [`FLUSH_AFTER`] of becoming pending.
/// Idle (no wake-up) while nothing is pending, but for a look every second whether the store
/// is gone.
async fn flusher(store: Weak<RedisStore>) {
    loop {
        let Some(s) = store.upgrade() else { return };
        let woken = tokio::time::timeout(Duration::from_secs(1), s.flush.notified())
            .await
            .is_ok();
        if woken {
            tokio::time::sleep(FLUSH_AFTER).await;
            if s.is_up() {
                s.flush_all().await;
            } else {
                // Down: look again later (what is pending is kept, bounded).
                tokio::time::sleep(PROBE_EVERY).await;
                if s.has_pending() {
                    s.flush.notify_one();
                }
            }
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

fn bucket_key(tag: &str, slot: Slot) -> String {
    let dim = match slot {
        Slot::Key(d) | Slot::Model(_, d) => d,
    };
    match dim {
        Dim::Requests => format!("mofa:{tag}:rpm"),
        Dim::Tokens => format!("mofa:{tag}:tpm"),
    }
}

fn lease_key(tag: &str) -> String {
    format!("mofa:{tag}:inflight")
}

#[cfg(test)]
mod tests {
    //! The Lua GCRA against the Rust one (`limits::gcra`, what the memory store runs): the same
    //! charges and corrections at the same times, through a real `redis-server` (`SCRIPT LOAD`
    //! + `EVALSHA`), give the same decision, the same `Retry-After` and the same buckets.
    use super::*;
    use crate::limits::{charge_all, Charge, Dim, Rate};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    /// A `redis-server` on an ephemeral loopback port, without persistence; killed when
    /// dropped.
    struct Redis(std::process::Child, String);

    impl Redis {
        fn start() -> Redis {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap();
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "redis-server could not be run ({e}): install Debian's `redis-server` \
                         package (.ci/run does)"
                    )
                });
            let r = Redis(child, format!("redis://127.0.0.1:{port}"));
            let client = redis::Client::open(r.1.as_str()).unwrap();
            for _ in 0..500 {
                if client.get_connection().is_ok() {
                    return r;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("redis-server did not accept connections on port {port}");
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// One step of a sequence: a gap in microseconds, then a check of these costs (one per
    /// bucket) or a correction of each bucket by these deltas.
    #[derive(Debug, Clone)]
    enum Step {
        Check(u64, Vec<u64>),
        Adjust(u64, Vec<i64>),
    }

    /// Gaps: any, and whole seconds (with limits that divide a minute, the exact edges where
    /// a charge just fits).
    fn gap() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..5_000_000, (0u64..4).prop_map(|s| s * 1_000_000)]
    }

    fn step(buckets: usize) -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (gap(), proptest::collection::vec(0u64..400, buckets))
                .prop_map(|(g, c)| Step::Check(g, c)),
            1 => (gap(), proptest::collection::vec(-300i64..300, buckets))
                .prop_map(|(g, d)| Step::Adjust(g, d)),
        ]
    }

    fn limit() -> impl Strategy<Value = u64> {
        prop_oneof![
            1u64..2_000,
            prop::sample::select(vec![1u64, 2, 3, 6, 10, 20, 60, 600])
        ]
    }

    fn case() -> impl Strategy<Value = (Vec<u64>, Vec<Step>)> {
        (1usize..=3).prop_flat_map(|n| {
            (
                proptest::collection::vec(limit(), n),
                proptest::collection::vec(step(n), 1..60),
            )
        })
    }

    /// One call of the script at `now` under keys `t{id}:*`.
    fn call(
        con: &mut redis::Connection,
        id: usize,
        op: &str,
        now: u64,
        rates: &[Rate],
        cost: &[u64],
        adj: &[i64],
    ) -> Vec<i64> {
        let script = redis::Script::new(SCRIPT);
        let mut inv = script.prepare_invoke();
        for i in 0..rates.len() {
            inv.key(format!("t{id}:{i}"));
        }
        inv.key(format!("t{id}:lease"));
        inv.arg(format!("{op}@{now}")).arg(rates.len());
        for (i, r) in rates.iter().enumerate() {
            inv.arg(r.limit)
                .arg(r.period_us)
                .arg(cost[i])
                .arg(adj[i])
                .arg(0u64);
        }
        inv.arg(0u32).arg("").arg(LEASE_TTL.as_micros() as u64);
        match op {
            "check" => inv.invoke::<Vec<i64>>(con).unwrap(),
            _ => vec![inv.invoke::<i64>(con).unwrap()],
        }
    }

    #[test]
    fn same_decisions_as_the_rust_gcra() {
        let redis = Redis::start();
        let con = std::cell::RefCell::new(
            redis::Client::open(redis.1.as_str())
                .unwrap()
                .get_connection()
                .unwrap(),
        );
        let next = std::cell::Cell::new(0usize);
        let mut runner = TestRunner::new(Config::with_cases(256));
        let result = runner.run(&case(), |(limits, steps)| {
            let id = next.get() + 1;
            next.set(id);
            let mut con = con.borrow_mut();
            let rates: Vec<Rate> = limits.iter().map(|l| Rate::per_minute(*l)).collect();
            let mut tats = vec![0u64; rates.len()];
            let mut now = 1_000_000_000_000u64;
            for s in steps {
                match s {
                    Step::Check(gap, costs) => {
                        now += gap;
                        let zero = vec![0; costs.len()];
                        let lua = call(&mut con, id, "check", now, &rates, &costs, &zero);
                        let charges: Vec<Charge> = rates
                            .iter()
                            .zip(&costs)
                            .map(|(r, c)| Charge {
                                rate: *r,
                                dim: Dim::Tokens,
                                cost: *c,
                            })
                            .collect();
                        match charge_all(&charges, &mut tats, now) {
                            Ok(_) => {
                                prop_assert_eq!(
                                    lua[0],
                                    1,
                                    "Lua refused what Rust allows: {:?}",
                                    lua
                                );
                                let backlogs: Vec<i64> =
                                    tats.iter().map(|t| (t - now) as i64).collect();
                                prop_assert_eq!(&lua[1..], &backlogs[..]);
                            }
                            Err(d) => {
                                prop_assert_eq!(
                                    lua[0],
                                    0,
                                    "Lua allowed what Rust refuses: {:?}",
                                    d
                                );
                                let i = usize::try_from(lua[1] - 1).unwrap();
                                prop_assert_eq!(charges[i].cost, d.requested);
                                prop_assert_eq!(charges[i].rate.limit, d.limit);
                                let wait = d.retry_after_us.map_or(-1, |w| w as i64);
                                prop_assert_eq!(lua[2], wait, "Retry-After");
                                prop_assert_eq!(lua[3] as u64, d.used, "used");
                            }
                        }
                    }
                    Step::Adjust(gap, deltas) => {
                        now += gap;
                        let zero = vec![0; deltas.len()];
                        call(&mut con, id, "settle", now, &rates, &zero, &deltas);
                        for ((t, r), d) in tats.iter_mut().zip(&rates).zip(&deltas) {
                            if *d != 0 {
                                *t = r.adjust(*t, now, *d);
                            }
                        }
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}

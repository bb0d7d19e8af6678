//! `[cluster]`: node heartbeats and account leases with fencing epochs, on the PostgreSQL store.
//!
//! Every node reads the same `accounts.toml`; an account is served (and its tokens refreshed)
//! only by the node that holds its lease in PostgreSQL. Each tick (a third of `lease_secs`) a
//! node:
//!
//! 1. heartbeats and renews its unexpired leases; a lease missing from the answer is lost
//!    (another node took it after it expired) and the account stops serving here at once;
//! 2. gives up the leases of accounts gone from its file (once nothing of them can still
//!    write the chain), counts the live nodes (heartbeat within their lease, not stopping) and
//!    takes free or expired leases up to its fair share (`ceil(accounts / live nodes)`), and
//!    at most its share among the nodes heard from in the last 10 minutes in one tick, each
//!    with the next epoch, loading the account's stored tokens before serving it — so a dead
//!    node's accounts are served again within `lease_secs` plus a tick;
//! 3. when it holds more than its share while another live node holds less, gives up idle
//!    accounts (no request in flight, no token refresh running, no rotated token unsaved), as
//!    many as the neediest node lacks: no stream is cut, no rotated refresh token is lost;
//! 4. runs the `amqctl` commands (refresh, enable, disable) queued for the accounts it holds
//!    (a refresh on its own task: the loop never waits for the token endpoint);
//! 5. takes the stored chain of an account it holds that is invalid because its refresh
//!    token was refused, when the store holds a newer one
//!    ([`Pool::take_newer_stored_chain`]).
//!
//! Locally a lease counts as held until `t0 + lease − lease/10`, `t0` being taken before the
//! renewal was sent (the database's expiry is later): a node that cannot reach PostgreSQL keeps
//! serving those accounts until then, after which it answers 503 `overloaded_error` and says so
//! in `/health` and `STATUS=`. A token refresh starts only with half a lease left, by the local
//! timer and by the database ([`PgStore::lease_left`], asked through
//! [`crate::accounts::pool::ClusterView`]: the timer misses a pause it did not count), and the
//! token write itself is fenced by the epoch in the database (see [`crate::store::postgres`]):
//! a token a node rotated under a lease it then lost is still stored unless a later holder
//! stored one, and the new holder takes it when its own refresh token is refused.
//! A node renews only the leases it holds, at their epochs. A stopping node marks itself so
//! (the others stop counting it), gives each account up as soon as it is idle and renews the
//! rest until the daemon is done with the pool ([`run`]).

use crate::accounts::Pool;
use crate::accounts::pool::ClusterView;
use crate::accounts::pool::mono_ms;
use crate::store::postgres::Held;
use crate::store::postgres::PgStore;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// The lease loop's period for a lease of `lease`.
pub fn tick(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(200))
}

/// How long a lease renewed at `t0_ms` counts as held here.
fn valid_until(t0_ms: u64, lease: Duration) -> u64 {
    let lease_ms = lease.as_millis() as u64;
    t0_ms + lease_ms - lease_ms / 10
}

/// Runs the lease loop until `stop` (the daemon's shutdown begins: the listeners close and the
/// drain starts). Then each account is given up as soon as nothing uses it — another node takes
/// it at its next tick, rather than after the lease runs out — and the rest stay renewed, so
/// that the drain's failovers and refreshes still hold them, until nothing is held or `done`
/// (the daemon is finished with the pool; [`release_all`] gives up what is left).
pub async fn run(
    store: PgStore,
    pool: Arc<Pool>,
    status: impl Fn() -> String + Send + 'static,
    mut stop: crate::shutdown::Shutdown,
    mut done: crate::shutdown::Shutdown,
) {
    let lease = store.lease();
    let node = store.node_id().to_owned();
    match store.reclaim().await {
        Ok(back) => {
            let until = valid_until(mono_ms(), lease);
            for (id, _) in &back {
                adopt(&store, &pool, id, until).await;
            }
            if !back.is_empty() {
                tracing::info!(node = %node, accounts = back.len(), "took back this node's unexpired leases");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot reach PostgreSQL at start-up; retrying"),
    }
    // The tables' housekeeping: at the start, then about every ten minutes.
    let mut ticks: u64 = 0;
    let prune_every = (Duration::from_secs(600).as_millis() / tick(lease).as_millis().max(1)) as u64;
    loop {
        step(&store, &pool, &status()).await;
        if ticks % prune_every.max(1) == 0 {
            match store.prune().await {
                Ok(n) if n > 0 => tracing::info!(rows = n, "cluster: old commands and silent nodes pruned"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "cluster: cannot prune"),
            }
        }
        ticks += 1;
        tokio::select! {
            _ = tokio::time::sleep(tick(lease)) => {}
            _ = stop.recv() => break,
        }
    }
    if let Err(e) = store.leaving().await {
        tracing::debug!(error = %e, "cluster: cannot say this node is stopping");
    }
    let mut renewed = std::time::Instant::now();
    loop {
        release_idle(&store, &pool).await;
        if store.held_all().is_empty() {
            break;
        }
        if renewed.elapsed() >= tick(lease) {
            renewed = std::time::Instant::now();
            renew(&store, &pool, &status()).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(LEAVING_CHECK) => {}
            _ = done.recv() => break,
        }
    }
}

/// Gives up the lease of `id`, an account gone from this node's file, unless something of it
/// can still write its chain: a rotated token waiting to be stored, or a token refresh in
/// flight (its answer, stored after the release, would be fenced: the chain lost). The refresh
/// guard is held until the lease is given up, so none starts meanwhile. `None`: kept for now.
async fn release_removed(
    store: &PgStore,
    pool: &Pool,
    id: &str,
) -> Option<Result<(), crate::store::StoreError>> {
    match pool.removed_account(id) {
        Some(a) if a.tokens.has_unsaved() => None,
        Some(a) => {
            let _quiet = a.tokens.quiet()?;
            Some(store.release(id).await)
        }
        None => Some(store.release(id).await),
    }
}

/// How long a node not heard from still counts for the share one node takes in one tick.
const RECENT_NODE: Duration = Duration::from_secs(600);

/// How often a stopping node looks for accounts it can give up.
const LEAVING_CHECK: Duration = Duration::from_millis(100);

/// Gives up the lease of every held account nothing uses: no request in flight, no rotated
/// token waiting to be stored, no token refresh running (the guard is held until the lease is
/// given up, as for rebalancing). An account gone from the file goes unless its token waits.
async fn release_idle(store: &PgStore, pool: &Pool) {
    for id in store.held_all().into_keys() {
        let released = match pool.get(&id) {
            Some(a) => {
                if a.in_flight() > 0 || a.tokens.has_unsaved() {
                    continue;
                }
                let Some(_quiet) = a.tokens.quiet() else { continue };
                pool.hold(&id, 0);
                store.release(&id).await
            }
            None => match release_removed(store, pool, &id).await {
                Some(r) => r,
                None => continue,
            },
        };
        match released {
            Ok(()) => tracing::info!(account = %id, "cluster: lease given up (stopping)"),
            Err(e) => tracing::debug!(account = %id, error = %e, "cluster: could not release the lease"),
        }
    }
}

/// At shutdown (after the drain): gives every lease up.
pub async fn release_all(store: &PgStore, pool: &Pool) {
    for id in store.held_all().into_keys() {
        pool.hold(&id, 0);
        if let Err(e) = store.release(&id).await {
            tracing::debug!(account = %id, error = %e, "could not release the lease");
        }
    }
}

/// The heartbeat and the renewal of every lease held, with the pool told what it holds until
/// when. `None` (the leases still validly held run out on their own) when PostgreSQL fails.
async fn renew(store: &PgStore, pool: &Pool, status: &str) -> Option<(HashMap<String, Held>, u64)> {
    let lease = store.lease();
    let t0 = mono_ms();
    let held = match store.heartbeat(status).await {
        Ok(()) => store.renew().await,
        Err(e) => Err(e),
    };
    let held = match held {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "cluster: cannot renew leases");
            return None;
        }
    };
    let until = valid_until(t0, lease);
    for a in pool.accounts() {
        let id = a.id.as_str();
        if held.contains_key(id) {
            pool.hold(id, until);
        } else if a.held_for(0) {
            tracing::warn!(account = %id, "cluster: lease lost (another node holds the account now)");
            pool.hold(id, 0);
        }
    }
    Some((held, until))
}

/// One tick of the lease loop.
pub async fn step(store: &PgStore, pool: &Arc<Pool>, status: &str) {
    let Some((held, until)) = renew(store, pool, status).await else { return };
    let ids: Vec<String> = pool.accounts().iter().map(|a| a.id.to_string()).collect();
    // Accounts gone from this node's file: their leases are given up (renewed on, they would
    // count towards this node's share and keep the nodes whose file still has them from
    // serving them), unless a rotated token of theirs still waits to be stored.
    let mut mine = held.len();
    let listed: HashSet<&str> = ids.iter().map(String::as_str).collect();
    for id in held.keys().filter(|id| !listed.contains(id.as_str())) {
        match release_removed(store, pool, id).await {
            Some(Ok(())) => {
                tracing::info!(account = %id, "cluster: lease given up (the account left this node's accounts file)");
                mine -= 1;
            }
            Some(Err(e)) => tracing::warn!(account = %id, error = %e, "cluster: cannot release a lease"),
            None => {}
        }
    }
    let Ok((nodes, leases)) = store.cluster_view().await else { return };
    let live = nodes.iter().filter(|n| n.alive).count().max(1);
    let target = ids.len().div_ceil(live);
    // Nodes heard from lately, alive now or not: after a PostgreSQL outage longer than a lease
    // every heartbeat is stale, and the first node back would see itself alone and take every
    // account (the others getting theirs back one rebalancing at a time, for minutes). A node
    // takes at most its share among these in one tick: the others, back a tick later, take
    // theirs; gone for good, they leave the rest to the next ticks.
    let known = nodes
        .iter()
        .filter(|n| n.alive || (!n.leaving && n.heartbeat_age_ms < RECENT_NODE.as_millis() as i64))
        .count()
        .max(1);
    let per_tick = ids.len().div_ceil(known);
    let taken: HashSet<&str> = leases
        .iter()
        .filter(|l| l.node_id.is_some() && l.expires_in_ms > 0)
        .map(|l| l.account.as_str())
        .collect();
    if mine < target {
        // Start at a node-specific point so that nodes do not all race for the same account.
        let mut free: Vec<&String> = ids.iter().filter(|id| !taken.contains(id.as_str())).collect();
        if !free.is_empty() {
            let start = crate::hash::sha256(store.node_id().as_bytes())[0] as usize % free.len();
            free.rotate_left(start);
        }
        let mut acquired = 0;
        for id in free {
            if mine >= target || acquired >= per_tick {
                break;
            }
            match store.acquire(id).await {
                Ok(Some(h)) => {
                    adopt(store, pool, id, until).await;
                    tracing::info!(account = %id, epoch = h.epoch, "cluster: lease acquired");
                    mine += 1;
                    acquired += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(account = %id, error = %e, "cluster: cannot acquire a lease");
                    break;
                }
            }
        }
    } else if mine > target {
        // Hand idle accounts over, as many as the neediest live node lacks (a node restarted
        // empty in a rolling restart gets its share back in a tick or two, not one account a
        // tick from each node): nothing in flight, and no token refresh running (one that
        // finished after the handover would rotate the refresh token the new holder has just
        // loaded, and its own write would be fenced: the chain lost). The refresh guard is
        // held until the lease is given up, so none starts meanwhile either; one that starts
        // after sees the lease gone and does not refresh.
        let lacking = nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| target.saturating_sub(n.leases as usize))
            .max()
            .unwrap_or(0);
        let mut give = (mine - target).min(lacking);
        for a in pool
            .accounts()
            .into_iter()
            .filter(|a| held.contains_key(a.id.as_str()) && a.in_flight() == 0 && !a.tokens.has_unsaved())
        {
            if give == 0 {
                break;
            }
            let Some(_quiet) = a.tokens.quiet() else { continue };
            pool.hold(a.id.as_str(), 0);
            match store.release(a.id.as_str()).await {
                Ok(()) => tracing::info!(account = %a.id, "cluster: lease handed over (rebalancing)"),
                Err(e) => tracing::warn!(account = %a.id, error = %e, "cluster: cannot release a lease"),
            }
            give -= 1;
        }
    }
    match store.take_commands().await {
        Ok(cmds) => {
            for (id, cmd) in cmds {
                run_command(pool, &id, &cmd);
            }
        }
        Err(e) => tracing::debug!(error = %e, "cluster: cannot read commands"),
    }
    pool.revive_from_store_in_background();
}

/// Loads what the store holds for `id` (just acquired) and serves it until `until`.
async fn adopt(store: &PgStore, pool: &Arc<Pool>, id: &str, until: u64) {
    // Before the read: a refresh of this node's that lands meanwhile is newer than the record.
    let seen = pool.chain_generation(id);
    let own = match store.get_async(id).await {
        Ok(Some(rec)) => pool.adopt(id, crate::accounts::persist::restored_one(rec), seen).await,
        Ok(None) => pool.adopt(id, crate::accounts::pool::Restored::default(), seen).await,
        Err(e) => {
            // Serving on possibly stale tokens could refresh a dead chain: give it back.
            tracing::warn!(account = %id, error = %e, "cluster: cannot load the account; giving its lease back");
            let _ = store.release(id).await;
            return;
        }
    };
    // No identity stored yet: the one this node made is the account's from now on, stored
    // before it serves (queued, the write could be dropped with a lease lost meanwhile, and the
    // next holder would store a machine id of its own: a second installation).
    if let Some(identity) = own {
        if let Err(e) = store.put_identity_async(id, &identity).await {
            tracing::warn!(account = %id, error = %e, "cluster: cannot store the account's identity; giving its lease back");
            let _ = store.release(id).await;
            return;
        }
    }
    pool.hold(id, until);
}

/// An `amqctl` command queued by another node for an account this node holds. A refresh runs
/// on its own task: awaited here it held up the lease loop (a slow token endpoint, a refresh
/// queued behind others) past the renewals the leases need.
fn run_command(pool: &Arc<Pool>, id: &str, cmd: &str) {
    tracing::info!(account = %id, command = %cmd, "cluster: command from another node");
    match cmd {
        "enable" => {
            pool.enable(id);
        }
        "disable" => {
            pool.disable(id);
        }
        "refresh" => {
            if let Some(a) = pool.get(id) {
                let (pool, id) = (pool.clone(), id.to_owned());
                tokio::spawn(async move {
                    if let Err(e) = pool.refresh_now(&a).await {
                        tracing::warn!(account = %id, error = %e, "cluster: refresh failed");
                    }
                });
            }
        }
        other => tracing::warn!(command = %other, "cluster: unknown command"),
    }
}

impl ClusterView for PgStore {
    fn lease_left<'a>(
        &'a self,
        id: &'a str,
        guard: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + 'a>> {
        Box::pin(async move { PgStore::lease_left(self, id, guard).await.map_err(|e| e.to_string()) })
    }

    fn stored<'a>(
        &'a self,
        id: &'a str,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Option<crate::store::AccountRecord>, String>> + Send + 'a,
        >,
    > {
        Box::pin(async move { self.get_async(id).await.map_err(|e| e.to_string()) })
    }
}

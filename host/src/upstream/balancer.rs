//! Load balancing: a pure `select` over an immutable node set.
//!
//! A `NodeSet` is built once per config snapshot (or per discovery change) and swapped whole, so
//! selection never takes a lock. Round robin walks a precomputed smooth-weighted schedule with an
//! atomic cursor; consistent hashing binary-searches a ring; least-connections reads per-node
//! in-flight counters that the [`InFlight`] guard keeps.
//!
//! Passive health checks ([`Ejection`]) leave a node that keeps failing out of selection for a
//! while; when every candidate is out, selection ignores ejections (fails open) rather than
//! leave the upstream with nothing to try.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use crate::config::{ActiveCheck, BalancerKind, PassiveCheck};

static CLOCK_START: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds of the gateway's monotonic clock, which ejections are timed by (never 0).
pub fn now_ms() -> u64 {
    u64::try_from(CLOCK_START.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// The longest an ejection lasts, however often the node was ejected before (unless
/// `eject_ms` itself is longer).
const MAX_EJECTION_MS: u64 = 600_000;

/// How one attempt on a node went, as passive health checks judge it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer that is not one of the unhealthy statuses.
    Success,
    /// A refused or reset connection, or an unhealthy status.
    Failure,
    /// No connection, or no answer, in time.
    Timeout,
    /// Not the node's doing (the client's body failed, say): counts for nothing.
    Neither,
}

/// Passive health checking of one upstream's nodes, in its runtime form.
#[derive(Clone, Debug)]
pub struct Ejection {
    statuses: Vec<u16>,
    failures: u32,
    timeouts: u32,
    eject_ms: u64,
    max_ejected_percent: u64,
}

impl Ejection {
    /// The runtime form of a validated `checks.passive`.
    pub fn new(config: &PassiveCheck) -> Self {
        Ejection {
            statuses: config.unhealthy.statuses.clone(),
            failures: config.unhealthy.failures,
            timeouts: config.unhealthy.timeouts,
            eject_ms: config.eject_ms,
            max_ejected_percent: u64::from(config.max_ejected_percent),
        }
    }

    /// How an answer with `status` counts.
    pub fn judge(&self, status: u16) -> Outcome {
        if self.statuses.contains(&status) {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }

    /// How long the `n`th ejection in a row (from 0) lasts: doubled each time, up to a cap.
    fn duration_ms(&self, n: u32) -> u64 {
        let cap = MAX_EJECTION_MS.max(self.eject_ms);
        self.eject_ms.saturating_mul(1u64 << n.min(20)).min(cap)
    }
}

/// The thresholds of active health checks, in their runtime form.
#[derive(Clone, Debug)]
pub struct Probing {
    successes: u32,
    failures: u32,
    timeouts: u32,
}

impl Probing {
    /// The thresholds of a validated `checks.active`.
    pub fn new(config: &ActiveCheck) -> Self {
        Probing {
            successes: config.healthy.successes,
            failures: config.unhealthy.failures,
            timeouts: config.unhealthy.timeouts,
        }
    }
}

/// What health checks know of one node.
#[derive(Debug, Default)]
struct Health {
    /// Set while active probes find it unhealthy.
    down: AtomicBool,
    /// Probes in a row that succeeded, failed or timed out.
    probe_successes: AtomicU32,
    probe_failures: AtomicU32,
    probe_timeouts: AtomicU32,
    /// Failures in a row.
    failures: AtomicU32,
    /// Timeouts in a row.
    timeouts: AtomicU32,
    /// Until when it is ejected, on [`now_ms`]'s clock; 0 when it never was.
    ejected_until: AtomicU64,
    /// Ejections since its last success, which lengthen the next one.
    ejections: AtomicU32,
}

/// One backend address and its live counters.
#[derive(Debug)]
pub struct Node {
    /// `host:port`, as used in URIs and logs.
    pub addr: String,
    /// Share of traffic; 0 takes it out of rotation.
    pub weight: u32,
    active: AtomicUsize,
    health: Health,
    /// Why its last probe failed, if it did.
    last_probe_error: std::sync::Mutex<Option<String>>,
}

impl Node {
    /// A node with no requests in flight.
    pub fn new(addr: impl Into<String>, weight: u32) -> Self {
        Node {
            addr: addr.into(),
            weight,
            active: AtomicUsize::new(0),
            health: Health::default(),
            last_probe_error: std::sync::Mutex::new(None),
        }
    }

    /// Why its last probe failed, if it did.
    pub fn last_probe_error(&self) -> Option<String> {
        self.last_probe_error
            .lock()
            .expect("probe error lock")
            .clone()
    }

    /// Remembers how its last probe went.
    pub fn set_last_probe_error(&self, error: Option<String>) {
        *self.last_probe_error.lock().expect("probe error lock") = error;
    }

    /// Requests in flight to this node.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// How much longer it is ejected at `now_ms`, if it is.
    pub fn ejected_for_ms(&self, now_ms: u64) -> Option<u64> {
        let until = self.health.ejected_until.load(Ordering::Relaxed);
        (until > now_ms).then(|| until - now_ms)
    }

    fn is_ejected(&self, now_ms: u64) -> bool {
        self.health.ejected_until.load(Ordering::Relaxed) > now_ms
    }

    /// Whether active probes find it healthy (true when it is not probed).
    pub fn is_up(&self) -> bool {
        !self.health.down.load(Ordering::Relaxed)
    }

    /// Whether selection leaves it out at `now_ms`.
    fn is_out(&self, now_ms: u64) -> bool {
        !self.is_up() || self.is_ejected(now_ms)
    }
}

/// Counts a request as in flight to a node until it is dropped, and holds its place under
/// the node's `max_connections` as long.
#[derive(Debug)]
pub struct InFlight {
    node: Arc<Node>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl InFlight {
    /// Marks a request as in flight to `node`, in `slot` if the node's connections are limited.
    pub fn begin(node: Arc<Node>, slot: Option<tokio::sync::OwnedSemaphorePermit>) -> Self {
        node.active.fetch_add(1, Ordering::Relaxed);
        InFlight { node, _slot: slot }
    }

    /// The node the request went to.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.node.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The nodes of an upstream and the state each balancing kind needs.
#[derive(Debug)]
pub struct NodeSet {
    nodes: Vec<Arc<Node>>,
    strategy: Strategy,
    cursor: AtomicUsize,
    ejection: Option<Ejection>,
    probing: Option<Probing>,
}

#[derive(Debug)]
enum Strategy {
    /// Node indices in smooth weighted round-robin order.
    Schedule(Vec<usize>),
    /// `(point, node index)`, sorted by point.
    Ring(Vec<(u64, usize)>),
    LeastConn,
}

/// Keeps the round-robin schedule short when weights are large.
const MAX_SCHEDULE: u64 = 4096;
/// Ring points per unit of weight.
const POINTS_PER_WEIGHT: u32 = 160;
/// Bounds the ring for very large weights.
const MAX_RING: u64 = 64 * 1024;

impl NodeSet {
    /// Builds a set; nodes with weight 0 are kept for display but never selected.
    pub fn new(nodes: Vec<Arc<Node>>, kind: BalancerKind) -> Self {
        Self::checked(nodes, kind, None, None)
    }

    /// Builds a set whose nodes are ejected as `ejection` says and taken out and back as the
    /// probes `probing` judges say (none: never).
    pub fn checked(
        nodes: Vec<Arc<Node>>,
        kind: BalancerKind,
        ejection: Option<Ejection>,
        probing: Option<Probing>,
    ) -> Self {
        let strategy = match kind {
            BalancerKind::Roundrobin => Strategy::Schedule(smooth_schedule(&nodes)),
            BalancerKind::Chash => Strategy::Ring(hash_ring(&nodes)),
            BalancerKind::LeastConn => Strategy::LeastConn,
        };
        NodeSet {
            nodes,
            strategy,
            cursor: AtomicUsize::new(0),
            ejection,
            probing,
        }
    }

    /// Records a probe of node `index`; `Some(healthy)` when this changed its state.
    pub fn observe(&self, index: usize, outcome: Outcome) -> Option<bool> {
        let probing = self.probing.as_ref()?;
        let health = &self.nodes[index].health;
        let (streak, threshold, healthy) = match outcome {
            Outcome::Neither => return None,
            Outcome::Success => {
                health.probe_failures.store(0, Ordering::Relaxed);
                health.probe_timeouts.store(0, Ordering::Relaxed);
                (&health.probe_successes, probing.successes, true)
            }
            Outcome::Failure => {
                health.probe_successes.store(0, Ordering::Relaxed);
                (&health.probe_failures, probing.failures, false)
            }
            Outcome::Timeout => {
                health.probe_successes.store(0, Ordering::Relaxed);
                (&health.probe_timeouts, probing.timeouts, false)
            }
        };
        let count = streak.fetch_add(1, Ordering::Relaxed) + 1;
        let was_up = self.nodes[index].is_up();
        if healthy == was_up || threshold == 0 || count < threshold {
            return None;
        }
        health.down.store(!healthy, Ordering::Relaxed);
        if healthy {
            // Back by its probes: whatever passive checks held against it is forgiven too.
            health.ejected_until.store(0, Ordering::Relaxed);
            health.ejections.store(0, Ordering::Relaxed);
        }
        Some(healthy)
    }

    /// The set's passive health checking, if it has any.
    pub fn ejection(&self) -> Option<&Ejection> {
        self.ejection.as_ref()
    }

    /// The time to select at: [`now_ms`] when the set ejects nodes; without ejection no node
    /// ever has an ejection to time, so the clock is not read.
    pub fn select_time(&self) -> u64 {
        if self.ejection.is_some() { now_ms() } else { 0 }
    }

    /// Records how an attempt on node `index` went at `now_ms`. True when this ejected it.
    pub fn record(&self, index: usize, outcome: Outcome, now_ms: u64) -> bool {
        let Some(ejection) = &self.ejection else {
            return false;
        };
        let health = &self.nodes[index].health;
        let (streak, threshold) = match outcome {
            Outcome::Neither => return false,
            Outcome::Success => {
                // Most answers are successes on a node with nothing to forget: read before
                // writing, so that they do not all write the node's shared counters.
                clear(&health.failures);
                clear(&health.timeouts);
                clear(&health.ejections);
                // A node tried while out (failing open) and found working is back at once.
                if health.ejected_until.load(Ordering::Relaxed) != 0 {
                    health.ejected_until.store(0, Ordering::Relaxed);
                }
                return false;
            }
            Outcome::Failure => (&health.failures, ejection.failures),
            Outcome::Timeout => (&health.timeouts, ejection.timeouts),
        };
        let count = streak.fetch_add(1, Ordering::Relaxed) + 1;
        if threshold == 0 || count < threshold || self.nodes[index].is_ejected(now_ms) {
            return false;
        }
        // Never more than the allowed share out at once (two ejections at the same moment can
        // pass this together; the share is a bound on purpose, not an exact count).
        let out = self.nodes.iter().filter(|n| n.is_ejected(now_ms)).count() as u64;
        if (out + 1) * 100 > ejection.max_ejected_percent * self.nodes.len() as u64 {
            return false;
        }
        let n = health.ejections.fetch_add(1, Ordering::Relaxed);
        health
            .ejected_until
            .store(now_ms + ejection.duration_ms(n), Ordering::Relaxed);
        health.failures.store(0, Ordering::Relaxed);
        health.timeouts.store(0, Ordering::Relaxed);
        true
    }

    /// Every node, in config order.
    pub fn nodes(&self) -> &[Arc<Node>] {
        &self.nodes
    }

    /// How many nodes can be selected (weight above 0).
    pub fn selectable(&self) -> usize {
        self.nodes.iter().filter(|n| n.weight > 0).count()
    }

    /// Picks a node at `now_ms`, skipping those in `tried` and those ejected; `None` when every
    /// node was tried. `key` is the request's hash for a chash set. The flag is true when every
    /// untried node was ejected, so one was picked regardless (failing open).
    pub fn select(&self, key: u64, tried: &[usize], now_ms: u64) -> Option<(usize, bool)> {
        let start = self.advance(tried);
        let healthy = self.pick(key, start, |i| {
            tried.contains(&i) || self.nodes[i].is_out(now_ms)
        });
        match healthy {
            Some(index) => Some((index, false)),
            None => self
                .pick(key, start, |i| tried.contains(&i))
                .map(|index| (index, true)),
        }
    }

    /// The first node from `start` (a schedule or scan position) that `skip` does not rule out.
    fn pick(&self, key: u64, start: usize, skip: impl Fn(usize) -> bool) -> Option<usize> {
        match &self.strategy {
            Strategy::Schedule(schedule) => {
                if schedule.is_empty() {
                    return None;
                }
                (0..schedule.len())
                    .map(|i| schedule[(start + i) % schedule.len()])
                    .find(|&n| !skip(n))
            }
            Strategy::Ring(ring) => {
                if ring.is_empty() {
                    return None;
                }
                let start = ring.partition_point(|&(point, _)| point < key);
                (0..ring.len())
                    .map(|i| ring[(start + i) % ring.len()].1)
                    .find(|&n| !skip(n))
            }
            Strategy::LeastConn => {
                // Rotate the scan's start so that ties spread instead of piling onto node 0.
                let len = self.nodes.len();
                (0..len)
                    .map(|i| (start + i) % len)
                    .filter(|&i| self.nodes[i].weight > 0 && !skip(i))
                    .min_by(|&a, &b| {
                        // Compare (active+1)/weight without division.
                        let cost = |i: usize| {
                            (self.nodes[i].active() as u128 + 1) * 1_000_000
                                / self.nodes[i].weight as u128
                        };
                        cost(a).cmp(&cost(b))
                    })
            }
        }
    }

    /// The node at `index`.
    pub fn node(&self, index: usize) -> &Arc<Node> {
        &self.nodes[index]
    }

    /// Where a scan starts: a request's first pick moves the cursor on; its retries do not, so
    /// that a failing node does not shift the schedule for the requests after it.
    fn advance(&self, tried: &[usize]) -> usize {
        if tried.is_empty() {
            self.cursor.fetch_add(1, Ordering::Relaxed)
        } else {
            self.cursor.load(Ordering::Relaxed)
        }
    }
}

/// Sets a streak counter to 0, writing only when it is not 0 already.
fn clear(counter: &AtomicU32) {
    if counter.load(Ordering::Relaxed) != 0 {
        counter.store(0, Ordering::Relaxed);
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Nginx's smooth weighted round robin, unrolled into one cycle of indices.
fn smooth_schedule(nodes: &[Arc<Node>]) -> Vec<usize> {
    let mut weights: Vec<u64> = nodes.iter().map(|n| n.weight as u64).collect();
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    weights.iter_mut().for_each(|w| *w /= divisor);
    let total: u64 = weights.iter().sum();
    if total > MAX_SCHEDULE {
        // Scale down, keeping every live node in the cycle.
        weights
            .iter_mut()
            .filter(|w| **w > 0)
            .for_each(|w| *w = (*w * MAX_SCHEDULE / total).max(1));
    }
    let total: i64 = weights.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += *w as i64;
        }
        let best = (0..weights.len())
            .filter(|&i| weights[i] > 0)
            .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
            .expect("total > 0 means a node has weight");
        current[best] -= total;
        schedule.push(best);
    }
    schedule
}

fn hash_ring(nodes: &[Arc<Node>]) -> Vec<(u64, usize)> {
    let total: u64 = nodes.iter().map(|n| n.weight as u64).sum::<u64>() * POINTS_PER_WEIGHT as u64;
    let scale = if total > MAX_RING {
        MAX_RING as f64 / total as f64
    } else {
        1.0
    };
    let mut ring = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        if node.weight == 0 {
            continue;
        }
        let points =
            ((node.weight as u64 * POINTS_PER_WEIGHT as u64) as f64 * scale).max(1.0) as u32;
        for point in 0..points {
            ring.push((hash_key(format!("{}#{point}", node.addr).as_bytes()), index));
        }
    }
    ring.sort_unstable();
    ring
}

/// The hash used for ring points and request keys.
pub fn hash_key(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl NodeSet {
        /// `select` at time 1, for tests without ejections.
        fn pick_now(&self, key: u64, tried: &[usize]) -> Option<usize> {
            self.select(key, tried, 1).map(|(index, _)| index)
        }
    }

    #[test]
    fn retries_do_not_shift_the_round_robin_schedule() {
        let nodes = vec![Arc::new(Node::new("a", 1)), Arc::new(Node::new("b", 1))];
        let set = NodeSet::new(nodes, BalancerKind::Roundrobin);
        // Node 0 fails every time it is picked; the retry goes to 1.
        let mut first_picks = Vec::new();
        for _ in 0..6 {
            let first = set.pick_now(0, &[]).unwrap();
            first_picks.push(first);
            if first == 0 {
                assert_eq!(set.pick_now(0, &[0]), Some(1));
            }
        }
        assert_eq!(first_picks, [0, 1, 0, 1, 0, 1]);
    }

    fn set(weights: &[u32], kind: BalancerKind) -> NodeSet {
        let nodes = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Arc::new(Node::new(format!("10.0.0.{i}:80"), *w)))
            .collect();
        NodeSet::new(nodes, kind)
    }

    fn counts(set: &NodeSet, picks: usize, key: impl Fn(usize) -> u64) -> Vec<usize> {
        let mut counts = vec![0; set.nodes().len()];
        for i in 0..picks {
            counts[set.pick_now(key(i), &[]).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_follows_weights_smoothly() {
        let s = set(&[5, 1, 1], BalancerKind::Roundrobin);
        let first: Vec<_> = (0..7).map(|_| s.pick_now(0, &[]).unwrap()).collect();
        // Nginx's documented order for weights 5,1,1: a a b a c a a.
        assert_eq!(first, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&s, 700, |_| 0), vec![500, 100, 100]);
    }

    #[test]
    fn round_robin_skips_zero_weight_and_tried_nodes() {
        let s = set(&[1, 0, 1], BalancerKind::Roundrobin);
        assert_eq!(counts(&s, 100, |_| 0), vec![50, 0, 50]);
        for _ in 0..10 {
            assert_eq!(s.pick_now(0, &[0]), Some(2));
        }
        assert_eq!(s.pick_now(0, &[0, 2]), None);
    }

    #[test]
    fn large_weights_keep_proportions_in_a_short_schedule() {
        let s = set(&[100_000, 50_000], BalancerKind::Roundrobin);
        assert_eq!(counts(&s, 3000, |_| 0), vec![2000, 1000]);
    }

    #[test]
    fn consistent_hash_is_stable_and_moves_few_keys_when_a_node_goes() {
        let four = set(&[1, 1, 1, 1], BalancerKind::Chash);
        let keys: Vec<u64> = (0..2000)
            .map(|i| hash_key(format!("user-{i}").as_bytes()))
            .collect();
        let before: Vec<_> = keys
            .iter()
            .map(|k| four.pick_now(*k, &[]).unwrap())
            .collect();
        let again: Vec<_> = keys
            .iter()
            .map(|k| four.pick_now(*k, &[]).unwrap())
            .collect();
        assert_eq!(before, again);
        let spread = counts(&four, 2000, |i| keys[i]);
        assert!(spread.iter().all(|&c| c > 300), "{spread:?}");
        // Removing node 3 (by weight 0) only moves the keys that were on it.
        let three = set(&[1, 1, 1, 0], BalancerKind::Chash);
        for (k, old) in keys.iter().zip(&before) {
            let new = three.pick_now(*k, &[]).unwrap();
            if *old != 3 {
                assert_eq!(new, *old);
            }
        }
        // A retry moves to another node.
        let first = four.pick_now(keys[0], &[]).unwrap();
        assert_ne!(four.pick_now(keys[0], &[first]).unwrap(), first);
    }

    #[test]
    fn least_conn_prefers_the_idlest_node_relative_to_weight() {
        let s = set(&[1, 1, 2], BalancerKind::LeastConn);
        let busy: Vec<_> = (0..3)
            .map(|_| InFlight::begin(s.node(0).clone(), None))
            .collect();
        let also: Vec<_> = (0..2)
            .map(|_| InFlight::begin(s.node(2).clone(), None))
            .collect();
        // Costs: node0 4/1, node1 1/1, node2 3/2.
        assert_eq!(s.pick_now(0, &[]), Some(1));
        let one = InFlight::begin(s.node(1).clone(), None);
        // node1 now 2/1, node2 3/2: node2 wins.
        assert_eq!(s.pick_now(0, &[]), Some(2));
        drop((busy, also, one));
        assert_eq!(s.nodes().iter().map(|n| n.active()).sum::<usize>(), 0);
        // All idle with equal weights: ties rotate across nodes.
        let even = set(&[1, 1, 1], BalancerKind::LeastConn);
        assert_eq!(counts(&even, 300, |_| 0), vec![100, 100, 100]);
    }

    fn passive(failures: u32, timeouts: u32, max_ejected_percent: u8) -> Ejection {
        Ejection::new(&PassiveCheck {
            unhealthy: crate::config::PassiveUnhealthy {
                statuses: vec![502, 503, 504],
                failures,
                timeouts,
            },
            eject_ms: 1000,
            max_ejected_percent,
        })
    }

    fn checked(n: usize, ejection: Ejection) -> NodeSet {
        let nodes = (0..n)
            .map(|i| Arc::new(Node::new(format!("10.0.0.{i}:80"), 1)))
            .collect();
        NodeSet::checked(nodes, BalancerKind::Roundrobin, Some(ejection), None)
    }

    #[test]
    fn failures_in_a_row_eject_a_node_and_a_success_breaks_the_streak() {
        let s = checked(3, passive(3, 2, 50));
        assert!(!s.record(0, Outcome::Failure, 10));
        assert!(!s.record(0, Outcome::Failure, 10));
        assert!(
            !s.record(0, Outcome::Success, 10),
            "a success resets the streak"
        );
        assert!(!s.record(0, Outcome::Failure, 10));
        assert!(!s.record(0, Outcome::Failure, 10));
        assert!(!s.record(0, Outcome::Neither, 10), "not the node's doing");
        assert!(s.record(0, Outcome::Failure, 10));
        assert_eq!(s.node(0).ejected_for_ms(10), Some(1000));
        // While it is out, it is never picked; the others share its traffic.
        for _ in 0..20 {
            let (index, failed_open) = s.select(0, &[], 500).unwrap();
            assert_ne!(index, 0);
            assert!(!failed_open);
        }
        // Its time up, it is back.
        assert_eq!(s.node(0).ejected_for_ms(1010), None);
        assert!((0..3).any(|_| s.select(0, &[], 1010).unwrap().0 == 0));
        // Timeouts count on their own streak; with node 0 out, a second node would be more
        // than half of three.
        assert!(!s.record(1, Outcome::Timeout, 20));
        assert!(!s.record(1, Outcome::Timeout, 20), "over the share");
        assert!(
            s.record(1, Outcome::Timeout, 2000),
            "node 0 is back: within the share"
        );
        assert_eq!(
            (
                s.node(0).ejected_for_ms(2000),
                s.node(1).ejected_for_ms(2000)
            ),
            (None, Some(1000))
        );
    }

    #[test]
    fn a_repeat_ejection_lasts_twice_as_long_until_a_success() {
        let s = checked(2, passive(1, 0, 50));
        assert!(s.record(0, Outcome::Failure, 1));
        assert_eq!(s.node(0).ejected_for_ms(1), Some(1000));
        assert!(s.record(0, Outcome::Failure, 2000));
        assert_eq!(s.node(0).ejected_for_ms(2000), Some(2000));
        assert!(s.record(0, Outcome::Failure, 5000));
        assert_eq!(s.node(0).ejected_for_ms(5000), Some(4000));
        assert!(
            !s.record(0, Outcome::Timeout, 10_000),
            "timeouts: 0 never ejects"
        );
        s.record(0, Outcome::Success, 10_000);
        assert!(s.record(0, Outcome::Failure, 10_001));
        assert_eq!(s.node(0).ejected_for_ms(10_001), Some(1000));
        // The doubling stops at the cap.
        assert_eq!(passive(1, 1, 50).duration_ms(40), MAX_EJECTION_MS);
    }

    #[test]
    fn no_more_than_the_share_is_ejected_and_an_all_out_set_fails_open() {
        let s = checked(4, passive(1, 1, 50));
        assert!(s.record(0, Outcome::Failure, 1));
        assert!(s.record(1, Outcome::Failure, 1));
        assert!(!s.record(2, Outcome::Failure, 1), "half are out already");
        assert_eq!(s.node(2).ejected_for_ms(1), None);
        // With the share at 100%, every node can go; then one is tried regardless.
        let all = checked(2, passive(1, 1, 100));
        assert!(all.record(0, Outcome::Failure, 1));
        assert!(all.record(1, Outcome::Failure, 1));
        let (first, failed_open) = all.select(0, &[], 2).unwrap();
        assert!(failed_open);
        assert_eq!(all.select(0, &[first], 2).map(|(i, _)| i), Some(1 - first));
        assert_eq!(all.select(0, &[0, 1], 2), None);
        // A node tried while out and found working is back at once.
        all.record(first, Outcome::Success, 3);
        assert_eq!(all.select(0, &[], 3), Some((first, false)));
    }

    #[test]
    fn statuses_are_judged_by_the_configured_list() {
        let e = passive(1, 1, 50);
        assert_eq!(e.judge(503), Outcome::Failure);
        assert_eq!(e.judge(500), Outcome::Success);
        assert_eq!(e.judge(200), Outcome::Success);
    }

    #[test]
    fn probes_take_a_node_out_and_bring_it_back() {
        let probing = Probing {
            successes: 2,
            failures: 3,
            timeouts: 2,
        };
        let nodes = (0..2)
            .map(|i| Arc::new(Node::new(format!("10.0.0.{i}:80"), 1)))
            .collect();
        let s = NodeSet::checked(nodes, BalancerKind::Roundrobin, None, Some(probing));
        assert_eq!(s.observe(0, Outcome::Failure), None);
        assert_eq!(s.observe(0, Outcome::Failure), None);
        assert_eq!(
            s.observe(0, Outcome::Success),
            None,
            "a success breaks the streak"
        );
        assert_eq!(s.observe(0, Outcome::Timeout), None);
        assert_eq!(s.observe(0, Outcome::Timeout), Some(false));
        assert!(!s.node(0).is_up());
        assert!((0..10).all(|_| s.select(0, &[], 1) == Some((1, false))));
        assert_eq!(s.observe(0, Outcome::Timeout), None, "already out");
        assert_eq!(s.observe(0, Outcome::Success), None);
        assert_eq!(
            s.observe(0, Outcome::Failure),
            None,
            "a failure breaks the way back"
        );
        assert_eq!(s.observe(0, Outcome::Success), None);
        assert_eq!(s.observe(0, Outcome::Success), Some(true));
        assert!(s.node(0).is_up());
        assert!((0..4).any(|_| s.select(0, &[], 1) == Some((0, false))));
        // With both out, one is still tried.
        for _ in 0..2 {
            s.observe(0, Outcome::Timeout);
            s.observe(1, Outcome::Timeout);
        }
        assert_eq!(s.select(0, &[], 1).map(|(_, open)| open), Some(true));
    }
}

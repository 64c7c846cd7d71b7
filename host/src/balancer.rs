//! Load balancing: a pure `select` over an immutable node set.
//!
//! A `NodeSet` is built once per config snapshot (or per discovery change) and swapped whole, so
//! selection never takes a lock. Round robin walks a precomputed smooth-weighted schedule with an
//! atomic cursor; consistent hashing binary-searches a ring; least-connections reads per-node
//! in-flight counters that the [`InFlight`] guard keeps.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::BalancerKind;

/// One backend address and its live counters.
#[derive(Debug)]
pub struct Node {
    /// `host:port`, as used in URIs and logs.
    pub addr: String,
    /// Share of traffic; 0 takes it out of rotation.
    pub weight: u32,
    active: AtomicUsize,
}

impl Node {
    /// A node with no requests in flight.
    pub fn new(addr: impl Into<String>, weight: u32) -> Self {
        Node {
            addr: addr.into(),
            weight,
            active: AtomicUsize::new(0),
        }
    }

    /// Requests in flight to this node.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Counts a request as in flight to a node until it is dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Node>);

impl InFlight {
    /// Marks a request as in flight to `node`.
    pub fn begin(node: Arc<Node>) -> Self {
        node.active.fetch_add(1, Ordering::Relaxed);
        InFlight(node)
    }

    /// The node the request went to.
    pub fn node(&self) -> &Arc<Node> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The nodes of an upstream and the state each balancing kind needs.
#[derive(Debug)]
pub struct NodeSet {
    nodes: Vec<Arc<Node>>,
    strategy: Strategy,
    cursor: AtomicUsize,
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
        let strategy = match kind {
            BalancerKind::Roundrobin => Strategy::Schedule(smooth_schedule(&nodes)),
            BalancerKind::Chash => Strategy::Ring(hash_ring(&nodes)),
            BalancerKind::LeastConn => Strategy::LeastConn,
        };
        NodeSet {
            nodes,
            strategy,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Every node, in config order.
    pub fn nodes(&self) -> &[Arc<Node>] {
        &self.nodes
    }

    /// How many nodes can be selected (weight above 0).
    pub fn selectable(&self) -> usize {
        self.nodes.iter().filter(|n| n.weight > 0).count()
    }

    /// Picks a node, skipping those in `tried`. `key` is the request's hash for a chash set.
    pub fn select(&self, key: u64, tried: &[usize]) -> Option<usize> {
        match &self.strategy {
            Strategy::Schedule(schedule) => {
                if schedule.is_empty() {
                    return None;
                }
                let start = self.advance(tried);
                (0..schedule.len())
                    .map(|i| schedule[(start + i) % schedule.len()])
                    .find(|n| !tried.contains(n))
            }
            Strategy::Ring(ring) => {
                if ring.is_empty() {
                    return None;
                }
                let start = ring.partition_point(|&(point, _)| point < key);
                (0..ring.len())
                    .map(|i| ring[(start + i) % ring.len()].1)
                    .find(|n| !tried.contains(n))
            }
            Strategy::LeastConn => {
                // Rotate the scan's start so that ties spread instead of piling onto node 0.
                let start = self.advance(tried);
                let len = self.nodes.len();
                (0..len)
                    .map(|i| (start + i) % len)
                    .filter(|&i| self.nodes[i].weight > 0 && !tried.contains(&i))
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

    #[test]
    fn retries_do_not_shift_the_round_robin_schedule() {
        let nodes = vec![Arc::new(Node::new("a", 1)), Arc::new(Node::new("b", 1))];
        let set = NodeSet::new(nodes, BalancerKind::Roundrobin);
        // Node 0 fails every time it is picked; the retry goes to 1.
        let mut first_picks = Vec::new();
        for _ in 0..6 {
            let first = set.select(0, &[]).unwrap();
            first_picks.push(first);
            if first == 0 {
                assert_eq!(set.select(0, &[0]), Some(1));
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
            counts[set.select(key(i), &[]).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_follows_weights_smoothly() {
        let s = set(&[5, 1, 1], BalancerKind::Roundrobin);
        let first: Vec<_> = (0..7).map(|_| s.select(0, &[]).unwrap()).collect();
        // Nginx's documented order for weights 5,1,1: a a b a c a a.
        assert_eq!(first, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&s, 700, |_| 0), vec![500, 100, 100]);
    }

    #[test]
    fn round_robin_skips_zero_weight_and_tried_nodes() {
        let s = set(&[1, 0, 1], BalancerKind::Roundrobin);
        assert_eq!(counts(&s, 100, |_| 0), vec![50, 0, 50]);
        for _ in 0..10 {
            assert_eq!(s.select(0, &[0]), Some(2));
        }
        assert_eq!(s.select(0, &[0, 2]), None);
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
        let before: Vec<_> = keys.iter().map(|k| four.select(*k, &[]).unwrap()).collect();
        let again: Vec<_> = keys.iter().map(|k| four.select(*k, &[]).unwrap()).collect();
        assert_eq!(before, again);
        let spread = counts(&four, 2000, |i| keys[i]);
        assert!(spread.iter().all(|&c| c > 300), "{spread:?}");
        // Removing node 3 (by weight 0) only moves the keys that were on it.
        let three = set(&[1, 1, 1, 0], BalancerKind::Chash);
        for (k, old) in keys.iter().zip(&before) {
            let new = three.select(*k, &[]).unwrap();
            if *old != 3 {
                assert_eq!(new, *old);
            }
        }
        // A retry moves to another node.
        let first = four.select(keys[0], &[]).unwrap();
        assert_ne!(four.select(keys[0], &[first]).unwrap(), first);
    }

    #[test]
    fn least_conn_prefers_the_idlest_node_relative_to_weight() {
        let s = set(&[1, 1, 2], BalancerKind::LeastConn);
        let busy: Vec<_> = (0..3).map(|_| InFlight::begin(s.node(0).clone())).collect();
        let also: Vec<_> = (0..2).map(|_| InFlight::begin(s.node(2).clone())).collect();
        // Costs: node0 4/1, node1 1/1, node2 3/2.
        assert_eq!(s.select(0, &[]), Some(1));
        let one = InFlight::begin(s.node(1).clone());
        // node1 now 2/1, node2 3/2: node2 wins.
        assert_eq!(s.select(0, &[]), Some(2));
        drop((busy, also, one));
        assert_eq!(s.nodes().iter().map(|n| n.active()).sum::<usize>(), 0);
        // All idle with equal weights: ties rotate across nodes.
        let even = set(&[1, 1, 1], BalancerKind::LeastConn);
        assert_eq!(counts(&even, 300, |_| 0), vec![100, 100, 100]);
    }
}

//! When a request goes to another node: an upstream's retry policy and its retry budget.
//!
//! A retry before anything reached a node (the connection could not be made) costs the nodes
//! nothing, so only `retry_on` governs it. A retry after a node took the request (it timed out,
//! reset the connection or answered a `retry_on` status) sends the same work again: it needs a
//! method from `retry_methods`, a body that can be sent again, and room in the budget.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use http::Method;

use crate::config::{RetryBudgetConfig, RetryOn, UpstreamConfig};

/// Seconds of history the budget weighs retries against.
const WINDOW_SECONDS: usize = 10;

/// An upstream's retry policy, resolved from its config.
#[derive(Debug)]
pub struct RetryPolicy {
    on: Vec<RetryOn>,
    methods: Vec<Method>,
    /// Present when `retry_on` names anything after a node took the request.
    budget: Option<RetryBudget>,
}

impl RetryPolicy {
    /// The policy `config` sets.
    pub fn new(config: &UpstreamConfig) -> Self {
        let resends = config.retry_on.iter().any(|on| on.after_send());
        RetryPolicy {
            on: config.retry_on.clone(),
            methods: config
                .retry_methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            budget: resends.then(|| RetryBudget::new(config.retry_budget)),
        }
    }

    /// Whether a request with `method` may go to another node after one took it.
    pub fn may_resend(&self, method: &Method) -> bool {
        self.budget.is_some() && self.methods.contains(method)
    }

    /// Whether `retry_on` names what happened.
    pub fn covers(&self, happened: RetryOn) -> bool {
        self.on.contains(&happened)
    }

    /// Counts a request toward the budget. Without a budget the clock is not read.
    pub fn request(&self) {
        if let Some(budget) = &self.budget {
            budget.request(crate::upstream::balancer::now_ms());
        }
    }

    /// Takes a retry after a node took the request from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.budget
            .as_ref()
            .is_some_and(|b| b.withdraw(crate::upstream::balancer::now_ms()))
    }
}

/// Retries as a share of requests over a sliding window of seconds, with a floor per second.
///
/// Counts live in one bucket per second of the window; a bucket is reset by the first request
/// of a new second. Under contention a count can be lost as a bucket turns over, which makes
/// the budget approximate by a request or two, never unbounded.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u64,
    min_per_second: u32,
    buckets: [Bucket; WINDOW_SECONDS],
}

#[derive(Debug, Default)]
struct Bucket {
    /// The second (since the gateway's clock started, plus one) the counts belong to.
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

impl RetryBudget {
    /// A budget as `config` sets it.
    pub fn new(config: RetryBudgetConfig) -> Self {
        RetryBudget {
            percent: u64::from(config.percent),
            min_per_second: config.min_per_second,
            buckets: Default::default(),
        }
    }

    /// The bucket of `second`, cleared if it last held an older second.
    fn bucket(&self, second: u64) -> &Bucket {
        let bucket = &self.buckets[(second % WINDOW_SECONDS as u64) as usize];
        let held = bucket.second.load(Ordering::Acquire);
        if held != second
            && bucket
                .second
                .compare_exchange(held, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            bucket.requests.store(0, Ordering::Relaxed);
            bucket.retries.store(0, Ordering::Relaxed);
        }
        bucket
    }

    /// Counts one request at `now_ms`.
    pub fn request(&self, now_ms: u64) {
        self.bucket(now_ms / 1000)
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry at `now_ms` if the window allows it.
    pub fn withdraw(&self, now_ms: u64) -> bool {
        let second = now_ms / 1000;
        let current = self.bucket(second);
        let (mut requests, mut retries) = (0u64, 0u64);
        for bucket in &self.buckets {
            let held = bucket.second.load(Ordering::Acquire);
            if held + (WINDOW_SECONDS as u64) > second && held <= second {
                requests += u64::from(bucket.requests.load(Ordering::Relaxed));
                retries += u64::from(bucket.retries.load(Ordering::Relaxed));
            }
        }
        let by_share = (retries + 1) * 100 <= requests * self.percent;
        let by_floor = current.retries.load(Ordering::Relaxed) < self.min_per_second;
        if by_share || by_floor {
            current.retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(percent: u32, min_per_second: u32) -> RetryBudget {
        RetryBudget::new(RetryBudgetConfig {
            percent,
            min_per_second,
        })
    }

    #[test]
    fn the_floor_allows_a_few_retries_each_second_without_traffic() {
        let b = budget(20, 3);
        assert!((0..3).all(|_| b.withdraw(5_000)));
        assert!(!b.withdraw(5_999));
        // A new second brings the floor back.
        assert!(b.withdraw(6_000));
    }

    #[test]
    fn retries_stay_under_the_share_of_requests_in_the_window() {
        let b = budget(20, 0);
        for _ in 0..100 {
            b.request(1_000);
        }
        let allowed = (0..100).filter(|_| b.withdraw(1_500)).count();
        assert_eq!(allowed, 20);
        // Requests spread over the window count together.
        for _ in 0..50 {
            b.request(5_000);
        }
        assert_eq!((0..100).filter(|_| b.withdraw(5_500)).count(), 10);
    }

    #[test]
    fn requests_older_than_the_window_no_longer_pay_for_retries() {
        let b = budget(20, 0);
        for _ in 0..100 {
            b.request(1_000);
        }
        assert!(b.withdraw(10_999));
        assert!(!b.withdraw(11_000), "second 1 has left the 10 s window");
    }

    #[test]
    fn a_bucket_reused_for_a_later_second_starts_empty() {
        let b = budget(20, 1);
        for _ in 0..100 {
            b.request(2_000);
        }
        // Second 12 shares second 2's bucket: the old requests must not count.
        b.request(12_000);
        assert!(b.withdraw(12_000), "the floor");
        assert!(
            !b.withdraw(12_000),
            "1 request in the window pays for no retry"
        );
    }

    #[test]
    fn the_policy_reads_its_config() {
        let config: UpstreamConfig = serde_json::from_value(serde_json::json!({
            "id": "u", "nodes": [{"host": "127.0.0.1", "port": 1}],
            "retry_on": ["reset", 503, "504"], "retry_methods": ["GET", "POST"]
        }))
        .unwrap();
        let policy = RetryPolicy::new(&config);
        assert!(!policy.covers(RetryOn::ConnectFailure));
        assert!(policy.covers(RetryOn::Reset));
        assert!(policy.covers(RetryOn::Status(503)) && policy.covers(RetryOn::Status(504)));
        assert!(!policy.covers(RetryOn::Status(502)));
        assert!(policy.may_resend(&Method::POST) && !policy.may_resend(&Method::PUT));

        let only_connect: UpstreamConfig = serde_json::from_value(serde_json::json!({
            "id": "u", "nodes": [{"host": "127.0.0.1", "port": 1}],
            "retry_on": ["connect-failure"]
        }))
        .unwrap();
        let policy = RetryPolicy::new(&only_connect);
        assert!(policy.covers(RetryOn::ConnectFailure));
        assert!(policy.budget.is_none() && !policy.may_resend(&Method::GET));
    }

    #[test]
    fn retry_on_refuses_what_it_does_not_know() {
        for bad in [
            serde_json::json!(["connect_failure"]),
            serde_json::json!([200]),
            serde_json::json!([70000]),
        ] {
            let refused = serde_json::from_value::<UpstreamConfig>(serde_json::json!({
                "id": "u", "nodes": [{"host": "127.0.0.1", "port": 1}], "retry_on": bad
            }))
            .unwrap_err()
            .to_string();
            assert!(refused.contains("retry_on"), "{refused}");
        }
        let refused = serde_json::from_value::<UpstreamConfig>(serde_json::json!({
            "id": "u", "nodes": [{"host": "127.0.0.1", "port": 1}], "retry_methods": ["get"]
        }))
        .unwrap_err()
        .to_string();
        assert!(refused.contains("capitals"), "{refused}");
    }
}

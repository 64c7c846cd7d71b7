//! Quarantine: a plugin that keeps failing is not called for a while; its failure policy answers.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::Quarantine;

/// The longest a quarantine's backoff grows to.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct State {
    failures: VecDeque<Instant>,
    until: Option<Instant>,
    backoff: Duration,
    /// A retry is in flight after the backoff ended.
    probing: bool,
    quarantines: u64,
}

/// One plugin's recent failures and quarantine.
#[derive(Debug)]
pub struct PluginHealth {
    policy: Quarantine,
    /// False while nothing is recorded, so that healthy calls never take the lock.
    troubled: AtomicBool,
    state: Mutex<State>,
}

/// Whether a call may go ahead.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Call the plugin.
    Call,
    /// Do not; the plugin is quarantined for this much longer.
    Quarantined(Duration),
}

impl PluginHealth {
    /// A healthy plugin under `policy`.
    pub fn new(policy: Quarantine) -> Self {
        PluginHealth {
            policy,
            troubled: AtomicBool::new(false),
            state: Mutex::new(State {
                failures: VecDeque::new(),
                until: None,
                backoff: Duration::from_millis(policy.backoff_ms),
                probing: false,
                quarantines: 0,
            }),
        }
    }

    /// The policy it follows.
    pub fn policy(&self) -> Quarantine {
        self.policy
    }

    /// Decides whether the next call goes ahead. After a quarantine's backoff, one call goes
    /// through as a probe; the others keep failing until it succeeds.
    pub fn admit(&self, now: Instant) -> Admission {
        self.admit_at(|| now)
    }

    /// [`Self::admit`], reading the clock only when the plugin is in trouble.
    pub fn admit_at(&self, now: impl FnOnce() -> Instant) -> Admission {
        if !self.troubled.load(Ordering::Acquire) {
            return Admission::Call;
        }
        let now = now();
        let mut state = self.state.lock().expect("health lock");
        match state.until {
            Some(until) if now < until => Admission::Quarantined(until - now),
            Some(_) if state.probing => Admission::Quarantined(Duration::ZERO),
            Some(_) => {
                state.probing = true;
                Admission::Call
            }
            None => Admission::Call,
        }
    }

    /// Records a successful call: a probe that succeeds ends the quarantine.
    pub fn succeeded(&self) {
        if !self.troubled.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.state.lock().expect("health lock");
        if state.until.is_some() {
            state.until = None;
            state.probing = false;
            state.failures.clear();
            state.backoff = Duration::from_millis(self.policy.backoff_ms);
            self.troubled.store(false, Ordering::Release);
        } else if state.failures.is_empty() {
            self.troubled.store(false, Ordering::Release);
        }
    }

    /// Records a failure; returns true when it starts a quarantine.
    pub fn failed(&self, now: Instant) -> bool {
        if self.policy.traps == 0 {
            return false;
        }
        self.troubled.store(true, Ordering::Release);
        let mut state = self.state.lock().expect("health lock");
        if state.probing {
            // The probe failed: quarantine again, for twice as long.
            state.probing = false;
            state.backoff = (state.backoff * 2).min(MAX_BACKOFF);
            state.until = Some(now + state.backoff);
            state.quarantines += 1;
            return true;
        }
        let window = Duration::from_millis(self.policy.window_ms);
        while state
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            state.failures.pop_front();
        }
        state.failures.push_back(now);
        if state.until.is_none() && state.failures.len() >= self.policy.traps as usize {
            state.until = Some(now + state.backoff);
            state.failures.clear();
            state.quarantines += 1;
            return true;
        }
        false
    }

    /// How long the current quarantine still lasts, if there is one.
    pub fn quarantined_for(&self, now: Instant) -> Option<Duration> {
        let state = self.state.lock().expect("health lock");
        state
            .until
            .map(|until| until.saturating_duration_since(now))
    }

    /// How many quarantines there have been.
    pub fn quarantines(&self) -> u64 {
        self.state.lock().expect("health lock").quarantines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Quarantine {
        Quarantine {
            traps: 3,
            window_ms: 1000,
            backoff_ms: 100,
        }
    }

    #[test]
    fn failures_in_the_window_quarantine_then_a_probe_decides() {
        let health = PluginHealth::new(policy());
        let t0 = Instant::now();
        assert!(!health.failed(t0));
        assert!(!health.failed(t0 + Duration::from_millis(10)));
        assert_eq!(health.admit(t0), Admission::Call);
        assert!(health.failed(t0 + Duration::from_millis(20)));
        assert!(matches!(
            health.admit(t0 + Duration::from_millis(50)),
            Admission::Quarantined(_)
        ));
        // After the backoff one probe goes through; the rest wait for it.
        let later = t0 + Duration::from_millis(200);
        assert_eq!(health.admit(later), Admission::Call);
        assert!(matches!(health.admit(later), Admission::Quarantined(_)));
        // The probe fails: the next quarantine is twice as long.
        assert!(health.failed(later));
        assert!(matches!(
            health.admit(later + Duration::from_millis(150)),
            Admission::Quarantined(_)
        ));
        let after = later + Duration::from_millis(250);
        assert_eq!(health.admit(after), Admission::Call);
        health.succeeded();
        assert_eq!(health.admit(after), Admission::Call);
        assert_eq!(health.admit(after), Admission::Call);
        assert_eq!(health.quarantines(), 2);
        assert_eq!(health.quarantined_for(after), None);
    }

    #[test]
    fn old_failures_fall_out_of_the_window() {
        let health = PluginHealth::new(policy());
        let t0 = Instant::now();
        health.failed(t0);
        health.failed(t0 + Duration::from_millis(10));
        assert!(!health.failed(t0 + Duration::from_millis(1500)));
        assert_eq!(
            health.admit(t0 + Duration::from_millis(1500)),
            Admission::Call
        );
    }

    #[test]
    fn zero_traps_never_quarantines() {
        let health = PluginHealth::new(Quarantine {
            traps: 0,
            ..policy()
        });
        for i in 0..100 {
            assert!(!health.failed(Instant::now() + Duration::from_millis(i)));
        }
        assert_eq!(health.admit(Instant::now()), Admission::Call);
    }
}

//! The single-flight rule of on-demand builds, pure: one build at a time per artifact, none
//! while a failure backs off (the backoff doubling up to a cap). `http` keeps the map of
//! builds and asks this what a request leads to.

use std::time::{Duration, Instant};

/// What a build in progress or failed looks like to the next asker.
#[derive(Debug, Clone, PartialEq)]
pub enum Build {
    /// Running or waiting for a build slot; `backoff` is the one a failure doubles.
    Running { backoff: Option<Duration> },
    /// Failed; not tried again before `retry_at`.
    Failed {
        retry_at: Instant,
        backoff: Duration,
    },
}

/// What a request for an artifact that is not built leads to.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Come back in this many seconds.
    Wait(u64),
    /// Start the build; `backoff` is the last failure's, if any.
    Start { backoff: Option<Duration> },
}

/// The pure rule: one build at a time per artifact, none while a failure backs off.
pub fn next(entry: Option<&Build>, retry_after: u64, now: Instant) -> Next {
    match entry {
        Some(Build::Running { .. }) => Next::Wait(retry_after),
        Some(Build::Failed { retry_at, .. }) if *retry_at > now => {
            Next::Wait((*retry_at - now).as_secs_f64().ceil() as u64)
        }
        Some(Build::Failed { backoff, .. }) => Next::Start {
            backoff: Some(*backoff),
        },
        None => Next::Start { backoff: None },
    }
}

/// The backoff after a failure: `first`, or the last doubled, at most `max`.
pub fn next_backoff(last: Option<Duration>, first: Duration, max: Duration) -> Duration {
    last.map_or(first, |b| (b * 2).min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_build_at_a_time_and_none_while_a_failure_backs_off() {
        let now = Instant::now();
        let running = Build::Running { backoff: None };
        assert_eq!(next(Some(&running), 5, now), Next::Wait(5));
        assert_eq!(next(None, 5, now), Next::Start { backoff: None });
        let backoff = Duration::from_secs(60);
        let failed = Build::Failed {
            retry_at: now + Duration::from_millis(30_500),
            backoff,
        };
        assert_eq!(next(Some(&failed), 5, now), Next::Wait(31));
        let later = now + Duration::from_secs(31);
        let retry = Next::Start {
            backoff: Some(backoff),
        };
        assert_eq!(next(Some(&failed), 5, later), retry);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (first, max) = (Duration::from_secs(60), Duration::from_secs(3600));
        assert_eq!(next_backoff(None, first, max), Duration::from_secs(60));
        let b = next_backoff(Some(Duration::from_secs(60)), first, max);
        assert_eq!(b, Duration::from_secs(120));
        let b = next_backoff(Some(Duration::from_secs(2400)), first, max);
        assert_eq!(b, Duration::from_secs(3600));
    }
}

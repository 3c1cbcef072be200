//! Events the guest reports on its own initiative (today: OOM kills), taken
//! as a hostile guest could send them: only for containers this shim owns,
//! and never faster than a fixed rate, so a guest cannot make the shim flood
//! containerd with events or spin on the agent.

use std::future::Future;
use std::time::{Duration, Instant};

/// OOM events at once (a burst of containers killed together).
pub const OOM_BURST: u32 = 16;
/// OOM events per second after a burst.
pub const OOM_PER_SEC: u32 = 4;

/// A token bucket: `burst` tokens at most, `per_sec` new tokens a second.
#[derive(Debug)]
pub struct RateLimit {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    last: Instant,
}

impl RateLimit {
    /// A full bucket.
    pub fn new(burst: u32, per_sec: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            burst: f64::from(burst.max(1)),
            per_sec: f64::from(per_sec.max(1)),
            last: now,
        }
    }

    /// Takes a token at `now` if there is one; else how long until there is.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        }
    }

    /// Waits for a token.
    pub async fn acquire(&mut self) {
        while let Err(wait) = self.take(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// What [`forward_oom`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OomCounts {
    /// Events published.
    pub published: u64,
    /// Events naming a container this shim does not own.
    pub foreign: u64,
}

/// Forwards OOM events: `next` asks the guest for one (None: the stream
/// ended), `owns` says whether this shim owns a container id, `publish`
/// sends the event to containerd. The guest is asked no faster than `limit` allows,
/// so a guest answering at once costs the shim a bounded rate of work.
pub async fn forward_oom<N, NF, P, PF>(
    mut limit: RateLimit,
    mut next: N,
    owns: impl Fn(&str) -> bool,
    mut publish: P,
) -> OomCounts
where
    N: FnMut() -> NF,
    NF: Future<Output = Option<String>>,
    P: FnMut(String) -> PF,
    PF: Future<Output = ()>,
{
    let mut counts = OomCounts::default();
    loop {
        limit.acquire().await;
        let Some(cid) = next().await else {
            return counts;
        };
        if !owns(&cid) {
            counts.foreign += 1;
            kata_proto::warn_limited!(
                container = %cid.escape_debug(),
                dropped = counts.foreign,
                "the guest reported an OOM for a container this shim does not own: dropped"
            );
            continue;
        }
        counts.published += 1;
        publish(cid).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn bucket_refills_at_its_rate_and_caps_at_its_burst() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(3, 10, t0);
        for _ in 0..3 {
            assert!(r.take(t0).is_ok());
        }
        let wait = r.take(t0).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100));
        assert!(r.take(t0 + Duration::from_millis(100)).is_ok());
        assert!(r.take(t0 + Duration::from_millis(100)).is_err());
        // a long idle time refills to the burst, not beyond
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(r.take(later).is_ok());
        }
        assert!(r.take(later).is_err());
    }

    /// A hostile agent answering GetOOMEvent at once, forever, mostly with
    /// ids of other pods: only owned ids are published, at the limited rate.
    #[tokio::test]
    async fn foreign_ids_are_dropped_and_a_flood_is_rate_limited() {
        let asked = Arc::new(AtomicU64::new(0));
        let published = Arc::new(Mutex::new(Vec::new()));
        let a = asked.clone();
        let next = move || {
            let n = a.fetch_add(1, Ordering::SeqCst);
            async move {
                Some(if n % 3 == 0 {
                    "mine".to_string()
                } else {
                    format!("other-pod-{n}")
                })
            }
        };
        let p = published.clone();
        let publish = move |cid: String| {
            p.lock().unwrap().push(cid);
            async {}
        };
        let run = forward_oom(
            RateLimit::new(3, 20, Instant::now()),
            next,
            |cid| cid == "mine",
            publish,
        );
        // forward_oom never ends on an endless stream: run it for 500 ms
        let _ = tokio::time::timeout(Duration::from_millis(500), run).await;
        let asked = asked.load(Ordering::SeqCst);
        let published = published.lock().unwrap();
        assert!(published.iter().all(|c| c == "mine"), "{published:?}");
        assert!(!published.is_empty(), "owned ids are published");
        // 3 at once + 20/s for 0.5 s = 13; an unlimited loop asks millions
        assert!(asked <= 16, "the guest was asked {asked} times in 500 ms");
    }

    #[tokio::test]
    async fn the_stream_ending_ends_the_forwarder() {
        let mut left = vec!["a".to_string(), "zz".to_string(), "a".to_string()];
        let counts = forward_oom(
            RateLimit::new(10, 10, Instant::now()),
            move || {
                let v = left.pop();
                async move { v }
            },
            |c| c == "a",
            |_| async {},
        )
        .await;
        assert_eq!(
            counts,
            OomCounts {
                published: 2,
                foreign: 1
            }
        );
    }
}

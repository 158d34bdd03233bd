//! `replication-rate` (issue 15): a token bucket in the link's writer task that
//! bounds the wire bytes of application-write frames (`Write`, `Trim`,
//! `WriteZeroes`) per second.
//!
//! A large frame is not held back until its whole length is affordable: the
//! writer sends it in pieces as tokens come in (one quantum, a quarter of the
//! burst, at a time), so bytes keep flowing. That matters twice: the peer's idle
//! timeout (5 s without any byte) never fires on a slow link, and the core's
//! `ack-timeout` sees the socket take bytes (the writer reports each piece as
//! `Sent`), so neither mistakes a paced link for a dead peer. Frames that are not
//! paced (acks, barriers, keepalive, resync) never wait for tokens, but they stay
//! in order behind the writes queued before them.

use std::time::Duration;

use tokio::time::Instant;

/// Smallest burst: at low rates a burst of a tenth of a second would be a few KiB.
const MIN_BURST_BYTES: f64 = 16.0 * 1024.0;

/// Bytes per second with a burst of a tenth of a second (at least 16 KiB).
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate_bytes_per_sec: f64,
    burst_bytes: f64,
    /// What a waiting piece waits for: a quarter of the burst.
    quantum_bytes: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub(crate) fn new(rate_bytes_per_sec: u64, now: Instant) -> TokenBucket {
        let rate = rate_bytes_per_sec.max(1) as f64;
        let burst = (rate / 10.0).max(MIN_BURST_BYTES);
        TokenBucket {
            rate_bytes_per_sec: rate,
            burst_bytes: burst,
            quantum_bytes: burst / 4.0,
            tokens: burst,
            last: now,
        }
    }

    /// How many of `want` bytes may be written at `now` (at least one, and the whole
    /// of `want` or at least a quantum), or how long until that many tokens are in.
    pub(crate) fn grant(&mut self, now: Instant, want: u64) -> Result<u64, Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate_bytes_per_sec).min(self.burst_bytes);
        if want == 0 {
            return Ok(0);
        }
        let need = (want as f64).min(self.quantum_bytes);
        if self.tokens >= need {
            let n = (self.tokens.floor() as u64).clamp(1, want);
            self.tokens -= n as f64;
            Ok(n)
        } else {
            // At least 1 µs, so a shortfall rounded to nothing still moves the clock.
            let wait = Duration::from_secs_f64((need - self.tokens) / self.rate_bytes_per_sec);
            Err(wait.max(Duration::from_micros(1)))
        }
    }

    /// [`TokenBucket::grant`], waiting (on tokio's clock) until it says yes.
    pub(crate) async fn take(&mut self, want: u64) -> u64 {
        loop {
            match self.grant(Instant::now(), want) {
                Ok(n) => return n,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `total` bytes in `want`-sized asks on a virtual clock; returns when the
    /// last byte was granted and the largest piece.
    fn drain(rate: u64, total: u64, want: u64) -> (Duration, u64) {
        let start = Instant::now();
        let mut b = TokenBucket::new(rate, start);
        let (mut now, mut left, mut largest) = (start, total, 0);
        while left > 0 {
            match b.grant(now, want.min(left)) {
                Ok(n) => {
                    assert!(n >= 1 && n <= want.min(left));
                    largest = largest.max(n);
                    left -= n;
                }
                Err(wait) => {
                    assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
                    now += wait;
                }
            }
        }
        (now - start, largest)
    }

    #[test]
    fn the_rate_holds_over_a_long_run_after_one_burst() {
        for (rate, want) in [(1 << 20, 32 << 20), (100 << 20, 4096), (64 << 10, 1 << 20), (10 << 20, 100)] {
            let total = 5 * rate;
            let (took, largest) = drain(rate, total, want);
            // A full burst first, then exactly the rate: (total - burst) / rate.
            let burst = (rate as f64 / 10.0).max(MIN_BURST_BYTES);
            let ideal = (total as f64 - burst) / rate as f64;
            let secs = took.as_secs_f64();
            assert!((ideal - 0.01..=ideal + 0.01).contains(&secs), "rate {rate}: {secs} s, ideal {ideal} s");
            assert!(largest as f64 <= burst, "rate {rate}: a piece of {largest} bytes");
        }
    }

    #[test]
    fn a_large_ask_is_granted_in_pieces_not_held_back() {
        let start = Instant::now();
        let mut b = TokenBucket::new(1 << 20, start);
        // The whole burst at once, then a quarter of it per wait.
        assert_eq!(b.grant(start, 32 << 20), Ok(104_857));
        let wait = b.grant(start, 32 << 20).unwrap_err();
        assert!((24_990..=25_000).contains(&wait.as_micros()), "{wait:?}");
        let n = b.grant(start + wait, 32 << 20).unwrap();
        assert!((26_000..=26_300).contains(&n), "{n}");
        // A small ask needs only its own bytes.
        assert_eq!(b.grant(start + wait + Duration::from_millis(1), 1000), Ok(1000));
        assert_eq!(b.grant(start, 0), Ok(0));
    }

    #[tokio::test(start_paused = true)]
    async fn take_waits_on_the_clock() {
        let mut b = TokenBucket::new(64 << 10, Instant::now());
        let start = Instant::now();
        let mut sent = 0;
        while sent < 256 << 10 {
            sent += b.take((256 << 10) - sent).await;
        }
        // 16 KiB of burst, then 240 KiB at 64 KiB/s.
        let secs = start.elapsed().as_secs_f64();
        assert!((3.74..=3.76).contains(&secs), "{secs}");
    }
}

//! The pace a request body must keep. A pause longer than `request_body_idle_timeout_ms` fails
//! it, and so does a body slower on average than `request_body_rate_min_bytes_per_sec` once the
//! idle timeout has passed since its start (Apache's `RequestReadTimeout body=…,MinRate=…`): a
//! client sending a byte every few seconds would otherwise hold a connection, and an upload
//! session, for as long as it likes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::config::Config;

/// The error a [`Paced`] body ends with when its client is too slow (`is::<TooSlow>()` on the
/// boxed error tells it from a broken body).
#[derive(Debug)]
pub struct TooSlow(pub String);

impl std::fmt::Display for TooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TooSlow {}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body that fails with [`TooSlow`] when its client falls behind the pace.
pub struct Paced<B> {
    body: B,
    start: Instant,
    received_bytes: u64,
    idle: Duration,
    rate_min_bytes_per_sec: u64,
    timer: Pin<Box<Sleep>>,
    /// The timer stands for the minimum rate (else for the idle timeout).
    timer_is_rate: bool,
}

impl<B> Paced<B> {
    pub fn new(body: B, config: &Config) -> Paced<B> {
        let start = Instant::now();
        let idle = Duration::from_millis(config.request_body_idle_timeout_ms);
        // Nothing received: the first deadline is the idle timeout's.
        Paced {
            body,
            start,
            received_bytes: 0,
            idle,
            rate_min_bytes_per_sec: config.request_body_rate_min_bytes_per_sec,
            timer: Box::pin(tokio::time::sleep_until(start + idle)),
            timer_is_rate: false,
        }
    }

    /// When the body is late if nothing more arrives: after a pause of `idle`, or when what it
    /// sent so far falls behind the minimum rate (with `idle` as a head start), whichever comes
    /// first; and whether it is the rate.
    fn deadline(&self, now: Instant) -> (Instant, bool) {
        let pause = now + self.idle;
        if self.rate_min_bytes_per_sec == 0 {
            return (pause, false);
        }
        let paced_ms = self.received_bytes.saturating_mul(1000) / self.rate_min_bytes_per_sec;
        let paced = self.start + self.idle + Duration::from_millis(paced_ms);
        (pause.min(paced), paced < pause)
    }

    fn too_slow(&self, now: Instant) -> TooSlow {
        let elapsed = now - self.start;
        if self.timer_is_rate {
            TooSlow(format!(
                "the body came slower than {} bytes/s ({} bytes in {} ms; \
                 request_body_rate_min_bytes_per_sec): request abandoned",
                self.rate_min_bytes_per_sec,
                self.received_bytes,
                elapsed.as_millis()
            ))
        } else {
            TooSlow(format!(
                "no body bytes for {} ms (request_body_idle_timeout_ms): request abandoned",
                self.idle.as_millis()
            ))
        }
    }
}

impl<B> Body for Paced<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received_bytes += data.len() as u64;
                }
                let (deadline, is_rate) = this.deadline(Instant::now());
                this.timer.as_mut().reset(deadline);
                this.timer_is_rate = is_rate;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let e = this.too_slow(Instant::now());
                    Poll::Ready(Some(Err(Box::new(e))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn config(idle_ms: u64, rate: u64) -> Config {
        Config {
            request_body_idle_timeout_ms: idle_ms,
            request_body_rate_min_bytes_per_sec: rate,
            ..Config::default()
        }
    }

    /// A body sending `chunk` bytes every `every`, `count` times.
    fn trickle(
        chunk: usize,
        every: Duration,
        count: usize,
    ) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let stream = futures_util::stream::unfold(0, move |i| async move {
            if i == count {
                return None;
            }
            tokio::time::sleep(every).await;
            let frame: Result<_, std::convert::Infallible> =
                Ok(Frame::data(Bytes::from(vec![b'x'; chunk])));
            Some((frame, i + 1))
        });
        StreamBody::new(Box::pin(stream))
    }

    async fn read(
        body: impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin,
        c: &Config,
    ) -> Result<usize, String> {
        Paced::new(body, c)
            .collect()
            .await
            .map(|b| b.to_bytes().len())
            .map_err(|e| {
                assert!(e.is::<TooSlow>(), "{e}");
                e.to_string()
            })
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_pace_is_read_whole() {
        // 2 KiB/s against a minimum of 1 KiB/s, for 100 s.
        let body = trickle(2048, Duration::from_secs(1), 100);
        assert_eq!(read(body, &config(30_000, 1024)).await, Ok(204_800));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_under_the_idle_timeout_is_cut_by_the_rate() {
        // A byte every 10 s never pauses 30 s, but 1 byte per 10 s is far below 1 KiB/s.
        let body = trickle(1, Duration::from_secs(10), 1000);
        let e = read(body, &config(30_000, 1024)).await.unwrap_err();
        assert!(e.contains("request_body_rate_min_bytes_per_sec"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_is_cut_by_the_idle_timeout() {
        let body = trickle(1 << 20, Duration::from_secs(31), 2);
        let e = read(body, &config(30_000, 0)).await.unwrap_err();
        assert!(e.contains("request_body_idle_timeout_ms"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_zero_allows_any_trickle_within_the_idle_timeout() {
        let body = trickle(1, Duration::from_secs(10), 20);
        assert_eq!(read(body, &config(30_000, 0)).await, Ok(20));
    }
}

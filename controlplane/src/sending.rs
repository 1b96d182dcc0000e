//! The pace an answer must keep: a connection whose client takes no byte for
//! `response_idle_timeout_ms` fails its write, and hyper then drops the connection (nginx's
//! `send_timeout`: the time between two successful writes, not the whole answer's). Without
//! it, a client that asks for a large answer and stops reading holds the connection, its
//! permit among `connections_max`, and the answer's buffers for as long as it likes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A connection whose writes fail once they have made no progress for `idle`.
pub struct SendDeadline<T> {
    io: T,
    idle: Duration,
    /// Armed when a write first waits, disarmed when one goes through.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> SendDeadline<T> {
    pub fn new(io: T, idle: Duration) -> SendDeadline<T> {
        SendDeadline {
            io,
            idle,
            stalled: None,
        }
    }

    pub fn into_inner(self) -> T {
        self.io
    }

    /// What a write that returned `r` returns: progress disarms the deadline; waiting arms it,
    /// and fails once it has passed.
    fn check<R>(&mut self, r: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match r {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let idle = self.idle;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the client took no byte of the answer for {} ms",
                            idle.as_millis()
                        ),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.check(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(r, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_past_the_deadline_fails_and_progress_resets_it() {
        // A pipe of 64 bytes whose reader reads nothing until told.
        let (client, server) = tokio::io::duplex(64);
        let mut w = SendDeadline::new(server, Duration::from_millis(500));
        w.write_all(&[1; 64]).await.unwrap();
        // Full: the next write waits, then fails after 500 ms (paused time runs ahead).
        let started = tokio::time::Instant::now();
        let e = w.write_all(&[2; 10]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(500));
        // A client that reads in time is never cut: 4 pauses of 400 ms each.
        let (mut client2, server2) = tokio::io::duplex(64);
        let mut w = SendDeadline::new(server2, Duration::from_millis(500));
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                let n = client2.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        w.write_all(&[3; 64 * 4]).await.unwrap();
        assert_eq!(reader.await.unwrap(), vec![3; 64 * 4]);
        drop(client);
    }
}

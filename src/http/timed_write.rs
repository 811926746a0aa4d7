//! A stream whose writes may stall for a bounded time: a client that stops reading its
//! response is disconnected instead of holding a connection slot (and the response in
//! memory) for as long as it likes.
//!
//! Invariant: the clock runs only while a write, flush or shutdown is pending, and restarts
//! at each one that makes progress; reads are never timed here (hyper's header read timeout
//! and the handlers' own deadlines bound them).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// `S` with a limit on how long a write may stall.
pub(crate) struct TimedWrite<S> {
    inner: S,
    limit: Duration,
    /// Armed when a write first returns pending; dropped once one completes.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> TimedWrite<S> {
    pub(crate) fn new(inner: S, limit: Duration) -> Self {
        TimedWrite {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Passes a finished poll through; fails a pending one that has stalled past the limit.
    fn watch<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading the response",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedWrite<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedWrite<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(polled, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(polled, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(polled, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_that_stalls_past_the_limit_fails_and_one_that_flows_does_not() {
        // A pipe with room for 8 bytes that nobody reads.
        let (near, _far) = tokio::io::duplex(8);
        let mut timed = TimedWrite::new(near, Duration::from_secs(10));
        timed.write_all(b"12345678").await.expect("fits");
        let started = tokio::time::Instant::now();
        let err = timed.write_all(b"9").await.expect_err("stalls");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_secs(10));
    }
}

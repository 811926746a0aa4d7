//! Handing an append to the writer thread: under `when_full = "block"` the appender first waits
//! for room and reserves it (so many appenders cannot take the same room), then sends the
//! messages with the moment `buffer.max_ack_delay` starts counting for them, and waits for the
//! writer's answer, which comes only after the fsync.

use std::time::Instant;

use tokio::sync::oneshot;

use super::{DiskQueue, GROUP_OVERHEAD, WriterMsg};
use crate::buffer::{Appended, QueueError, record};
use crate::core::config::WhenFull;
use crate::core::envelope::Message;

impl DiskQueue {
    /// `block`: waits until `size` more bytes fit under the cap beside what is on disk and
    /// what other appenders reserved, then reserves them (the writer releases them once
    /// written). When nothing waits for delivery and nothing is reserved it goes ahead anyway:
    /// the writer frees the delivered records first (`writer/admit.rs`), and an append larger
    /// than the whole cap could never fit. No await lies between the reservation and the
    /// hand-over to the writer, so a cancelled append reserves nothing.
    async fn wait_for_room(&self, size: u64) -> Result<(), QueueError> {
        let mut waited = false;
        loop {
            let freed = self.shared.freed.notified();
            {
                let mut state = self.shared.lock();
                if state.closed {
                    return Err(QueueError::Closed);
                }
                let fits = state.bytes + state.reserved + size + GROUP_OVERHEAD
                    <= self.shared.config.max_size;
                let idle = state.reserved == 0 && state.durable_seq == state.ack_next;
                if fits || idle {
                    state.reserved += size;
                    return Ok(());
                }
            }
            if !waited {
                waited = true;
                tracing::debug!(
                    dir = %self.shared.config.dir.display(),
                    "buffer full (buffer.when_full = block): holding new messages back until Lambda takes some"
                );
            }
            freed.await;
        }
    }
}

impl DiskQueue {
    /// Hands `messages` to the writer; `sent` is when `max_ack_delay` starts counting for them.
    pub(super) async fn append_sent(
        &self,
        messages: Vec<Message>,
        sent: Instant,
    ) -> Result<Appended, QueueError> {
        if messages.is_empty() {
            return Ok(Appended::default());
        }
        if self.shared.config.when_full == WhenFull::Block {
            let size: u64 = messages.iter().map(|m| record::encoded_len(m) as u64).sum();
            self.wait_for_room(size).await?;
        }
        let (reply, done) = oneshot::channel();
        self.send(WriterMsg::Append {
            messages,
            reply,
            sent,
        })?;
        match done.await {
            Ok(Ok(appended)) => Ok(appended),
            Ok(Err(e)) => Err(QueueError::Io(e)),
            Err(_) => Err(QueueError::Closed),
        }
    }
}

//! Stopping and starting the simulated daemon: kill -9, power cut, graceful restart, and the
//! end of a run, where every fault is lifted and whatever was acknowledged must arrive.

use std::sync::Arc;
use std::time::Duration;

use mqtt_lambda_bridge::buffer::DiskQueue;

use super::{Checked, Health, KILL_BOUND, Kind, POWER_BOUND, World};

impl World {
    /// Ends every task and takes the queues back, to stop them as the crash would.
    pub(super) async fn tear_down(&mut self) -> Vec<DiskQueue> {
        for store in self.pending.drain(..) {
            store.handle.abort();
            let _ = store.handle.await;
        }
        for live in self.live.values_mut() {
            if let Some(retire) = live.retire.take() {
                retire.abort();
                let _ = retire.await;
            }
            if let Some(task) = live.task.take() {
                task.abort();
                let _ = task.await;
            }
        }
        self.settle().await;
        self.count_drops();
        self.table = None;
        let mut queues = Vec::new();
        for (name, live) in std::mem::take(&mut self.live) {
            drop(live.steer);
            let route = live.route;
            match Arc::try_unwrap(route).map(|r| Arc::try_unwrap(r.queue)) {
                Ok(Ok(queue)) => queues.push(queue),
                _ => panic!("rule {name}: its queue is still shared after every task ended"),
            }
        }
        queues
    }

    /// A crash (or restart) happened: repeats of what was accepted before it are charged to
    /// it, within in flight plus `bound` per rule (`running`: the rules whose queues were open).
    ///
    /// A rule not running keeps what its last crash left unsynced on disk (nothing opened its
    /// queue to fsync it): a power cut now may take that too, so its bound is added to the
    /// allowance of the crash that left it.
    pub(super) fn begin_epoch(&mut self, bound: u64, what: &'static str, running: &[String]) {
        let crash = self.lambda.begin_epoch();
        for s in &self.specs {
            let in_flight = (s.max_messages * s.max_concurrency) as u64;
            if running.contains(&s.name) {
                self.exposed.insert(s.name.clone(), crash);
            } else if let Some(left) = self.exposed.get(&s.name)
                && what == "power cut"
                && let Some(allowed) = self.allowance.get_mut(&(*left, s.name.clone()))
            {
                allowed.0 += bound;
            }
            self.allowance
                .insert((crash, s.name.clone()), (in_flight + bound, what));
        }
    }

    /// kill -9 (or a power cut): nothing is persisted on the way down.
    pub(super) async fn crash(&mut self, power_cut: bool) -> Checked {
        let running: Vec<String> = self.live.keys().cloned().collect();
        for queue in self.tear_down().await {
            queue.abandon();
        }
        if power_cut {
            if let Err(e) = self.storage.power_cut() {
                panic!("the simulated power cut failed: {e}");
            }
            self.begin_epoch(POWER_BOUND, "power cut", &running);
        } else {
            self.begin_epoch(KILL_BOUND, "kill -9", &running);
        }
        self.start()
    }

    /// A graceful stop (SIGTERM) and start: ingest must stop within 10 s.
    pub(super) async fn restart(&mut self) -> Checked {
        self.stop.0.trigger();
        for _ in 0..100 {
            if self.pending.iter().all(|p| p.handle.is_finished()) {
                break;
            }
            self.advance(Duration::from_millis(100)).await;
        }
        if let Some(stuck) = self.pending.iter().find(|p| !p.handle.is_finished()) {
            let rules: Vec<&str> = stuck.by_rule.iter().map(|(r, _)| r.as_str()).collect();
            let blocking: Vec<String> = self
                .specs
                .iter()
                .filter(|s| rules.contains(&s.name.as_str()))
                .map(|s| {
                    let bytes = self.live.get(&s.name).map(|l| l.route.queue.stats().bytes);
                    let bytes = bytes.map_or("not open".to_owned(), |b| format!("{b} bytes"));
                    format!("{} ({:?}, {bytes} of {})", s.name, s.when_full, s.max_size)
                })
                .collect();
            return Err(self.violation(
                Kind::ShutdownIgnored,
                format!(
                    "a store for rules {} was still waiting 10 s after shutdown: stopping hangs",
                    blocking.join(", ")
                ),
            ));
        }
        self.collect_stores().await?;
        // Delivery drains what it read; a refusing Lambda halts it.
        for _ in 0..150 {
            let running = self.live.values().filter_map(|l| l.task.as_ref());
            if running.clone().all(|t| t.is_finished()) {
                break;
            }
            self.advance(Duration::from_secs(2)).await;
        }
        let running: Vec<String> = self.live.keys().cloned().collect();
        let queues = self.tear_down().await;
        for queue in &queues {
            queue.close().await;
            if std::env::var_os("SIM_TRACE").is_some() {
                eprintln!("closed {queue:?}: {:?}", queue.stats());
            }
        }
        drop(queues);
        self.begin_epoch(KILL_BOUND, "restart", &running);
        self.start()
    }

    /// Every fault lifted, every rule back in force, Lambda healthy: whatever was acknowledged
    /// must now arrive.
    pub(super) async fn finish(&mut self) -> Checked {
        self.storage.lift_faults();
        self.lambda.seen().health = Health::Healthy;
        for spec in &mut self.specs {
            spec.in_force = true;
        }
        self.restart().await?;
        self.storage.lift_faults();
        let mut rounds = 0;
        for _ in 0..1200 {
            self.settle().await;
            self.check_unless_ignored().await?;
            let idle = self.pending.is_empty()
                && self
                    .live
                    .values()
                    .all(|l| l.route.queue.stats().pending == 0);
            if idle {
                break;
            }
            self.advance(Duration::from_secs(1)).await;
            rounds += 1;
        }
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("finish: {rounds} rounds");
        }
        self.check_unless_ignored().await?;
        self.account()
    }
}

//! The usual `process_*` metrics of a Prometheus client, read from /proc at each scrape: CPU
//! time, resident and virtual memory, open and maximum file descriptors, start time.
//!
//! Invariant: a figure that cannot be read (not Linux, /proc not mounted) is left out of the
//! scrape rather than reported as 0, and nothing is parsed as a float: whole numbers only, so
//! float parsing is not kept resident for this alone.

use std::fmt;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use super::families::single;

/// The usual `process_*` metrics, from /proc (each left out when it cannot be read).
pub(super) fn encode(encoder: &mut DescriptorEncoder, start_time: f64) -> fmt::Result {
    let process = ProcessStat::read();
    if let Some(p) = &process {
        single(
            encoder,
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            MetricType::Counter,
            p.cpu_seconds,
        )?;
        single(
            encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            MetricType::Gauge,
            p.resident_bytes,
        )?;
        single(
            encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            MetricType::Gauge,
            p.virtual_bytes,
        )?;
    }
    if let Some(fds) = open_fds() {
        single(
            encoder,
            "process_open_fds",
            "Number of open file descriptors.",
            MetricType::Gauge,
            fds as f64,
        )?;
    }
    if let Some(max) = max_fds() {
        single(
            encoder,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            MetricType::Gauge,
            max,
        )?;
    }
    single(
        encoder,
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        MetricType::Gauge,
        start_time,
    )
}

/// What `/proc/self/stat` says of the process, in base units.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ProcessStat {
    pub(super) cpu_seconds: f64,
    pub(super) virtual_bytes: f64,
    pub(super) resident_bytes: f64,
    /// Since boot, in seconds.
    started_after_boot: f64,
}

impl ProcessStat {
    /// What /proc says of this process now, or `None` where it cannot be read.
    pub(super) fn read() -> Option<ProcessStat> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // SAFETY: sysconf only reads a system constant.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        parse_stat(&text, ticks as f64, page as f64)
    }
}

/// Parses `/proc/<pid>/stat`: fields counted after the command name, which may hold spaces
/// and parentheses, so it is skipped up to its last `)`. Pure.
fn parse_stat(text: &str, ticks_per_second: f64, page_size: f64) -> Option<ProcessStat> {
    if ticks_per_second <= 0.0 || page_size <= 0.0 {
        return None;
    }
    let rest = &text[text.rfind(')')? + 1..];
    // `rest` starts at field 3 (state); utime is field 14.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Whole numbers, parsed as such (float parsing is a lot of code to keep resident).
    let field = |n: usize| -> Option<f64> { Some(fields.get(n - 3)?.parse::<u64>().ok()? as f64) };
    Some(ProcessStat {
        cpu_seconds: (field(14)? + field(15)?) / ticks_per_second,
        started_after_boot: field(22)? / ticks_per_second,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page_size,
    })
}

/// When the process started, from its start after boot and the boot time in `/proc/stat`.
pub(super) fn start_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let boot: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(boot as f64 + ProcessStat::read()?.started_after_boot)
}

/// The file descriptors open now.
pub(super) fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// The soft limit on open file descriptors.
fn max_fds() -> Option<f64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    // "unlimited" is left out, as the Go client does.
    let max: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(max as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::metrics::families::now_seconds;

    #[test]
    fn proc_stat_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 500 0 0 0 150 50 0 0 20 0 4 0 \
                    12345 10485760 1900 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let p = parse_stat(stat, 100.0, 4096.0).expect("parses");
        assert_eq!(p.cpu_seconds, 2.0);
        assert_eq!(p.started_after_boot, 123.45);
        assert_eq!(p.virtual_bytes, 10_485_760.0);
        assert_eq!(p.resident_bytes, 1900.0 * 4096.0);
        assert_eq!(parse_stat("garbage", 100.0, 4096.0), None);
    }

    #[test]
    fn this_process_can_be_measured() {
        let p = ProcessStat::read().expect("/proc/self/stat");
        assert!(p.resident_bytes > 0.0);
        let start = start_time().expect("start time");
        assert!(start > 1.5e9 && start <= now_seconds() + 1.0, "{start}");
        assert!(max_fds().is_some());
    }
}

//! What the bench reads from /proc: a process's CPU time (`/proc/PID/stat`, summed
//! over all its threads by the kernel) and its resident set (`/proc/PID/status`).

use std::{fs, io};

/// CPU time of a process so far, in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuTicks {
    /// `utime`, field 14 of proc(5).
    pub(crate) user: u64,
    /// `stime`, field 15: the kernel working for the process, here mostly TCP.
    pub(crate) system: u64,
}

impl CpuTicks {
    pub(crate) fn total(self) -> u64 {
        self.user + self.system
    }

    pub(crate) fn since(self, earlier: Self) -> Self {
        Self {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }

    pub(crate) fn add(&mut self, other: Self) {
        self.user += other.user;
        self.system += other.system;
    }
}

/// CPU time of process `pid` so far, all its threads summed.
pub(crate) fn cpu_ticks(pid: u32) -> io::Result<CpuTicks> {
    stat_cpu_ticks(&fs::read_to_string(format!("/proc/{pid}/stat"))?)
}

/// The same for this process: the generator, and its idle orchestration.
pub(crate) fn own_cpu_ticks() -> io::Result<CpuTicks> {
    stat_cpu_ticks(&fs::read_to_string("/proc/self/stat")?)
}

fn stat_cpu_ticks(stat: &str) -> io::Result<CpuTicks> {
    // The command name in field 2 may hold spaces and parentheses; the fields after its
    // closing parenthesis start with field 3 (state).
    let after_name = stat
        .rfind(')')
        .map(|end| &stat[end + 1..])
        .ok_or_else(|| io::Error::other("malformed /proc stat"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |number: usize| -> io::Result<u64> {
        fields
            .get(number - 3)
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no field {number} in /proc stat")))
    };
    Ok(CpuTicks {
        user: field(14)?,
        system: field(15)?,
    })
}

/// Busy time of each CPU so far, in clock ticks: everything in its `/proc/stat` line
/// but `idle` and `iowait`. Less the time of the process pinned to it, this is what
/// other processes on the shared machine took from that CPU.
pub(crate) fn busy_ticks_per_cpu() -> io::Result<Vec<u64>> {
    let stat = fs::read_to_string("/proc/stat")?;
    let mut busy = Vec::new();
    for line in stat.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        // The first line, "cpu  …", is the sum of all CPUs.
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let values: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .filter_map(|value| value.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let total: u64 = values.iter().take(8).sum();
        let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
        busy.push(total - idle);
    }
    Ok(busy)
}

/// `VmRSS` of process `pid`, in KiB.
pub(crate) fn rss_kib(pid: u32) -> io::Result<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::other("no VmRSS in /proc status"))
}

/// Clock ticks per second, the unit of [`cpu_ticks`]: `sysconf(_SC_CLK_TCK)`, 100 on
/// Linux.
pub(crate) fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|ticks| u64::try_from(ticks).ok())
        .unwrap_or(100)
}

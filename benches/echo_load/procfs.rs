//! What the bench reads from /proc: a process's CPU time (`/proc/PID/stat`, summed
//! over all its threads by the kernel) and its resident set (`/proc/PID/status`).

use std::{fs, io};

/// User plus system time of process `pid` so far, in clock ticks (`utime` and `stime`,
/// fields 14 and 15 of proc(5)).
pub(crate) fn cpu_ticks(pid: u32) -> io::Result<u64> {
    stat_cpu_ticks(&fs::read_to_string(format!("/proc/{pid}/stat"))?)
}

/// The same for this process: the generator, and its idle orchestration.
pub(crate) fn own_cpu_ticks() -> io::Result<u64> {
    stat_cpu_ticks(&fs::read_to_string("/proc/self/stat")?)
}

fn stat_cpu_ticks(stat: &str) -> io::Result<u64> {
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
    Ok(field(14)? + field(15)?)
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

//! For the in-process benchmarks (ignored release-mode unit tests run by `bench/*.sh`): the
//! calling thread's CPU time, which other processes on a shared machine do not move. Test
//! builds only.

/// This thread's CPU time in ns.
pub(crate) fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

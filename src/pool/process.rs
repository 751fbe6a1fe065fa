//! Spawning and killing one model server process. Every `unsafe` of the pool is here.
//!
//! A server runs in its own process group, so that a stop reaches the children of a shell
//! wrapper too, and is killed by the kernel if the gateway dies (`PR_SET_PDEATHSIG`). It must
//! not keep any state: the supervisor (`pool`) owns the process's life.

use std::time::Duration;

use tokio::process::{Child, Command};

/// Time between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Starts `argv` with `env` added, stdin closed and stdout/stderr piped.
pub fn spawn(
    argv: &[String],
    env: impl Iterator<Item = (String, String)>,
    cwd: Option<&str>,
) -> std::io::Result<Child> {
    let Some((program, args)) = argv.split_first() else {
        return Err(std::io::Error::other("the command is empty"));
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    #[cfg(unix)]
    {
        // Its own process group, so that a stop reaches its children too; and killed by
        // the kernel if the gateway dies without stopping it.
        cmd.process_group(0);
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
        // calls (prctl, getppid, _exit); it touches no lock and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                #[cfg(target_os = "linux")]
                {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::getppid() as u32 != parent {
                        // The gateway died before the prctl took effect.
                        libc::_exit(1);
                    }
                }
                let _ = parent;
                Ok(())
            });
        }
    }
    cmd.spawn()
}

/// Sends `sig` to the process group led by `pid`.
#[cfg(unix)]
fn kill_group(pid: u32, sig: libc::c_int) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: a plain syscall on a process group the gateway created (`process_group(0)`).
    unsafe {
        libc::kill(-pid, sig);
    }
}

/// SIGTERM to the process group, SIGKILL after [`STOP_GRACE`] (and to whatever of the group is
/// left once the leader exited).
pub async fn terminate(child: &mut Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        kill_group(pid, libc::SIGTERM);
        let _ = tokio::time::timeout(STOP_GRACE, child.wait()).await;
        kill_group(pid, libc::SIGKILL);
    }
    let _ = child.kill().await;
}

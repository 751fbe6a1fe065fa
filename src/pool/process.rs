//! Spawning and killing one model server process. Every `unsafe` of the pool is here.
//!
//! A server runs under a tiny supervisor (a POSIX `sh` script, [`SUPERVISOR`]) that leads its
//! own process group: the server and everything it starts (a shell wrapper's children) are in
//! that group. The kernel signals the supervisor when the gateway dies (`PR_SET_PDEATHSIG`,
//! SIGUSR1, even on SIGKILL) and the supervisor then SIGKILLs the whole group, so no server
//! outlives the gateway, however it is wrapped. A stop is SIGTERM to the group (the supervisor
//! waits for the server to exit), then SIGKILL; when the supervisor itself ends, the pool
//! kills what is left of its group ([`kill_leftovers`]). A [`Server`] dropped while it runs
//! (the runtime that owns the pool ends: a test, an embedder) SIGKILLs its group: killing the
//! supervisor alone, as `kill_on_drop` does, would leave the server to init. It must not keep
//! any state: the pool owns the process's life. (A server that leaves the group itself,
//! `setsid`, escapes.)

use std::time::Duration;

use tokio::process::{Child, Command};

/// Time between SIGTERM and SIGKILL.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(5);

/// The supervisor: the signal from the kernel when the gateway dies (USR1) kills the group;
/// a stop's SIGTERM to the group reaches the server while the supervisor waits for it to exit
/// (a trap, not an ignore: a child does not inherit it), and it exits with the server's status.
const SUPERVISOR: &str = r#"trap 'kill -KILL 0' USR1
trap ':' TERM INT HUP
"$@" &
child=$!
while :; do
  wait "$child"
  status=$?
  kill -0 "$child" 2>/dev/null || exit "$status"
done"#;

/// Whether `program` can be run: a path to a file, or a name found on `PATH` (the supervisor
/// could only report a missing one after its start).
fn runnable(program: &str, cwd: Option<&str>, path_var: Option<std::ffi::OsString>) -> bool {
    let path = std::path::Path::new(program);
    if program.contains('/') {
        let full = match cwd {
            Some(dir) if path.is_relative() => std::path::Path::new(dir).join(path),
            _ => path.to_path_buf(),
        };
        return full.is_file();
    }
    path_var
        .or_else(|| std::env::var_os("PATH"))
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// A server under its supervisor: the supervisor's `Child` (whose pid leads the group), which
/// SIGKILLs the whole group when dropped while the supervisor still runs.
pub(super) struct Server(Child);

impl std::ops::Deref for Server {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Still running (not waited for): its group goes with it.
        if let (Some(pid), Ok(None)) = (self.0.id(), self.0.try_wait()) {
            #[cfg(unix)]
            kill_group(pid, libc::SIGKILL);
            #[cfg(not(unix))]
            let _ = pid;
        }
    }
}

/// Starts `argv` under the supervisor, with `env` added, stdin closed and stdout/stderr piped.
/// The child's pid is the supervisor's, which leads the group.
pub(super) fn spawn(
    argv: &[String],
    env: impl Iterator<Item = (String, String)>,
    cwd: Option<&str>,
) -> std::io::Result<Server> {
    let Some(program) = argv.first() else {
        return Err(std::io::Error::other("the command is empty"));
    };
    let env: Vec<(String, String)> = env.collect();
    let path_var = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.into());
    if !runnable(program, cwd, path_var) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such program",
        ));
    }
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(SUPERVISOR)
        .arg("mofa-supervisor")
        .args(argv)
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
        // Its own process group, so that a stop reaches its children too; and told by the
        // kernel if the gateway dies without stopping it (the supervisor then kills the group).
        cmd.process_group(0);
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
        // calls (prctl, getppid, _exit); it touches no lock and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                #[cfg(target_os = "linux")]
                {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR1) != 0 {
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
    cmd.spawn().map(Server)
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

/// After the supervisor (the group's leader) `pid` ended by itself: SIGKILL to whatever of its
/// group is left (a server whose supervisor was killed, a wrapper's stray children).
pub(super) fn kill_leftovers(pid: Option<u32>) {
    #[cfg(unix)]
    if let Some(pid) = pid {
        kill_group(pid, libc::SIGKILL);
    }
    #[cfg(not(unix))]
    let _ = pid;
}

/// SIGTERM to the process group, SIGKILL after [`STOP_GRACE`] (and to whatever of the group is
/// left once the leader exited).
pub(super) async fn terminate(child: &mut Server) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        kill_group(pid, libc::SIGTERM);
        let _ = tokio::time::timeout(STOP_GRACE, child.wait()).await;
        kill_group(pid, libc::SIGKILL);
    }
    let _ = child.kill().await;
}

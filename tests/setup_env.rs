//! `scripts/setup-test-env`, which the SDK tests run on first use, several at the same time:
//! three runs at once on a fresh path all succeed (one builds the venv, the others wait for it)
//! and print the same python, which imports `openai` and `anthropic`; a venv left half-made is
//! repaired, whether its build was killed part way or it lost a package's files and its
//! completion stamp; a venv the script did not make (as a user's own, through `MOFA_VENV`) gets
//! the packages and is kept, not deleted. Each test has its own venv in a fresh temporary
//! directory (`MOFA_VENV`), never the shared one under `~/.cache`. Needs PyPI the first time
//! (pip's cache makes the later installs quick), so it only builds with the `external` feature.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::eventually;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/setup-test-env");

/// How long a venv may take to get as far as having a python (the machine may be busy with
/// the other tests' installs).
const MAKING: Duration = Duration::from_secs(120);

/// A fresh directory under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "mofa-setup-env-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn venv(&self) -> PathBuf {
        self.0.join("venv")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup_command(venv: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg(SCRIPT).env("MOFA_VENV", venv).kill_on_drop(true);
    cmd
}

/// Runs the script for `venv` to its end.
async fn setup(venv: &Path) -> Output {
    setup_command(venv)
        .output()
        .await
        .expect("run scripts/setup-test-env")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that a run succeeded and printed the python of `venv` (and only that); returns it.
fn assert_made(out: &Output, venv: &Path) -> String {
    assert!(
        out.status.success(),
        "scripts/setup-test-env failed ({}):\n{}",
        out.status,
        stderr(out)
    );
    let python = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(
        python,
        format!("{}/bin/python\n", venv.display()),
        "stderr:\n{}",
        stderr(out)
    );
    python.trim().to_string()
}

/// Asserts that `venv` is marked complete and its python imports both SDKs.
async fn assert_complete(venv: &Path) {
    assert!(
        venv.join(".mofa-ready").exists(),
        "{} has no completion stamp",
        venv.display()
    );
    let out = tokio::process::Command::new(venv.join("bin/python"))
        .args(["-c", "import openai, anthropic"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "the venv's python does not import openai and anthropic:\n{}",
        stderr(&out)
    );
}

/// The venv's site-packages (`lib/pythonX.Y/site-packages`).
fn site_packages(venv: &Path) -> PathBuf {
    std::fs::read_dir(venv.join("lib"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("python")
        })
        .expect("lib/pythonX.Y")
        .join("site-packages")
}

#[tokio::test]
async fn three_setups_at_once_all_succeed_one_building_and_a_damaged_venv_is_repaired() {
    let dir = TempDir::new("concurrent");
    let venv = dir.venv();
    let (a, b, c) = tokio::join!(setup(&venv), setup(&venv), setup(&venv));
    let runs = [&a, &b, &c];
    for out in runs {
        assert_made(out, &venv);
    }
    let all_stderr: Vec<String> = runs.iter().map(|o| stderr(o)).collect();
    let count = |what: &str| all_stderr.iter().filter(|e| e.contains(what)).count();
    assert_eq!(
        (
            count("setup-test-env: making"),
            count("waiting for another setup")
        ),
        (1, 2),
        "one run builds, the other two wait for it:\n{all_stderr:#?}"
    );
    assert_complete(&venv).await;

    // What a pip killed mid-install may leave, or a damaged venv: a package's files gone while
    // pip's record still lists it, and no completion stamp.
    std::fs::remove_file(venv.join(".mofa-ready")).unwrap();
    std::fs::remove_dir_all(site_packages(&venv).join("anthropic")).unwrap();
    let out = setup(&venv).await;
    assert_made(&out, &venv);
    assert_complete(&venv).await;
}

#[tokio::test]
async fn a_setup_killed_while_making_the_venv_is_made_again() {
    let dir = TempDir::new("killed");
    let venv = dir.venv();
    let mut first = setup_command(&venv)
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let python = venv.join("bin/python");
    eventually("the venv being made has a python", MAKING, || {
        let python = python.clone();
        async move { python.exists() }
    })
    .await;
    // The whole group: bash, `python -m venv` and the pip it runs.
    let group = format!("-{}", first.id().unwrap());
    let killed = std::process::Command::new("kill")
        .args(["-KILL", "--", &group])
        .status()
        .unwrap();
    assert!(killed.success(), "kill -KILL -- {group} failed");
    first.wait().await.unwrap();
    assert!(
        !venv.join(".mofa-ready").exists(),
        "the run was killed before it finished, yet the venv is stamped complete"
    );

    let out = setup(&venv).await;
    assert_made(&out, &venv);
    assert_complete(&venv).await;
}

#[tokio::test]
async fn a_venv_made_elsewhere_without_the_packages_gets_them_and_is_kept() {
    let dir = TempDir::new("users");
    let venv = dir.venv();
    let made = tokio::process::Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv)
        .status()
        .await
        .unwrap();
    assert!(made.success(), "python3 -m venv failed");
    let mine = venv.join("user-file");
    std::fs::write(&mine, "mine").unwrap();

    let out = setup(&venv).await;
    assert_made(&out, &venv);
    assert_complete(&venv).await;
    assert_eq!(
        std::fs::read_to_string(&mine).unwrap(),
        "mine",
        "the venv was made again instead of completed"
    );
    assert!(
        !venv.join(".mofa-made").exists(),
        "the script claimed a venv it did not make"
    );
}

//! Running external commands: print them, stream their output, name the failing step.

use anyhow::{Context as _, bail};
use std::fmt::Write as _;
use std::process::Command;

/// Runs `cmd` with inherited stdio; fails naming `step` if it cannot start or exits non-zero.
pub fn run(step: &str, cmd: &mut Command) -> anyhow::Result<()> {
    println!("==> [{step}] {}", render(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("step `{step}`: could not start `{}`", render(cmd)))?;
    if !status.success() {
        bail!("step `{step}` failed ({status}): `{}`", render(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout, or `None` if it cannot start or exits non-zero.
pub fn stdout_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command as a shell-like line, environment overrides first.
fn render(cmd: &Command) -> String {
    let mut line = String::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            let value = value.to_string_lossy();
            let _ = write!(line, "{}={} ", key.to_string_lossy(), value.escape_debug());
        }
    }
    line.push_str(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

//! `lighter serve`: runs the control plane and the data plane as two child processes of this one
//! (the same binary, `lighter control-plane …` and `lighter data-plane …`, with the same flags).
//! The control plane starts first; the data plane starts once the control socket answers. If
//! either dies, that is logged and the other is stopped. SIGTERM or SIGINT stops the data plane
//! first (no new requests; in-flight responses finish), then the control plane.

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::config::Config;

/// How long the control plane may take to open its socket.
const CONTROL_PLANE_START_TIMEOUT_MS: u64 = 30_000;

pub fn run(config: Config) -> Result<(), String> {
    let signals = block_signals();
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    // Everything after `serve` goes to both children unchanged (env is inherited too).
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(2).collect();
    let spawn = |role: &str| -> Result<Child, String> {
        let mut cmd = Command::new(&exe);
        cmd.arg(role).args(&args);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let set = signal_set();
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                // Die with the supervisor, whatever kills it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        cmd.spawn()
            .map_err(|e| format!("cannot start the {role}: {e}"))
    };

    let mut control = spawn("control-plane")?;
    let socket = config.control_socket();
    let started = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        if let Ok(Some(status)) = control.try_wait() {
            return Err(format!(
                "the control plane exited while starting ({status})"
            ));
        }
        if started.elapsed() > Duration::from_millis(CONTROL_PLANE_START_TIMEOUT_MS) {
            stop(&mut control, "control plane", &config);
            return Err(format!(
                "the control plane did not open {} in time",
                socket.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut data = match spawn("data-plane") {
        Ok(d) => d,
        Err(e) => {
            stop(&mut control, "control plane", &config);
            return Err(e);
        }
    };

    loop {
        let sig = wait_signal(&signals, Duration::from_millis(500));
        if sig == Some(libc::SIGTERM) || sig == Some(libc::SIGINT) {
            tracing::info!("stopping: data plane first, then control plane");
            let d = stop(&mut data, "data plane", &config);
            let c = stop(&mut control, "control plane", &config);
            return if d.success() && c.success() {
                Ok(())
            } else {
                Err(format!("unclean stop: data plane {d}, control plane {c}"))
            };
        }
        if let Ok(Some(status)) = data.try_wait() {
            tracing::error!(
                "the data plane exited unexpectedly ({status}); stopping the control plane"
            );
            stop(&mut control, "control plane", &config);
            return Err(format!("data plane exited ({status})"));
        }
        if let Ok(Some(status)) = control.try_wait() {
            tracing::error!(
                "the control plane exited unexpectedly ({status}); stopping the data plane"
            );
            stop(&mut data, "data plane", &config);
            return Err(format!("control plane exited ({status})"));
        }
    }
}

/// SIGTERM, then SIGKILL if the child outlives the grace period (plus a margin).
fn stop(child: &mut Child, role: &str, config: &Config) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_millis(config.shutdown_grace_ms + 5_000);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                tracing::warn!("the {role} did not stop in time: killing it");
                let _ = child.kill();
                return child.wait().expect("wait for a killed child");
            }
        }
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: building a signal set on the stack.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn block_signals() -> libc::sigset_t {
    let set = signal_set();
    // SAFETY: changes the mask of this (the only) thread.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    set
}

/// Waits up to `timeout` for one of the blocked signals.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: sigtimedwait on a blocked set; a null siginfo is allowed.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

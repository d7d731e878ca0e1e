//! Teardown that must happen even when the harness is interrupted: child processes it started
//! and network namespaces it created are registered here, and a signal thread kills/deletes
//! them on SIGINT, SIGTERM or SIGHUP before the process exits. (Normal teardown is RAII in
//! the owners; they unregister what they removed.)

use std::sync::Mutex;

#[derive(Default)]
struct Registry {
    namespaces: Vec<String>,
    children: Vec<i32>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    namespaces: Vec::new(),
    children: Vec::new(),
});

fn with<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    // A poisoned lock still holds a usable list: teardown must go on.
    let mut g = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut g)
}

/// Records a namespace to delete on a signal.
pub fn register_namespace(name: &str) {
    with(|r| r.namespaces.push(name.to_string()));
}

/// Forgets a namespace (it was deleted normally).
pub fn unregister_namespace(name: &str) {
    with(|r| r.namespaces.retain(|n| n != name));
}

/// Records a child process to kill on a signal.
pub fn register_child(pid: u32) {
    with(|r| r.children.push(pid as i32));
}

/// Forgets a child process (it was reaped).
pub fn unregister_child(pid: u32) {
    with(|r| r.children.retain(|&p| p != pid as i32));
}

/// Deletes a network namespace with `ip netns del` (errors are returned as text).
pub fn delete_namespace(name: &str) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "del", name])
        .output()
        .map_err(|e| format!("running `ip netns del {name}`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip netns del {name}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Kills every registered child and deletes every registered namespace.
pub fn run_all() {
    let (children, namespaces) = with(|r| {
        (
            std::mem::take(&mut r.children),
            std::mem::take(&mut r.namespaces),
        )
    });
    for pid in children {
        // SAFETY: kill(2) on a pid this process spawned and has not reaped yet (a reaped child
        // is unregistered first), so it cannot name an unrelated process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for ns in namespaces {
        if let Err(e) = delete_namespace(&ns) {
            eprintln!("harness cleanup: {e}");
        }
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in the calling thread (call it from `main` before any other
/// thread starts, so every thread inherits the mask) and starts a thread that waits for them,
/// runs [`run_all`] and exits with 128 + the signal number.
pub fn install_signal_cleanup() -> std::io::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.thread_block().map_err(std::io::Error::from)?;
    std::thread::Builder::new()
        .name("signal-cleanup".into())
        .spawn(move || {
            let sig = set.wait().map(|s| s as i32).unwrap_or(libc::SIGTERM);
            eprintln!("harness: signal {sig}: killing children and deleting namespaces");
            run_all();
            std::process::exit(128 + sig);
        })?;
    Ok(())
}

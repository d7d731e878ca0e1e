//! Teardown that must happen even when the harness is interrupted: child processes it started,
//! network namespaces it created, hugetlbfs mounts it made and huge page pools it grew are
//! registered here, and a signal thread kills/deletes
//! them on SIGINT, SIGTERM or SIGHUP before the process exits. (Normal teardown is RAII in
//! the owners; they unregister what they removed.)

use migration::sync::MutexExt;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Default)]
struct Registry {
    namespaces: Vec<String>,
    children: Vec<i32>,
    mounts: Vec<PathBuf>,
    /// (nr_hugepages file, value to write back).
    pools: Vec<(String, u64)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    namespaces: Vec::new(),
    children: Vec::new(),
    mounts: Vec::new(),
    pools: Vec::new(),
});

fn with<R>(f: impl FnOnce(&mut Registry) -> R) -> R {
    // A poisoned lock still holds a usable list: teardown must go on.
    let mut g = REGISTRY.lock_unpoisoned();
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

/// Records a mount point to unmount (and remove) on a signal.
pub fn register_mount(dir: &Path) {
    with(|r| r.mounts.push(dir.to_path_buf()));
}

/// Forgets a mount point (it was unmounted normally).
pub fn unregister_mount(dir: &Path) {
    with(|r| r.mounts.retain(|m| m != dir));
}

/// Records a hugetlb pool size to write back on a signal.
pub fn register_pool(nr_file: &str, restore: u64) {
    with(|r| r.pools.push((nr_file.to_string(), restore)));
}

/// Forgets a pool size (it was written back normally).
pub fn unregister_pool(nr_file: &str) {
    with(|r| r.pools.retain(|(f, _)| f != nr_file));
}

/// Why a mount or a namespace could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("{} has a NUL byte", dir.display())]
    NulInPath { dir: PathBuf },
    #[error("unmounting {}: {source}", dir.display())]
    Unmount {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing {}: {source}", dir.display())]
    RemoveDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running `ip netns del {name}`: {source}")]
    RunIp {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip netns del {name}` failed: {stderr}")]
    DeleteNamespace { name: String, stderr: String },
}

/// Unmounts `dir` (lazily, should a process still hold a file there) and removes the
/// directory.
pub fn unmount(dir: &Path) -> Result<(), CleanupError> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| CleanupError::NulInPath {
        dir: dir.to_owned(),
    })?;
    // SAFETY: umount2(2) with a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(CleanupError::Unmount {
            dir: dir.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    std::fs::remove_dir(dir).map_err(|source| CleanupError::RemoveDir {
        dir: dir.to_owned(),
        source,
    })
}

/// Deletes a network namespace with `ip netns del` (its stderr is in the error).
pub fn delete_namespace(name: &str) -> Result<(), CleanupError> {
    let out = std::process::Command::new("ip")
        .args(["netns", "del", name])
        .output()
        .map_err(|source| CleanupError::RunIp {
            name: name.to_owned(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CleanupError::DeleteNamespace {
            name: name.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Kills every registered child, deletes every registered namespace, unmounts every
/// registered mount and writes back every registered pool size (after the children, which may
/// hold files and pages there; pages still in use when the pool shrinks become surplus pages
/// the kernel frees when they are released).
pub fn run_all() {
    let (children, namespaces, mounts, pools) = with(|r| {
        (
            std::mem::take(&mut r.children),
            std::mem::take(&mut r.namespaces),
            std::mem::take(&mut r.mounts),
            std::mem::take(&mut r.pools),
        )
    });
    for pid in children {
        // SAFETY: kill(2) on a pid this process spawned and has not reaped yet (a reaped child
        // is unregistered first), so it cannot name an unrelated process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for ns in namespaces {
        if let Err(e) = delete_namespace(&ns) {
            tracing::error!("cleanup: {e}");
        }
    }
    for m in mounts {
        if let Err(e) = unmount(&m) {
            tracing::error!("cleanup: {e}");
        }
    }
    for (file, n) in pools.into_iter().rev() {
        if let Err(e) = std::fs::write(&file, n.to_string()) {
            tracing::error!("cleanup: writing {n} to {file}: {e}");
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
            tracing::warn!("signal {sig}: killing children, deleting namespaces, unmounting");
            run_all();
            std::process::exit(128 + sig);
        })?;
    Ok(())
}

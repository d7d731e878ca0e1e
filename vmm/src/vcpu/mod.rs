//! vCPUs: creation, boot state, the run loop on a thread of its own, and pause/resume.
//!
//! Each vCPU thread owns its `VcpuFd`. Other threads control it through a [`VcpuHandle`]:
//! `pause()` sets the wanted state and KVM's `immediate_exit` and kicks the thread out of
//! `KVM_RUN` with one signal (a signal that lands just before `KVM_RUN` would be lost, but
//! `immediate_exit` makes that `KVM_RUN` return at once, so one signal suffices), and work
//! that needs the fd (saving or restoring state for migration) is sent to the paused thread as a
//! job. A vCPU blocked in a userfault is not freed by the signal; it pauses once the fault is
//! served, which is why the fault service must keep running while vCPUs are being paused.

pub mod boot_regs;
pub mod cpuid;
pub mod state;

use migration::sync::MutexExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::{DeviceAction, Devices};

pub use state::VcpuState;

/// Errors of vCPU set-up and control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot build an MSR list of {0} entries")]
    MsrCount(usize),
    #[error("KVM refused to set MSR {index:#x}")]
    MsrRejected { index: u32 },
    #[error("cannot start vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("vCPU {0} is not running any more")]
    Gone(u8),
    #[error("saving vCPU state: {ioctl} failed: {source}")]
    SaveState {
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("restoring vCPU state: {ioctl} failed: {source}")]
    RestoreState {
        ioctl: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("restoring vCPU state: the XSAVE area has {got} words, expected {expected}")]
    XsaveSize { got: usize, expected: usize },
}

/// Why a VM stopped, as its vCPUs saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote this exit code to the exit port or the debug device.
    GuestExit(i32),
    /// The guest asked for a reset (i8042) or triple-faulted.
    Reset,
    /// The guest hit something KVM could not run.
    Crash(Crash),
    /// The VMM stopped it (signal, migration handed it over, ...).
    Stopped,
}

/// Why a vCPU could not run the guest any further (the VM stops as crashed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Crash {
    /// `KVM_RUN` itself failed (not EINTR/EAGAIN, which only interrupt it).
    #[error("vCPU {index}: KVM_RUN failed: {source}")]
    Run {
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An exit the VMM cannot run the guest past, at the guest's `rip` then (0 if the
    /// registers could not be read).
    #[error("{exit} at rip {rip:#x}")]
    Exit {
        #[source]
        exit: ExitError,
        rip: u64,
    },
    /// The vCPU thread panicked.
    #[error("the thread of vCPU {index} panicked")]
    Panicked { index: u8 },
}

/// Where vCPUs report that the VM must stop; the VMM's main thread waits on it.
#[derive(Default)]
pub struct StopSignal {
    reason: Mutex<Option<StopReason>>,
    cond: Condvar,
}

impl StopSignal {
    /// Records the first stop reason; later ones are ignored.
    pub fn stop(&self, reason: StopReason) {
        if let Ok(mut r) = self.reason.lock() {
            if r.is_none() {
                *r = Some(reason);
            }
            self.cond.notify_all();
        }
    }

    /// Waits up to `timeout` for a stop; returns the reason if there is one.
    pub fn wait(&self, timeout: Duration) -> Option<StopReason> {
        let r = self.reason.lock().ok()?;
        if r.is_some() {
            return r.clone();
        }
        let (r, _) = self.cond.wait_timeout(r, timeout).ok()?;
        r.clone()
    }

    /// The reason, if the VM stopped.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }
}

type Job = Box<dyn FnOnce(&mut VcpuFd) + Send>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Want {
    Run,
    Pause,
    Quit,
}

struct Control {
    want: Want,
    /// The thread is parked (not in KVM_RUN) and will not enter it until `want` is Run.
    parked: bool,
    finished: bool,
    jobs: Vec<Job>,
}

struct Shared {
    ctl: Mutex<Control>,
    cond: Condvar,
    /// The vCPU's `kvm_run.immediate_exit` (linux/kvm.h, `struct kvm_run`): KVM_RUN returns
    /// EINTR at once while it is 1. Set with `want` = Pause / Quit before the kick, so a kick
    /// that lands just before KVM_RUN (where the signal alone would be lost) still stops the
    /// vCPU; cleared by the vCPU thread before it runs again.
    immediate_exit: ImmediateExit,
}

/// A pointer to a vCPU's `kvm_run.immediate_exit` byte, used as an atomic. It points into the
/// vCPU fd's `kvm_run` mapping, which lives as long as the vCPU thread: it is written only
/// under `Shared::ctl` while `Control::finished` is false (the thread sets `finished` under
/// that lock before its `VcpuFd`, and with it the mapping, is dropped).
struct ImmediateExit(std::ptr::NonNull<AtomicU8>);

// SAFETY: the pointee is a byte of shared memory that KVM and every thread access as a single
// byte (atomically here); the pointer itself is only dereferenced under the rules above.
unsafe impl Send for ImmediateExit {}
// SAFETY: as for Send: all accesses through it are atomic byte stores.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    /// Sets or clears the flag.
    ///
    /// # Safety
    /// The vCPU fd whose `kvm_run` the pointer points into must still be alive: call it with
    /// `Shared::ctl` held and `Control::finished` false, or from the vCPU thread itself.
    unsafe fn set(&self, on: bool) {
        // SAFETY: the caller guarantees the mapping is alive; AtomicU8 has the size and
        // alignment of u8, and KVM only reads the byte.
        unsafe { self.0.as_ref() }.store(u8::from(on), Ordering::Release);
    }
}

/// Handle to a running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// The thread's kernel id (`gettid()`), 0 if it never reported it.
    tid: i32,
}

/// Signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick signal handler. Call once before starting vCPUs.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), noop_handler).map_err(VcpuError::Signal)
}

/// Marks a vCPU thread finished (and parked) when dropped.
struct Finished<'a>(&'a Shared);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        let mut c = self.0.ctl.lock_unpoisoned();
        c.finished = true;
        c.parked = true;
        drop(c);
        self.0.cond.notify_all();
    }
}

impl VcpuHandle {
    /// Starts the run loop of `fd` on a new thread. With `start_paused`, the vCPU waits for
    /// `resume()` before entering the guest (a migration destination restores state first).
    pub fn spawn(
        index: u8,
        mut fd: VcpuFd,
        devices: Arc<Devices>,
        stop: Arc<StopSignal>,
        start_paused: bool,
    ) -> Result<VcpuHandle, VcpuError> {
        let immediate_exit = std::ptr::NonNull::from(&mut fd.get_kvm_run().immediate_exit).cast();
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Control {
                want: if start_paused { Want::Pause } else { Want::Run },
                parked: false,
                finished: false,
                jobs: Vec::new(),
            }),
            cond: Condvar::new(),
            immediate_exit: ImmediateExit(immediate_exit),
        });
        let s = shared.clone();
        let (tid_tx, tid_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // The postcopy engine tells this thread's userfaults by its id.
                let _ = tid_tx.send(nix::unistd::gettid().as_raw());
                crate::seccomp::enter_or_exit(crate::seccomp::Role::Vcpu);
                // Marks the thread finished however it ends, a panic included: `quit` and
                // `wait_paused` wait for that mark, and would wait forever for a thread that
                // unwound without it.
                let _finished = Finished(&s);
                let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_loop(index, &mut fd, &devices, &stop, &s)
                }));
                if crashed.is_err() {
                    stop.stop(StopReason::Crash(Crash::Panicked { index }));
                }
            })
            .map_err(VcpuError::Spawn)?;
        let tid = tid_rx.recv().unwrap_or(0);
        Ok(VcpuHandle {
            index,
            shared,
            thread: Some(thread),
            tid,
        })
    }

    /// The vCPU thread's kernel thread id (`gettid()`; 0 if unknown).
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// This vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // A failed kick (thread already gone) is harmless: the caller checks `finished`.
            let _ = t.kill(kick_signal());
        }
    }

    /// Asks the vCPU to leave the guest and waits until it has.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.request_pause()?;
        self.wait_paused()
    }

    /// Asks the vCPU to leave the guest and kicks it once, without waiting (pause several
    /// vCPUs at once: request all, then wait for each).
    pub fn request_pause(&self) -> Result<(), VcpuError> {
        {
            let mut c = self
                .shared
                .ctl
                .lock()
                .map_err(|_| VcpuError::Gone(self.index))?;
            if c.want == Want::Run {
                c.want = Want::Pause;
            }
            if c.parked || c.finished {
                return Ok(());
            }
            // SAFETY: under the ctl lock with `finished` false: the vCPU fd is alive.
            unsafe { self.shared.immediate_exit.set(true) };
        }
        self.kick();
        Ok(())
    }

    /// Waits until the vCPU has parked after [`VcpuHandle::request_pause`]. The one kick
    /// cannot be lost: `immediate_exit` (set before it) stops a KVM_RUN it arrives just before,
    /// and a signal that arrives while the thread is blocked in a userfault stays pending and
    /// ends the KVM_RUN once the fault is served. So nothing is re-sent.
    pub fn wait_paused(&self) -> Result<(), VcpuError> {
        let mut c = self
            .shared
            .ctl
            .lock()
            .map_err(|_| VcpuError::Gone(self.index))?;
        while !c.parked && !c.finished {
            c = self
                .shared
                .cond
                .wait(c)
                .map_err(|_| VcpuError::Gone(self.index))?;
        }
        Ok(())
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        if let Ok(mut c) = self.shared.ctl.lock() {
            if c.want == Want::Pause {
                c.want = Want::Run;
            }
        }
        self.shared.cond.notify_all();
    }

    /// Runs `f` with the vCPU's fd on the vCPU thread, which must be paused. Returns its result.
    pub fn with_fd<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
    ) -> Result<R, VcpuError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        {
            let mut c = self
                .shared
                .ctl
                .lock()
                .map_err(|_| VcpuError::Gone(self.index))?;
            if c.finished {
                return Err(VcpuError::Gone(self.index));
            }
            c.jobs.push(Box::new(move |fd| {
                let _ = tx.send(f(fd));
            }));
        }
        self.shared.cond.notify_all();
        rx.recv().map_err(|_| VcpuError::Gone(self.index))
    }

    /// Stops the thread for good and joins it.
    pub fn quit(&mut self) {
        if let Ok(mut c) = self.shared.ctl.lock() {
            c.want = Want::Quit;
            if !c.finished {
                // SAFETY: under the ctl lock with `finished` false: the vCPU fd is alive.
                unsafe { self.shared.immediate_exit.set(true) };
            }
        }
        self.shared.cond.notify_all();
        // One kick: `immediate_exit` is set, so it cannot be lost (see wait_paused).
        self.kick();
        if let Ok(mut c) = self.shared.ctl.lock() {
            while !c.finished {
                c = match self.shared.cond.wait(c) {
                    Ok(c) => c,
                    Err(_) => break,
                };
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.quit();
    }
}

/// Parks while paused, running jobs; returns false if the thread must quit.
fn wait_while_paused(shared: &Shared, fd: &mut VcpuFd) -> bool {
    let Ok(mut c) = shared.ctl.lock() else {
        return false;
    };
    loop {
        let jobs = std::mem::take(&mut c.jobs);
        if !jobs.is_empty() {
            drop(c);
            for job in jobs {
                job(fd);
            }
            c = match shared.ctl.lock() {
                Ok(c) => c,
                Err(_) => return false,
            };
            continue;
        }
        match c.want {
            Want::Run => {
                c.parked = false;
                // SAFETY: on the vCPU thread, which owns the fd.
                unsafe { shared.immediate_exit.set(false) };
                return true;
            }
            Want::Quit => return false,
            Want::Pause => {
                if !c.parked {
                    c.parked = true;
                    shared.cond.notify_all();
                }
                c = match shared.cond.wait(c) {
                    Ok(c) => c,
                    Err(_) => return false,
                };
            }
        }
    }
}

fn run_loop(index: u8, fd: &mut VcpuFd, devices: &Devices, stop: &StopSignal, shared: &Shared) {
    loop {
        if !wait_while_paused(shared, fd) {
            return;
        }
        let action = match fd.run() {
            Ok(exit) => handle_exit(index, exit, devices),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(DeviceAction::None)
            }
            Err(e) => {
                stop.stop(StopReason::Crash(Crash::Run { index, source: e }));
                return;
            }
        };
        match action {
            Ok(DeviceAction::None) => {}
            Ok(DeviceAction::Exit(code)) => {
                stop.stop(StopReason::GuestExit(code));
                return;
            }
            Ok(DeviceAction::Reset) => {
                stop.stop(StopReason::Reset);
                return;
            }
            Err(exit) => {
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                stop.stop(StopReason::Crash(Crash::Exit { exit, rip }));
                return;
            }
        }
    }
}

/// A vCPU exit the VMM cannot run the guest past (the VM stops as crashed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExitError {
    #[error("vCPU {index}: KVM internal error (the instruction emulator could not run the guest)")]
    Internal { index: u8 },
    #[error("vCPU {index}: VM entry failed (hardware reason {reason:#x}, cpu {cpu})")]
    FailEntry { index: u8, reason: u64, cpu: u32 },
    #[error("vCPU {index}: unexpected exit {exit}")]
    Unexpected { index: u8, exit: String },
}

fn handle_exit(
    index: u8,
    exit: VcpuExit<'_>,
    devices: &Devices,
) -> Result<DeviceAction, ExitError> {
    match exit {
        VcpuExit::IoOut(port, data) => Ok(devices.pio_write(port, data)),
        VcpuExit::IoIn(port, data) => {
            devices.pio_read(port, data);
            Ok(DeviceAction::None)
        }
        VcpuExit::MmioWrite(addr, data) => Ok(devices.mmio_write(addr, data)),
        VcpuExit::MmioRead(addr, data) => {
            devices.mmio_read(addr, data);
            Ok(DeviceAction::None)
        }
        VcpuExit::Hlt => Ok(DeviceAction::None),
        VcpuExit::Intr => Ok(DeviceAction::None),
        VcpuExit::Shutdown => Ok(DeviceAction::Reset),
        VcpuExit::InternalError => Err(ExitError::Internal { index }),
        VcpuExit::FailEntry(reason, cpu) => Err(ExitError::FailEntry { index, reason, cpu }),
        VcpuExit::SystemEvent(ty, _) => {
            // KVM_SYSTEM_EVENT_SHUTDOWN = 1, RESET = 2.
            if ty == 2 {
                Ok(DeviceAction::Reset)
            } else {
                Ok(DeviceAction::Exit(0))
            }
        }
        other => Err(ExitError::Unexpected {
            index,
            exit: format!("{other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_says_which_vcpu_and_why() {
        let run = Crash::Run {
            index: 1,
            source: kvm_ioctls::Error::new(libc::EFAULT),
        };
        assert_eq!(
            run.to_string(),
            format!(
                "vCPU 1: KVM_RUN failed: {}",
                std::io::Error::from_raw_os_error(libc::EFAULT)
            )
        );
        let exit = Crash::Exit {
            exit: ExitError::FailEntry {
                index: 0,
                reason: 0x21,
                cpu: 3,
            },
            rip: 0xfff0,
        };
        assert_eq!(
            exit.to_string(),
            "vCPU 0: VM entry failed (hardware reason 0x21, cpu 3) at rip 0xfff0"
        );
        assert_eq!(
            Crash::Panicked { index: 2 }.to_string(),
            "the thread of vCPU 2 panicked"
        );
    }
}

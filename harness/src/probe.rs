//! What the host offers, as `vmm probe --json` reports it: the harness keeps its `checks`
//! (e.g. whether 4 KiB UFFDIO_CONTINUE works inside a hugetlb page, the kernel-native
//! alternative to 4 KiB staging) in results.json so a report says which strategies the kernel
//! could have supported.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors from running the probe.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("running {vmm} probe --json: {source}")]
    Spawn {
        vmm: PathBuf,
        source: std::io::Error,
    },
    #[error("{vmm} probe --json exited with {status}: {stderr}")]
    Failed {
        vmm: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{vmm} probe --json printed no valid JSON: {source}")]
    Json {
        vmm: PathBuf,
        source: serde_json::Error,
    },
}

/// One named host check: `result` is e.g. "supported" or "unsupported".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCheck {
    pub result: String,
    #[serde(default)]
    pub detail: String,
}

/// The part of `vmm probe --json` the harness keeps: its live checks, in the VMM's own type.
#[derive(Deserialize)]
struct ProbeOutput {
    checks: vmm::probe::LiveChecks,
}

/// The guest_memfd capabilities in `vmm probe --json` (`kvm.caps.value`).
#[derive(Deserialize)]
struct KvmOutput {
    kvm: KvmPart,
}

#[derive(Deserialize)]
struct KvmPart {
    caps: KvmCaps,
}

#[derive(Deserialize)]
struct KvmCaps {
    value: Option<GuestMemfdCaps>,
}

#[derive(Deserialize)]
struct GuestMemfdCaps {
    guest_memfd: bool,
    guest_memfd_flags: u64,
}

/// What the host offers, from one `vmm probe --json`.
#[derive(Clone, Debug, Default)]
pub struct Host {
    /// The live checks, as results.json keeps them.
    pub checks: BTreeMap<String, HostCheck>,
    /// Why guest_memfd guest RAM cannot run here (`None`: it can).
    pub no_guest_memfd: Option<String>,
}

/// Why a `vmm probe --json` output says guest_memfd guest RAM cannot run (`None`: it can;
/// also `None` when the output does not say, so that the VMM itself reports what fails).
pub fn parse_no_guest_memfd(json: &str) -> Option<String> {
    let caps = serde_json::from_str::<KvmOutput>(json)
        .ok()?
        .kvm
        .caps
        .value?;
    let wanted = vmm::memory::guest_memfd::GUEST_MEMFD_FLAGS;
    if !caps.guest_memfd {
        Some("this host's KVM has no guest_memfd (KVM_CAP_GUEST_MEMFD is 0)".to_string())
    } else if caps.guest_memfd_flags & wanted != wanted {
        Some(format!(
            "this host's KVM cannot create mappable shared guest_memfds (KVM_CAP_GUEST_MEMFD_FLAGS \
             is {:#x}, the VMM needs {wanted:#x})",
            caps.guest_memfd_flags
        ))
    } else {
        None
    }
}

/// Parses the `checks` of a `vmm probe --json` output into the record results.json keeps (one
/// entry per check, named as the VMM names it).
pub fn parse_checks(json: &str) -> Result<BTreeMap<String, HostCheck>, serde_json::Error> {
    let checks = serde_json::from_str::<ProbeOutput>(json)?.checks;
    serde_json::from_value(serde_json::to_value(checks)?)
}

/// Runs `vmm probe --json` and returns what the host offers.
pub fn host(vmm: &Path) -> Result<Host, ProbeError> {
    let out = Command::new(vmm)
        .args(["probe", "--json"])
        .output()
        .map_err(|source| ProbeError::Spawn {
            vmm: vmm.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(ProbeError::Failed {
            vmm: vmm.to_path_buf(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let json = String::from_utf8_lossy(&out.stdout);
    let checks = parse_checks(&json).map_err(|source| ProbeError::Json {
        vmm: vmm.to_path_buf(),
        source,
    })?;
    Ok(Host {
        checks,
        no_guest_memfd: parse_no_guest_memfd(&json),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_checks_object() {
        let c = parse_checks(
            r#"{"kernel_release":{"value":"6.18"},"checks":{"hugetlb_4k_continue":{"result":"unsupported","detail":"EINVAL"},"uffd_on_guest_memfd":{"result":"supported","detail":"MINOR"}}}"#,
        )
        .unwrap();
        assert_eq!(c["hugetlb_4k_continue"].result, "unsupported");
        assert_eq!(c["hugetlb_4k_continue"].detail, "EINVAL");
        assert_eq!(c["uffd_on_guest_memfd"].result, "supported");
        // A report without the checks, or with a result the VMM does not give, is not one.
        assert!(parse_checks("{}").is_err());
        assert!(parse_checks(
            r#"{"checks":{"hugetlb_4k_continue":{"result":"maybe","detail":""},"uffd_on_guest_memfd":{"result":"supported","detail":""}}}"#
        )
        .is_err());
        assert!(parse_checks("not json").is_err());
    }

    #[test]
    fn says_why_guest_memfd_cannot_run() {
        let with = |gmem: bool, flags: u64| {
            format!(
                r#"{{"kvm":{{"caps":{{"value":{{"guest_memfd":{gmem},"guest_memfd_flags":{flags}}}}}}}}}"#
            )
        };
        assert_eq!(parse_no_guest_memfd(&with(true, 3)), None);
        assert_eq!(parse_no_guest_memfd(&with(true, 7)), None);
        let none = parse_no_guest_memfd(&with(false, 0)).unwrap();
        assert!(none.contains("no guest_memfd"), "{none}");
        let flags = parse_no_guest_memfd(&with(true, 1)).unwrap();
        assert!(flags.contains("is 0x1"), "{flags}");
        // No KVM caps in the output (no /dev/kvm): the VMM will say what fails.
        assert_eq!(
            parse_no_guest_memfd(r#"{"kvm":{"caps":{"value":null}}}"#),
            None
        );
        assert_eq!(parse_no_guest_memfd("{}"), None);
    }
}

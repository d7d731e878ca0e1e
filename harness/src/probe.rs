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

/// Parses the `checks` of a `vmm probe --json` output into the record results.json keeps (one
/// entry per check, named as the VMM names it).
pub fn parse_checks(json: &str) -> Result<BTreeMap<String, HostCheck>, serde_json::Error> {
    let checks = serde_json::from_str::<ProbeOutput>(json)?.checks;
    serde_json::from_value(serde_json::to_value(checks)?)
}

/// Runs `vmm probe --json` and returns its checks.
pub fn host_checks(vmm: &Path) -> Result<BTreeMap<String, HostCheck>, ProbeError> {
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
    parse_checks(&String::from_utf8_lossy(&out.stdout)).map_err(|source| ProbeError::Json {
        vmm: vmm.to_path_buf(),
        source,
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
}

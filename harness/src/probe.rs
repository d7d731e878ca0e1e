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

/// The `checks` object of `vmm probe --json`.
#[derive(Deserialize)]
struct ProbeOutput {
    #[serde(default)]
    checks: BTreeMap<String, HostCheck>,
}

/// Parses the `checks` of a `vmm probe --json` output.
pub fn parse_checks(json: &str) -> Result<BTreeMap<String, HostCheck>, serde_json::Error> {
    serde_json::from_str::<ProbeOutput>(json).map(|p| p.checks)
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
            r#"{"kernel_release":{"value":"6.18"},"checks":{"hugetlb_4k_continue":{"result":"unsupported","detail":"EINVAL"}}}"#,
        )
        .unwrap();
        assert_eq!(c["hugetlb_4k_continue"].result, "unsupported");
        assert_eq!(c["hugetlb_4k_continue"].detail, "EINVAL");
        assert!(parse_checks("{}").unwrap().is_empty());
        assert!(parse_checks("not json").is_err());
    }
}

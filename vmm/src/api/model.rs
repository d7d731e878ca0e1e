//! The control API's JSON bodies, shared by the server, the client and the OpenAPI document
//! (docs/openapi.json). Field names are snake_case like Cloud Hypervisor's; the migration statistics
//! keep QEMU's `query-migrate` names (see [`migration::live_stats`]).

use migration::types::{Backing, Mode};
use serde::{Deserialize, Serialize};

/// `GET /api/v1/vmm.ping`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ping {
    /// This VMM's version.
    pub version: String,
    /// Process id of the VMM.
    pub pid: u32,
    /// What the host offers (the report of `vmm probe --json`).
    pub capabilities: serde_json::Value,
}

/// What a VM is doing, as `vm.info` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// `vmm receive`: the VM is arriving (no vCPU has run here yet).
    Receiving,
    /// The vCPUs run.
    Running,
    /// The vCPUs are paused (by `vm.pause`, or by an outgoing migration).
    Paused,
    /// The VM stopped (guest exit, shutdown, or it migrated away); the VMM is exiting.
    Shutdown,
}

/// How the VM was configured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmConfigInfo {
    pub vcpus: u8,
    pub memory_bytes: u64,
    /// anon, shmem, hugetlb-2m, hugetlb-1g or guest-memfd.
    pub backing: Backing,
    /// The backing's page size in bytes.
    pub page_size: u64,
    /// The kernel it booted (None for a received VM).
    pub kernel: Option<String>,
    /// `booted` (vmm run) or `received` (vmm receive).
    pub origin: String,
}

/// One guest RAM region (a memslot).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegionInfo {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
}

/// One vCPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuInfo {
    pub index: u8,
}

/// `GET /api/v1/vm.info`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    /// Absent while a received VM is still arriving and its layout is not known yet.
    pub config: Option<VmConfigInfo>,
    pub memory: Vec<RegionInfo>,
    pub vcpus: Vec<VcpuInfo>,
    /// The status of the migration in progress or the last one (QEMU's names), if any.
    pub migration_status: Option<migration::MigrationStatus>,
    /// The last outgoing migration left the VM paused with its outcome unknown (the
    /// destination may run it): `vm.resume` needs `force`.
    pub migration_outcome_unknown: bool,
}

/// `PUT /api/v1/vm.resume` (the body is optional).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    /// Resume although the last migration's outcome is unknown: only if the destination
    /// surely does not run the VM (else two copies run).
    #[serde(default)]
    pub force: bool,
}

/// `PUT /api/v1/vm.send-migration`: migrate this VM to a waiting `vmm receive`. The request
/// returns once the migration ended: 200 with the summary, or an error.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigration {
    /// `HOST:PORT` (a `tcp:` prefix, as Cloud Hypervisor writes it, is accepted).
    pub destination_url: String,
    /// precopy, postcopy or hybrid.
    pub mode: Mode,
    /// File holding the shared secret; the VMM reads it itself, so it never crosses the socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    /// Directory with ca-cert.pem, client-cert.pem and client-key.pem: both channels over
    /// TLS 1.3 with mutual certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<String>,
    /// The name the destination's certificate must carry (default: the host of the URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// Allow plaintext (with a secret) to a non-loopback destination.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// How long to keep reconnecting after the link fails past the switchover (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recover_timeout_s: Option<u64>,
    #[serde(default, flatten)]
    pub tunables: Tunables,
}

impl SendMigration {
    /// A request to migrate to `destination_url` in `mode`, everything else at its default.
    pub fn new(destination_url: String, mode: Mode) -> Self {
        SendMigration {
            destination_url,
            mode,
            secret_file: None,
            tls_dir: None,
            tls_server_name: None,
            allow_plaintext: false,
            recover_timeout_s: None,
            tunables: Tunables::default(),
        }
    }
}

/// Migration tunables (QEMU's migration parameters, in this API's units).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tunables {
    /// Precopy stops iterating once the rest would take this long to send (default 10 ms;
    /// QEMU's downtime-limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<u64>,
    /// Cap on precopy rounds, bytes per second (QEMU's max-bandwidth). None: uncapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Cap on postcopy's background push, bytes per second (QEMU's max-postcopy-bandwidth);
    /// pages a vCPU waits for are never capped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    /// Most precopy rounds, the full pass included (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
    /// Give up a migration that has not switched over within this many seconds (the VM runs
    /// on here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
}

/// `PUT /api/v1/vm.migration-retarget`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetargetRequest {
    /// `HOST:PORT` the running migration's recovery reconnects to.
    pub destination_url: String,
}

/// The reply to a retarget: the address recovery reconnects to.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetargetReply {
    pub destination: String,
}

/// Every error reply's body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// The HTTP status code again, for clients that lose it.
    pub status: u16,
}

#[cfg(test)]
mod tests {
    use migration::MigrationStatus;

    use super::*;

    /// The `enum` of `property` in schema `schema` of docs/openapi.json.
    fn documented(schema: &str, property: &str) -> Vec<String> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let text = std::fs::read_to_string(path).expect("docs/openapi.json");
        let doc: serde_json::Value =
            serde_json::from_str(&text).expect("docs/openapi.json is JSON");
        let values = &doc["components"]["schemas"][schema]["properties"][property]["enum"];
        serde_json::from_value(values.clone())
            .unwrap_or_else(|e| panic!("{schema}.{property} has no enum of strings: {e}"))
    }

    #[test]
    fn openapi_lists_the_spellings_of_the_shared_vocabulary() {
        assert_eq!(
            documented("VmConfig", "backing"),
            Backing::ALL.map(Backing::name)
        );
        assert_eq!(
            documented("SendMigration", "mode"),
            Mode::ALL.map(Mode::name)
        );
        assert_eq!(
            documented("MigrationInfo", "status"),
            MigrationStatus::ALL.map(MigrationStatus::name)
        );
    }
}

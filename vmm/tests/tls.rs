//! Migration over TLS end to end: `vmm tls-init` makes the certificates, then a postcopy
//! migration of the workload guest from a real `vmm run` to a real `vmm receive --tls-dir` by
//! `vmm migrate --tls-dir` over TCP on loopback; the guest must finish on the destination with
//! every page intact. Then the refusals a user sees: a plaintext `vmm migrate` against a TLS
//! destination, and non-loopback addresses without TLS (no packet leaves the machine: both
//! are refused before anything connects).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const MIGRATE_LIMIT: Duration = Duration::from_secs(120);
const FINISH_LIMIT: Duration = Duration::from_secs(120);

fn tls_init(dir: &Path) {
    let out = run_vmm(
        &[
            "tls-init",
            dir.to_str().unwrap(),
            "--hosts",
            "127.0.0.1,localhost",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "tls-init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca-cert.pem",
        "server-cert.pem",
        "server-key.pem",
        "client-cert.pem",
        "client-key.pem",
    ] {
        assert!(dir.join(f).exists(), "tls-init did not write {f}");
    }
    // A second run refuses to overwrite.
    let out = run_vmm(
        &["tls-init", dir.to_str().unwrap(), "--hosts", "127.0.0.1"],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--force"), "{err}");
}

fn migrate(sock: &Path, to: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let r = run_migrate(sock, to, "postcopy", extra, MIGRATE_LIMIT);
    (r.code, r.stdout, r.stderr)
}

#[test]
fn postcopy_over_tls_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    tls_init(&tls);
    let tls_arg = tls.to_str().unwrap();
    let sock = dir.path().join("api.sock");
    let port = free_port();
    let mut dst = start_receive("destination", "shmem", "4k", port, &["--tls-dir", tls_arg]);
    let mut src = start_workload_source("shmem", "256M", 1, 600, &sock);
    let run = run_migrate(
        &sock,
        &format!("127.0.0.1:{port}"),
        "postcopy",
        &["--tls-dir", tls_arg],
        MIGRATE_LIMIT,
    );
    let context = |src: &Proc, dst: &Proc| {
        format!("{}\n{}\n{}", run.describe(), src.describe(), dst.describe())
    };
    let summary = run.expect_summary(&context(&src, &dst));
    assert!(
        summary["faults_served"].as_f64().unwrap_or(0.0) > 0.0,
        "{summary:#}"
    );
    let src_status = src.wait(Duration::from_secs(30));
    assert_eq!(src_status.code(), Some(0), "source\n{}", src.describe());
    let dst_status = dst.wait(FINISH_LIMIT);
    let result = workload_result(&dst.stdout()).unwrap_or_else(|| {
        panic!(
            "no WORKLOAD RESULT on the destination\n{}",
            context(&src, &dst)
        )
    });
    assert_workload_ok(&result, None, &context(&src, &dst));
    assert_eq!(dst_status.code(), Some(0), "{}", context(&src, &dst));
    assert!(
        dst.stderr().contains("TLS"),
        "the destination does not say it listens with TLS\n{}",
        dst.describe()
    );
}

#[test]
fn plaintext_and_non_loopback_without_tls_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    tls_init(&tls);
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    let secret_arg = secret.to_str().unwrap();

    // A listener on a non-loopback address needs TLS; a secret alone needs --allow-plaintext.
    let port = free_port();
    let any = format!("0.0.0.0:{port}");
    for (extra, want) in [
        (vec![], "--tls-dir"),
        (vec!["--secret-file", secret_arg], "--allow-plaintext"),
    ] {
        let mut args = vec!["receive", "--listen", &any, "--backing", "anon"];
        args.extend_from_slice(&extra);
        let out = run_vmm(&args, Duration::from_secs(30));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("non-loopback") && err.contains(want), "{err}");
    }

    let sock = dir.path().join("api.sock");
    let mut src = start_workload_source("anon", "256M", 1, 0, &sock);
    // The same for the source: refused before anything connects.
    let (code, _, err) = migrate(&sock, "192.0.2.1:7000", &["--secret-file", secret_arg]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("192.0.2.1:7000") && err.contains("--allow-plaintext"),
        "{err}"
    );

    // A plaintext source against a TLS destination: both say why.
    let port = free_port();
    let mut dst = start_receive(
        "destination",
        "anon",
        "4k",
        port,
        &["--tls-dir", tls.to_str().unwrap()],
    );
    let (code, _, err) = migrate(&sock, &format!("127.0.0.1:{port}"), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("requires TLS"), "migrate: {err}");
    let status = dst.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", dst.describe());
    assert!(
        dst.stderr().contains("plaintext"),
        "receive does not say the source spoke plaintext\n{}",
        dst.describe()
    );

    // The source VM still runs.
    let reply = vmm::api::Client::new(&sock)
        .info()
        .map(|i| serde_json::to_value(i).expect("vm.info encodes"))
        .unwrap();
    assert_eq!(reply["state"], "running", "{reply}\n{}", src.describe());
    src.kill();
}

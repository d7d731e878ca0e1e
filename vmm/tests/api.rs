//! The control API as a user drives it: the real curl against `vmm run --api-socket`, the
//! OpenAPI document (docs/openapi.json) checked against live replies, bad requests answered
//! with JSON errors while the VM runs on, and the event stream of a VM's life.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// One request with the real curl: (HTTP status, body).
fn curl(sock: &Path, method: &str, endpoint: &str, body: Option<&str>) -> (u16, String) {
    let url = format!("http://localhost/api/v1/{endpoint}");
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-S",
        "--max-time",
        "60",
        "-w",
        "\n%{http_code}",
        "-X",
        method,
    ])
    .arg("--unix-socket")
    .arg(sock);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = cmd.arg(&url).output().unwrap_or_else(|e| {
        panic!("running curl (is it installed? ci/install-deps.sh installs it): {e}")
    });
    assert!(
        out.status.success(),
        "curl {method} {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no status from curl: {text}"));
    (code, body.to_string())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {body}"))
}

/// A JSON error reply with this status whose message contains `want`.
fn assert_error(reply: (u16, String), status: u16, want: &str) {
    let (code, body) = reply;
    assert_eq!(code, status, "{body}");
    let v = json(&body);
    assert_eq!(v["status"], status, "{body}");
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error text: {body}"));
    assert!(msg.contains(want), "error '{msg}' does not say '{want}'");
}

fn pass_lines(out: &str) -> usize {
    out.matches("WORKLOAD pass ").count()
}

/// Starts a workload VM (anon, 256 MiB, endless passes) with an API socket and an event file.
fn start_vm(dir: &Path) -> (Proc, PathBuf, PathBuf) {
    let sock = dir.join("api.sock");
    let events = dir.join("events.jsonl");
    let mut args = workload_source_args("anon", "256M", 1, 0, &sock);
    args.push("--event-monitor".into());
    args.push(format!("path={}", events.display()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Proc::vmm("vm", &args);
    vm.wait_for("first WORKLOAD pass line", BOOT_LIMIT, |out, _| {
        out.contains("WORKLOAD pass ")
    });
    vm.wait_for("API socket", BOOT_LIMIT, |_, _| sock.exists());
    (vm, sock, events)
}

/// Waits until the guest printed `more` pass lines after `before`.
fn wait_passes(vm: &mut Proc, more: usize) {
    let before = pass_lines(&vm.stdout());
    vm.wait_for(
        "more WORKLOAD pass lines",
        Duration::from_secs(60),
        |out, _| pass_lines(out) >= before + more,
    );
}

fn events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(json)
        .collect()
}

#[test]
fn curl_drives_a_vm_and_bad_requests_leave_it_running() {
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, sock, event_file) = start_vm(dir.path());

    let (code, body) = curl(&sock, "GET", "vmm.ping", None);
    assert_eq!(code, 200, "{body}");
    let ping = json(&body);
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(ping["pid"], vm.pid());
    assert!(ping["capabilities"]["kvm"].is_object(), "{body}");

    let (code, body) = curl(&sock, "GET", "vm.info", None);
    assert_eq!(code, 200, "{body}");
    let info = json(&body);
    assert_eq!(info["state"], "running", "{body}");
    assert_eq!(info["config"]["backing"], "anon", "{body}");
    assert_eq!(info["config"]["origin"], "booted", "{body}");
    let ram: u64 = info["memory"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["size"].as_u64().unwrap())
        .sum();
    assert_eq!(ram, 256 << 20, "{body}");

    // Bad requests: each a JSON error, none harms the VM.
    assert_error(
        curl(&sock, "PUT", "vm.send-migration", Some("{bad")),
        400,
        "malformed request body",
    );
    assert_error(
        curl(
            &sock,
            "PUT",
            "vm.send-migration",
            Some(r#"{"destination_url":"127.0.0.1:1","mode":"sideways"}"#),
        ),
        400,
        "sideways",
    );
    assert_error(
        curl(&sock, "PUT", "vm.send-migration", None),
        400,
        "needs a JSON body",
    );
    assert_error(
        curl(&sock, "GET", "vm.nothing", None),
        404,
        "no endpoint /api/v1/vm.nothing",
    );
    assert_error(curl(&sock, "POST", "vm.pause", None), 405, "takes PUT");
    assert_error(curl(&sock, "PUT", "vm.info", None), 405, "takes GET");
    assert_error(
        curl(&sock, "PUT", "vm.migration-cancel", None),
        409,
        "no migration",
    );
    wait_passes(&mut vm, 2);
    assert_eq!(
        json(&curl(&sock, "GET", "vm.info", None).1)["state"],
        "running"
    );
    assert_eq!(
        json(&curl(&sock, "GET", "vm.migration", None).1)["status"],
        "none"
    );

    // Pause: no pass completes; resume: passes go on.
    let (code, body) = curl(&sock, "PUT", "vm.pause", None);
    assert_eq!(code, 204, "{body}");
    assert_eq!(
        json(&curl(&sock, "GET", "vm.info", None).1)["state"],
        "paused"
    );
    let frozen = pass_lines(&vm.stdout());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        pass_lines(&vm.stdout()),
        frozen,
        "the guest ran while paused"
    );
    assert_error(
        curl(&sock, "PUT", "vm.resume", Some(r#"{"force":"yes"}"#)),
        400,
        "force",
    );
    let (code, body) = curl(&sock, "PUT", "vm.resume", Some("{}"));
    assert_eq!(code, 204, "{body}");
    wait_passes(&mut vm, 2);

    // Shutdown through the API: exit status 0, socket gone, the events in order.
    let (code, body) = curl(&sock, "PUT", "vm.shutdown", None);
    assert_eq!(code, 204, "{body}");
    let status = vm.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", vm.describe());
    assert!(!sock.exists(), "API socket left behind");
    let names: Vec<String> = events(&event_file)
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["source"].as_str().unwrap(),
                e["event"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        ["vm/booted", "vm/paused", "vm/resumed", "vm/shutdown"],
        "{names:?}"
    );
    let all = events(&event_file);
    assert_eq!(all[3]["properties"]["reason"], "api");
    let t0 = all[0]["timestamp"]["seconds"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        t0 <= now && now - t0 < 600,
        "timestamp {t0} is not now ({now})"
    );
}

/// A minimal OpenAPI 3.0 schema check: type, nullable, enum, required, properties, items,
/// allOf and $ref into components.schemas. Returns what does not match.
fn check_schema(doc: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        let target = &doc["components"]["schemas"][name];
        assert!(target.is_object(), "dangling $ref {r}");
        return check_schema(doc, target, v, at, errs);
    }
    if v.is_null() {
        if schema["nullable"] != true {
            errs.push(format!("{at}: null but not nullable"));
        }
        return;
    }
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            check_schema(doc, s, v, at, errs);
        }
    }
    let ok = match schema["type"].as_str() {
        None => true,
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_u64() || v.is_i64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        Some(t) => panic!("schema type {t} at {at} not understood"),
    };
    if !ok {
        errs.push(format!("{at}: {v} is not a {}", schema["type"]));
        return;
    }
    if let Some(e) = schema["enum"].as_array() {
        if !e.contains(v) {
            errs.push(format!("{at}: {v} not in {e:?}"));
        }
    }
    for r in schema["required"].as_array().into_iter().flatten() {
        let k = r.as_str().unwrap();
        if v.get(k).is_none() {
            errs.push(format!("{at}: required '{k}' missing"));
        }
    }
    if let (Some(props), Some(obj)) = (schema["properties"].as_object(), v.as_object()) {
        for (k, s) in props {
            if let Some(x) = obj.get(k) {
                check_schema(doc, s, x, &format!("{at}.{k}"), errs);
            }
        }
        for k in obj.keys() {
            if !props.contains_key(k) {
                errs.push(format!("{at}: '{k}' is not documented"));
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            check_schema(doc, items, x, &format!("{at}[{i}]"), errs);
        }
    }
}

/// Checks one live reply against the document: its status is documented for the operation,
/// and its body matches that response's schema.
fn check_reply(
    doc: &Value,
    method: &str,
    endpoint: &str,
    reply: (u16, String),
    seen: &mut Vec<String>,
) {
    let (code, body) = reply;
    let op = &doc["paths"][format!("/{endpoint}")][method.to_lowercase()];
    if !op.is_object() {
        // An undocumented method: a 405 with the documented Error body.
        assert_eq!(
            code, 405,
            "{method} {endpoint} is not documented yet answered: {body}"
        );
        let mut errs = Vec::new();
        let error = serde_json::json!({ "$ref": "#/components/schemas/Error" });
        check_schema(doc, &error, &json(&body), endpoint, &mut errs);
        assert!(errs.is_empty(), "405 body vs Error: {errs:#?}\n{body}");
        return;
    }
    let resp = &op["responses"][code.to_string()];
    assert!(
        resp.is_object(),
        "{method} {endpoint} answered {code}, which docs/openapi.json does not list: {body}"
    );
    let schema = &resp["content"]["application/json"]["schema"];
    if schema.is_object() {
        let mut errs = Vec::new();
        check_schema(doc, schema, &json(&body), endpoint, &mut errs);
        assert!(
            errs.is_empty(),
            "{method} {endpoint} ({code}) vs docs/openapi.json: {errs:#?}\n{body}"
        );
    } else {
        assert!(
            body.is_empty(),
            "{method} {endpoint} ({code}) has an undocumented body: {body}"
        );
    }
    seen.push(format!("{method} {endpoint}"));
}

#[test]
fn openapi_document_matches_live_replies() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let doc = json(&std::fs::read_to_string(&path).expect("docs/openapi.json"));
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, sock, _) = start_vm(dir.path());
    let mut seen = Vec::new();
    for (method, endpoint, body) in [
        ("GET", "vmm.ping", None),
        ("GET", "vm.info", None),
        ("GET", "vm.migration", None),
        ("PUT", "vm.pause", None),
        ("GET", "vm.info", None),
        ("PUT", "vm.resume", None),
        ("PUT", "vm.resume", Some("[1]")),
        ("PUT", "vm.migration-cancel", None),
        (
            "PUT",
            "vm.migration-retarget",
            Some(r#"{"destination_url":"127.0.0.1:9"}"#),
        ),
        ("PUT", "vm.migration-retarget", Some("{}")),
        (
            "PUT",
            "vm.send-migration",
            Some(r#"{"destination_url":"127.0.0.1:9","mode":"precopy","max_rounds":0}"#),
        ),
        ("GET", "vm.pause", None),
        ("PUT", "vm.shutdown", None),
    ] {
        let reply = curl(&sock, method, endpoint, body);
        check_reply(&doc, method, endpoint, reply, &mut seen);
    }
    // Every documented operation was exercised.
    for (p, ops) in doc["paths"].as_object().unwrap() {
        for m in ops.as_object().unwrap().keys() {
            let op = format!("{} {}", m.to_uppercase(), p.trim_start_matches('/'));
            assert!(
                seen.contains(&op),
                "{op} is documented but not checked here"
            );
        }
    }
    let status = vm.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", vm.describe());
}

/// `vm.migration` of `sock` every 100 ms on a thread of its own until `stop` is set: every
/// reply, in order.
fn poll_stats(
    sock: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<Value>> {
    std::thread::spawn(move || {
        let client = vmm::api::Client::new(&sock);
        let mut seen = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            if let Ok(v) = client.migration() {
                seen.push(v);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        seen
    })
}

/// The counters of successive `vm.migration` replies never decrease.
fn assert_monotonic(side: &str, seen: &[Value]) {
    let counters = [
        ("total-time", None),
        ("ram", Some("transferred")),
        ("ram", Some("duplicate")),
        ("ram", Some("normal")),
        ("ram", Some("dirty-sync-count")),
        ("ram", Some("postcopy-requests")),
        ("postcopy-blocktime", None),
        ("collapses-done", None),
    ];
    for (k, sub) in counters {
        let mut last = 0u64;
        for v in seen {
            let x = match sub {
                Some(s) => &v[k][s],
                None => &v[k],
            };
            let Some(x) = x.as_u64() else { continue };
            assert!(
                x >= last,
                "{side}: {k}{} went from {last} to {x}: {seen:#?}",
                sub.map(|s| format!(".{s}")).unwrap_or_default()
            );
            last = x;
        }
    }
}

fn statuses(seen: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in seen {
        let s = v["status"].as_str().unwrap_or("?").to_string();
        if out.last() != Some(&s) {
            out.push(s);
        }
    }
    out
}

fn send(mode: &str, port: u16) -> vmm::api::model::SendMigration {
    vmm::api::model::SendMigration::new(
        format!("127.0.0.1:{port}"),
        mode.parse().expect("a migration mode"),
    )
}

/// Starts `vmm receive` for one hop with an API socket and an event file in `dir`.
fn start_hop(dir: &Path, name: &str, backing: &str, port: u16) -> (Proc, PathBuf, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let events = dir.join(format!("{name}.events"));
    let ev = format!("path={}", events.display());
    let p = start_receive(
        name,
        backing,
        "4k",
        port,
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--event-monitor",
            &ev,
        ],
    );
    (p, sock, events)
}

/// Waits until the VM behind `sock` runs with every page arrived.
fn wait_arrived(p: &mut Proc, sock: &Path) {
    let client = vmm::api::Client::new(sock);
    let start = std::time::Instant::now();
    loop {
        let done = client
            .migration()
            .map(|m| m["status"] == "completed")
            .unwrap_or(false);
        let running = client
            .info()
            .map(|i| i.state == vmm::api::model::VmState::Running)
            .unwrap_or(false);
        if done && running {
            return;
        }
        assert!(
            p.try_wait().is_none(),
            "{} exited before every page arrived\n{}",
            p.describe(),
            p.describe()
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no completed incoming migration\n{}",
            p.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn clean(out: &str) -> bool {
    !out.contains("WORKLOAD MISMATCH") && !out.contains("WORKLOAD EXCEPTION")
}

fn event_names(path: &Path) -> Vec<String> {
    events(path)
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["source"].as_str().unwrap_or("?"),
                e["event"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

/// A → B (postcopy onto hugetlb-2m) → C (hybrid onto shmem) → D (postcopy onto hugetlb-1g at
/// 4 KiB): every received VM is a full VM that migrates on; the workload verifies its memory on
/// each; statistics polled every 100 ms during the first hop; D is shut down through the API.
#[test]
fn a_received_vm_migrates_on_a_to_b_to_c_to_d_ending_on_hugetlb_1g() {
    // B holds 512 pages of 2 MiB until it migrated on; D one page of 1 GiB.
    let _pools = reserve_hugepages_of(&[(2 << 20, 512), (1 << 30, 1)])
        .unwrap_or_else(|e| panic!("huge pages for hops B and D: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let sock_a = dir.path().join("a.sock");
    let events_a = dir.path().join("a.events");
    let mut args = workload_source_args("anon", "1G", 2, 0, &sock_a);
    args.extend([
        "--event-monitor".into(),
        format!("path={}", events_a.display()),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a = Proc::vmm("A", &args);
    a.wait_for("first WORKLOAD pass line", BOOT_LIMIT, |out, _| {
        out.contains("WORKLOAD pass ")
    });
    a.wait_for("API socket", BOOT_LIMIT, |_, _| sock_a.exists());

    // A → B, postcopy onto hugetlb-2m, both sides' statistics polled every 100 ms.
    let port_b = free_port();
    let (mut b, sock_b, events_b) = start_hop(dir.path(), "B", "hugetlb-2m", port_b);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poll_a = poll_stats(sock_a.clone(), stop.clone());
    let poll_b = poll_stats(sock_b.clone(), stop.clone());
    let summary = vmm::api::Client::new(&sock_a)
        .send_migration(&send("postcopy", port_b))
        .unwrap_or_else(|e| panic!("A → B: {e}\n{}\n{}", a.describe(), b.describe()));
    assert_eq!(
        a.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        a.describe()
    );
    wait_arrived(&mut b, &sock_b);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (seen_a, seen_b) = (poll_a.join().unwrap(), poll_b.join().unwrap());
    assert!(summary["blackout_ms"].as_f64().is_some(), "{summary}");
    assert_monotonic("A", &seen_a);
    assert_monotonic("B", &seen_b);
    let st_b = statuses(&seen_b);
    assert!(
        st_b.contains(&"postcopy-active".to_string())
            && st_b.last().map(String::as_str) == Some("completed"),
        "B's statuses {st_b:?}"
    );
    let last_b = seen_b.last().unwrap();
    eprintln!(
        "B's final statistics ({} polls of A, {} of B): {last_b:#}",
        seen_a.len(),
        seen_b.len()
    );
    assert!(
        last_b["ram"]["postcopy-requests"].as_u64().unwrap_or(0) > 0,
        "{last_b:#}"
    );
    let vcpu_block = last_b["postcopy-vcpu-blocktime"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        vcpu_block.len(),
        2,
        "per-vCPU blocktime of 2 vCPUs: {last_b:#}"
    );
    assert!(
        vcpu_block
            .iter()
            .map(|v| v.as_u64().unwrap_or(0))
            .sum::<u64>()
            > 0,
        "{last_b:#}"
    );
    assert!(
        last_b["postcopy-latency-dist"]
            .as_array()
            .is_some_and(|d| !d.is_empty()),
        "{last_b:#}"
    );
    assert!(
        statuses(&seen_a).contains(&"postcopy-active".to_string()),
        "{:?}",
        statuses(&seen_a)
    );
    // The event sequence of that migration, on both sides.
    let ev_a = event_names(&events_a);
    assert_eq!(
        ev_a.first().map(String::as_str),
        Some("vm/booted"),
        "{ev_a:?}"
    );
    let pos = |evs: &[String], e: &str| evs.iter().position(|x| x == e);
    for seq in [
        ["migration/started", "migration/postcopy-active"],
        ["migration/postcopy-active", "migration/completed"],
    ] {
        let (x, y) = (pos(&ev_a, seq[0]), pos(&ev_a, seq[1]));
        assert!(x.is_some() && y.is_some() && x < y, "A's events {ev_a:?}");
    }
    assert_eq!(
        ev_a.last().map(String::as_str),
        Some("vm/shutdown"),
        "{ev_a:?}"
    );
    let ev_b = event_names(&events_b);
    for e in [
        "migration/started",
        "migration/postcopy-active",
        "migration/completed",
    ] {
        assert!(
            ev_b.contains(&e.to_string()),
            "B's events lack {e}: {ev_b:?}"
        );
    }
    assert!(clean(&b.stdout()), "{}", b.describe());
    wait_passes(&mut b, 2);

    // B → C, hybrid onto shmem.
    let port_c = free_port();
    let (mut c, sock_c, _) = start_hop(dir.path(), "C", "shmem", port_c);
    vmm::api::Client::new(&sock_b)
        .send_migration(&send("hybrid", port_c))
        .unwrap_or_else(|e| panic!("B → C: {e}\n{}\n{}", b.describe(), c.describe()));
    assert_eq!(
        b.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        b.describe()
    );
    wait_arrived(&mut c, &sock_c);
    wait_passes(&mut c, 2);
    assert!(clean(&c.stdout()), "{}", c.describe());

    // C → D, postcopy onto hugetlb-1g at 4 KiB.
    let port_d = free_port();
    let (mut d, sock_d, events_d) = start_hop(dir.path(), "D", "hugetlb-1g", port_d);
    vmm::api::Client::new(&sock_c)
        .send_migration(&send("postcopy", port_d))
        .unwrap_or_else(|e| panic!("C → D: {e}\n{}\n{}", c.describe(), d.describe()));
    assert_eq!(
        c.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        c.describe()
    );
    wait_arrived(&mut d, &sock_d);
    wait_passes(&mut d, 2);
    assert!(clean(&d.stdout()), "{}", d.describe());
    let info = vmm::api::Client::new(&sock_d).info().unwrap();
    let cfg = info.config.expect("D's config");
    assert_eq!(
        (cfg.backing.name(), cfg.origin.as_str(), cfg.vcpus),
        ("hugetlb-1g", "received", 2)
    );

    // D is shut down through the API.
    vmm::api::Client::new(&sock_d).shutdown().unwrap();
    assert_eq!(
        d.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        d.describe()
    );
    assert_eq!(
        event_names(&events_d).last().map(String::as_str),
        Some("vm/shutdown")
    );
}

/// A VM received by postcopy onto guest_memfd runs from plain memslots over the guest_memfd
/// (the collapse maps it there instead of re-binding the slots), so it can log dirty pages and
/// migrate on: A (shmem) → B (guest_memfd, postcopy) → C (shmem, hybrid, whose precopy needs
/// B's dirty log), the guest verifying its memory all the way.
#[test]
fn a_vm_received_on_guest_memfd_migrates_on_by_hybrid() {
    if !guest_memfd_or_refusal() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock_a = dir.path().join("a.sock");
    let args = workload_source_args("shmem", "256M", 1, 0, &sock_a);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a = Proc::vmm("A", &args);
    a.wait_for("first WORKLOAD pass line", BOOT_LIMIT, |out, _| {
        out.contains("WORKLOAD pass ")
    });
    a.wait_for("API socket", BOOT_LIMIT, |_, _| sock_a.exists());

    let port_b = free_port();
    let (mut b, sock_b, _) = start_hop(dir.path(), "B", "guest-memfd", port_b);
    vmm::api::Client::new(&sock_a)
        .send_migration(&send("postcopy", port_b))
        .unwrap_or_else(|e| panic!("A → B: {e}\n{}\n{}", a.describe(), b.describe()));
    assert_eq!(
        a.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        a.describe()
    );
    wait_arrived(&mut b, &sock_b);
    wait_passes(&mut b, 2);
    assert!(clean(&b.stdout()), "{}", b.describe());

    let port_c = free_port();
    let (mut c, sock_c, _) = start_hop(dir.path(), "C", "shmem", port_c);
    let summary = vmm::api::Client::new(&sock_b)
        .send_migration(&send("hybrid", port_c))
        .unwrap_or_else(|e| panic!("B → C: {e}\n{}\n{}", b.describe(), c.describe()));
    assert_eq!(
        b.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        b.describe()
    );
    assert!(
        summary["pages_sent"].as_f64().unwrap_or(0.0) > 0.0,
        "B → C sent no page: {summary}"
    );
    wait_arrived(&mut c, &sock_c);
    wait_passes(&mut c, 2);
    assert!(clean(&c.stdout()), "{}", c.describe());
    let cfg = vmm::api::Client::new(&sock_c)
        .info()
        .unwrap()
        .config
        .expect("C's config");
    assert_eq!(
        (cfg.backing.name(), cfg.origin.as_str()),
        ("shmem", "received")
    );
    vmm::api::Client::new(&sock_c).shutdown().unwrap();
    assert_eq!(
        c.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        c.describe()
    );
}

/// A cancel during precopy: the VM runs on at the source, the migration says cancelled, the
/// destination gives up; a cancel with no migration is refused.
#[test]
fn cancel_in_precopy_leaves_the_vm_running() {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, sock, event_file) = start_vm(dir.path());
    let port = free_port();
    let mut dst = start_receive("dst", "anon", "4k", port, &[]);
    // A slow precopy (8 MiB/s over 256 MiB) that is surely still running when cancelled.
    let mut req = send("precopy", port);
    req.tunables.max_bandwidth = Some(8 << 20);
    let migrating = {
        let sock = sock.clone();
        std::thread::spawn(move || vmm::api::Client::new(&sock).send_migration(&req))
    };
    let client = vmm::api::Client::new(&sock);
    let start = std::time::Instant::now();
    while client
        .migration()
        .map(|m| m["status"] != "active")
        .unwrap_or(true)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "precopy never became active"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (code, body) = curl(&sock, "PUT", "vm.migration-cancel", None);
    assert_eq!(code, 204, "{body}");
    let r = migrating.join().unwrap();
    let err = r
        .expect_err("a cancelled migration reported success")
        .to_string();
    assert!(err.contains("cancel"), "{err}");
    let m = client.migration().unwrap();
    assert_eq!(m["status"], "cancelled", "{m:#}");
    // The bandwidth cap held: at most the cap over the elapsed time plus one burst.
    let sent = m["ram"]["transferred"].as_f64().unwrap_or(0.0);
    let secs = m["total-time"].as_f64().unwrap_or(0.0) / 1e3;
    assert!(
        sent <= (8u64 << 20) as f64 * secs * 1.3 + 4e6,
        "{sent} bytes in {secs} s"
    );
    assert_eq!(
        client.info().unwrap().state,
        vmm::api::model::VmState::Running
    );
    wait_passes(&mut src, 2);
    assert!(clean(&src.stdout()));
    let status = dst.wait(Duration::from_secs(30));
    assert_ne!(status.code(), Some(0), "{}", dst.describe());
    assert!(
        !dst.stdout().contains("WORKLOAD"),
        "the destination ran the guest"
    );
    assert_error(
        curl(&sock, "PUT", "vm.migration-cancel", None),
        409,
        "no migration",
    );
    let ev = event_names(&event_file);
    let (s, c) = (
        ev.iter().position(|e| e == "migration/started"),
        ev.iter().position(|e| e == "migration/cancelled"),
    );
    assert!(s.is_some() && c.is_some() && s < c, "{ev:?}");
    src.kill();
}

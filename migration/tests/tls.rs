//! TLS on the migration channels, over real TCP on loopback with real threads: a postcopy
//! migration over TLS, the refusals (plaintext against TLS both ways, a wrong CA, a
//! certificate for another name, no client certificate, an expired certificate) and a byte
//! flipped in flight (a TLS error, recovered in postcopy). The test VMs are those of
//! protocol.rs (`support/harness.rs`, included into both).
#![allow(dead_code)]

include!("support/harness.rs");

// ---- TLS ----

use migration::tls::{self, ClientTls, Generated, ServerTls};

fn certs(hosts: &[&str]) -> Generated {
    let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    tls::generate_pems(&hosts, false).unwrap()
}

fn server_tls(g: &Generated) -> ServerTls {
    ServerTls::from_pem(
        g.ca_cert.as_bytes(),
        g.server_cert.as_bytes(),
        g.server_key.as_bytes(),
    )
    .unwrap()
}

fn client_tls(g: &Generated) -> ClientTls {
    ClientTls::from_pem(
        g.ca_cert.as_bytes(),
        Some((g.client_cert.as_bytes(), g.client_key.as_bytes())),
        None,
    )
    .unwrap()
}

fn tls_listener(
    tls: Option<ServerTls>,
    secret: Option<Secret>,
) -> (destination::Listener, SocketAddr) {
    let l = destination::listen_secure(
        "127.0.0.1:0".parse().unwrap(),
        secret,
        tls,
        false,
        timeouts(),
    )
    .unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// A TLS acceptor on loopback with fresh certificates.
fn tls_acceptor() -> (Generated, Acceptor) {
    let g = certs(&["127.0.0.1"]);
    let acceptor = Acceptor::bind_with(
        "127.0.0.1:0".parse().unwrap(),
        None,
        Some(server_tls(&g)),
        false,
        timeouts(),
    )
    .unwrap();
    (g, acceptor)
}

fn tls_options(mode: Mode, tls: Option<ClientTls>, secret: Option<Secret>) -> MigrateOptions {
    let mut o = options(mode, secret);
    o.tls = tls;
    o
}

/// Runs a one-megabyte precopy from a source with `client` to a destination with `server`;
/// returns both sides' errors (both must fail) and checks that nothing of the VM moved.
fn refused(server: Option<ServerTls>, client: Option<ClientTls>) -> (String, String) {
    let (l, addr) = tls_listener(server, None);
    let dest = spawn_destination(l, false);
    let src = TestSource::new(&[(0, 0, MIB)]);
    let err = source::migrate(
        &src,
        addr,
        tls_options(Mode::Precopy, client, None),
        &|_| {},
    )
    .expect_err("the source migrated although TLS should have refused");
    let derr = dest
        .join()
        .unwrap()
        .err()
        .expect("the destination accepted the source");
    assert_eq!(src.pauses(), 0, "the source paused");
    assert!(!err.destination_started());
    println!("source: {err}\ndestination: {derr}");
    (err.to_string(), derr.to_string())
}

#[test]
fn postcopy_over_tls_with_a_secret_inside() {
    let g = certs(&["127.0.0.1", "localhost"]);
    let (l, addr) = tls_listener(Some(server_tls(&g)), Some(secret(1)));
    let dest = spawn_destination(l, false);
    let src = TestSource::new(LAYOUT_64M);
    let summary = source::migrate(
        &src,
        addr,
        tls_options(Mode::Postcopy, Some(client_tls(&g)), Some(secret(1))),
        &|_| {},
    )
    .unwrap();
    let (mem, state, recv) = dest.join().unwrap().unwrap();
    println!("source: {}", serde_json::to_string(&summary).unwrap());
    assert_eq!(mem.first_difference(&src.mem), None, "memory differs");
    assert_eq!(state, src.state);
    assert!(
        summary.faults_served > 0,
        "no fault went over the urgent channel"
    );
    assert_eq!(summary.faults_served, recv.stats.urgent_pages);
    assert_eq!(
        summary.destination.pages_received,
        src.mem.layout.total_pages()
    );
}

#[test]
fn a_wrong_secret_inside_tls_still_fails_authentication() {
    let g = certs(&["127.0.0.1"]);
    let (l, addr) = tls_listener(Some(server_tls(&g)), Some(secret(1)));
    let dest = spawn_destination(l, false);
    let src = TestSource::new(&[(0, 0, MIB)]);
    let err = source::migrate(
        &src,
        addr,
        tls_options(Mode::Precopy, Some(client_tls(&g)), Some(secret(2))),
        &|_| {},
    )
    .unwrap_err();
    let derr = dest.join().unwrap().err().unwrap();
    assert!(err.to_string().contains("authentication failed"), "{err}");
    assert!(derr.to_string().contains("authentication failed"), "{derr}");
}

#[test]
fn a_tls_destination_refuses_a_plaintext_source() {
    let g = certs(&["127.0.0.1"]);
    let (s, d) = refused(Some(server_tls(&g)), None);
    assert!(
        s.contains("requires TLS") && s.contains("--tls-dir"),
        "source: {s}"
    );
    assert!(
        d.contains("plaintext") && d.contains("requires TLS"),
        "destination: {d}"
    );
}

#[test]
fn a_plaintext_destination_refuses_a_tls_source() {
    let g = certs(&["127.0.0.1"]);
    let (s, d) = refused(None, Some(client_tls(&g)));
    assert!(
        s.contains("plaintext") && s.contains("does not use TLS"),
        "source: {s}"
    );
    assert!(
        d.contains("speaks TLS") && d.contains("--tls-dir"),
        "destination: {d}"
    );
}

#[test]
fn a_destination_certificate_of_another_ca_is_refused() {
    let ours = certs(&["127.0.0.1"]);
    let theirs = certs(&["127.0.0.1"]);
    let (s, d) = refused(Some(server_tls(&theirs)), Some(client_tls(&ours)));
    assert!(
        s.contains("unknown CA") && s.contains("destination's certificate"),
        "source: {s}"
    );
    assert!(d.contains("unknown CA"), "destination: {d}");
}

#[test]
fn a_source_certificate_of_another_ca_is_refused() {
    let ours = certs(&["127.0.0.1"]);
    let theirs = certs(&["127.0.0.1"]);
    // The source trusts the destination's CA but presents a certificate of another CA.
    let client = ClientTls::from_pem(
        ours.ca_cert.as_bytes(),
        Some((theirs.client_cert.as_bytes(), theirs.client_key.as_bytes())),
        None,
    )
    .unwrap();
    let (s, d) = refused(Some(server_tls(&ours)), Some(client));
    assert!(
        d.contains("source's certificate") && d.contains("unknown CA"),
        "destination: {d}"
    );
    assert!(
        s.contains("unknown CA") || s.contains("refused"),
        "source: {s}"
    );
}

#[test]
fn a_server_certificate_for_another_name_is_refused() {
    let g = certs(&["dest.example", "192.0.2.7"]);
    let (s, d) = refused(Some(server_tls(&g)), Some(client_tls(&g)));
    assert!(
        s.contains("wrong name") && s.contains("127.0.0.1") && s.contains("dest.example"),
        "source: {s}"
    );
    assert!(
        d.contains("refused the TLS session") || d.contains("alert"),
        "destination: {d}"
    );
    // The same certificate verifies under its own name.
    let (l, addr) = tls_listener(Some(server_tls(&g)), None);
    let dest = spawn_destination(l, false);
    let src = TestSource::new(&[(0, 0, MIB)]);
    let named = ClientTls::from_pem(
        g.ca_cert.as_bytes(),
        Some((g.client_cert.as_bytes(), g.client_key.as_bytes())),
        Some("dest.example"),
    )
    .unwrap();
    source::migrate(
        &src,
        addr,
        tls_options(Mode::Precopy, Some(named), None),
        &|_| {},
    )
    .unwrap();
    dest.join().unwrap().unwrap();
}

#[test]
fn a_source_without_a_client_certificate_is_refused() {
    let g = certs(&["127.0.0.1"]);
    let client = ClientTls::from_pem(g.ca_cert.as_bytes(), None, None).unwrap();
    let (s, d) = refused(Some(server_tls(&g)), Some(client));
    assert!(d.contains("no client certificate"), "destination: {d}");
    assert!(s.contains("requires a client certificate"), "source: {s}");
}

#[test]
fn an_expired_server_certificate_is_refused() {
    let hosts = vec!["127.0.0.1".to_string()];
    let g = tls::generate_pems(&hosts, true).unwrap();
    let (s, d) = refused(Some(server_tls(&g)), Some(client_tls(&g)));
    assert!(s.contains("expired"), "source: {s}");
    assert!(
        d.contains("refused the TLS session") || d.contains("alert"),
        "destination: {d}"
    );
}

#[test]
fn tls_init_writes_the_layout_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let hosts = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let files = tls::generate(dir.path(), &hosts, false).unwrap();
    assert_eq!(files.len(), 6);
    for key in [tls::SERVER_KEY, tls::CLIENT_KEY, tls::CA_KEY] {
        let mode = std::fs::metadata(dir.path().join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let e = tls::generate(dir.path(), &hosts, false).unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    tls::generate(dir.path(), &hosts, true).unwrap();
    ServerTls::from_dir(dir.path()).unwrap();
    ClientTls::from_dir(dir.path(), None).unwrap();
    let e = ServerTls::from_dir(&dir.path().join("nope")).unwrap_err();
    assert!(e.to_string().contains("ca-cert.pem"), "{e}");
}

/// A TCP forwarder that flips one bit of the source → destination stream once the bytes it
/// forwarded that way (all connections together) reach `flip_at`.
struct Flipper {
    addr: SocketAddr,
    flip_at: Arc<AtomicU64>,
    flips: Arc<AtomicU64>,
}

impl Flipper {
    fn start(upstream: SocketAddr) -> Flipper {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let flip_at = Arc::new(AtomicU64::new(u64::MAX));
        let flips = Arc::new(AtomicU64::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let (fa, fl) = (flip_at.clone(), flips.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = up.set_nodelay(true);
                let (c2, u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
                let (fa, fl, fw) = (fa.clone(), fl.clone(), forwarded.clone());
                std::thread::spawn(move || pump(client, up, Some((fa, fl, fw))));
                std::thread::spawn(move || pump(u2, c2, None));
            }
        });
        Flipper {
            addr,
            flip_at,
            flips,
        }
    }
}

type FlipState = (Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>);

fn pump(mut from: TcpStream, mut to: TcpStream, flip: Option<FlipState>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(_) => break,
        };
        if let Some((at, flips, total)) = &flip {
            let before = total.fetch_add(n as u64, Ordering::SeqCst);
            let at_v = at.load(Ordering::SeqCst);
            if before + n as u64 > at_v && at_v != u64::MAX {
                let i = at_v.saturating_sub(before).min(n as u64 - 1) as usize;
                if at
                    .compare_exchange(at_v, u64::MAX, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    buf[i] ^= 0x20;
                    flips.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

#[test]
fn a_flipped_byte_is_a_tls_error_and_a_link_failure() {
    let (g, acceptor) = tls_acceptor();
    let flipper = Flipper::start(acceptor.local_addr().unwrap());
    let dest = std::thread::spawn(move || {
        let mut s = acceptor.accept().unwrap();
        s.main
            .reader
            .read("reading the corrupted frame")
            .map(|_| ())
            .unwrap_err()
    });
    let client = client_tls(&g);
    let mut s = transport::connect_with(
        flipper.addr,
        transport::ClientSecurity {
            tls: Some(&client),
            ..Default::default()
        },
        &timeouts(),
    )
    .unwrap();
    // Flip a bit in the middle of the next record.
    flipper.flip_at.store(0, Ordering::SeqCst);
    s.main
        .send(&Message::RoundEnd { pages: 7, round: 1 }, "sending")
        .unwrap();
    let e = dest.join().unwrap();
    assert_eq!(flipper.flips.load(Ordering::SeqCst), 1);
    println!("destination: {e}");
    assert!(e.is_link_failure(), "{e:?}");
    assert!(
        e.to_string().contains("TLS") && e.to_string().contains("corrupted"),
        "{e}"
    );
}

#[test]
fn an_injected_record_is_refused_and_the_sender_is_told_why() {
    let (g, acceptor) = tls_acceptor();
    let addr = acceptor.local_addr().unwrap();
    let (told, hold) = std::sync::mpsc::channel::<()>();
    let dest = std::thread::spawn(move || {
        let mut s = acceptor.accept().unwrap();
        let e = s
            .main
            .reader
            .read("reading the injected record")
            .map(|_| ())
            .unwrap_err();
        // Keep the connection until the source has read the alert.
        let _ = hold.recv();
        e
    });
    let client = client_tls(&g);
    let mut s = transport::connect_with(
        addr,
        transport::ClientSecurity {
            tls: Some(&client),
            ..Default::default()
        },
        &timeouts(),
    )
    .unwrap();
    // A record of the right form that no key of this session sealed, written past TLS.
    let mut raw = s.main.writer.get_ref().try_clone().unwrap();
    let mut record = vec![23u8, 3, 3, 0, 64];
    record.extend((0..64).map(|i| i as u8));
    raw.write_all(&record).unwrap();
    // The destination's alert arrives on the source's channel.
    let src = s
        .main
        .reader
        .read("reading the destination's alert")
        .map(|_| ())
        .unwrap_err()
        .to_string();
    let _ = told.send(());
    let dst = dest.join().unwrap().to_string();
    println!("destination: {dst}\nsource: {src}");
    assert!(dst.contains("failed authentication"), "{dst}");
    assert!(src.contains("corrupted"), "{src}");
}

#[test]
fn postcopy_over_tls_recovers_from_a_flipped_byte() {
    let g = certs(&["127.0.0.1"]);
    let (l, addr) = tls_listener(Some(server_tls(&g)), None);
    let dest = spawn_destination(l, false);
    let flipper = Flipper::start(addr);
    // Well into the bulk push (postcopy sends State and PostcopyStart first).
    flipper.flip_at.store(12 * MIB, Ordering::SeqCst);
    let src = TestSource::new(LAYOUT_128M);
    let summary = source::migrate(
        &src,
        flipper.addr,
        tls_options(Mode::Postcopy, Some(client_tls(&g)), None),
        &|_| {},
    )
    .unwrap();
    assert_eq!(
        flipper.flips.load(Ordering::SeqCst),
        1,
        "no byte was flipped"
    );
    assert_recovered(&src, &summary, dest, 1);
}

//! Protocol tests over real TCP on loopback with real threads. The "VM" on each side is plain
//! memory this test allocates (the guest RAM analogue); a writer thread plays the guest on the
//! source and records its own writes as the dirty log, and fault threads play the vCPUs on the
//! destination during postcopy.

include!("support/harness.rs");

fn full_migration(mode: Mode, guest_runs: bool) {
    let (l, addr) = listener(Some(secret(1)));
    let dest = spawn_destination(l, false);
    let src = TestSource::new(LAYOUT_64M);
    if guest_runs {
        src.run_guest(512);
    }
    let reports = Mutex::new(Vec::new());
    let summary = source::migrate(&src, addr, options(mode, Some(secret(1))), &|p| {
        reports.lock().unwrap().push(p)
    })
    .unwrap();
    let writes = src.stop_guest();
    let (mem, state, recv) = dest.join().unwrap().unwrap();
    println!(
        "{mode:?}: guest writes {writes}; {}",
        serde_json::to_string(&summary).unwrap()
    );
    println!("destination: {}", serde_json::to_string(&recv).unwrap());
    assert_eq!(
        mem.first_difference(&src.mem),
        None,
        "destination memory differs from the source"
    );
    assert_eq!(state, src.state, "state blob");
    assert_eq!(src.pauses(), 1);
    assert_eq!(
        src.resumes(),
        0,
        "the source must not resume after the destination started"
    );
    src.assert_dirty_logging_off();
    let total = src.mem.layout.total_pages();
    assert_eq!(summary.destination.pages_received, total);
    if !guest_runs {
        // A quarter of the pages are zero; only urgent replies carry zero pages as data.
        assert!(
            summary.zero_pages + summary.faults_served >= total / 4,
            "zero pages went as data: {}",
            summary.zero_pages
        );
    }
    assert!(summary.zero_pages > 0);
    assert!(
        summary.bytes_sent < 64 * MIB * 2,
        "sent far more than the RAM: {}",
        summary.bytes_sent
    );
    assert!(!reports.lock().unwrap().is_empty());
    match mode {
        Mode::Precopy => {
            assert!(summary.rounds >= 1);
            assert_eq!(summary.faults_served, 0);
        }
        Mode::Postcopy | Mode::Hybrid => {
            // After a precopy, the postcopy phase may find every page already there (the
            // guest thread dirtied none in the last round) and fault on none.
            if mode == Mode::Postcopy {
                assert!(summary.faults_served > 0, "no urgent request was served");
            }
            assert_eq!(summary.faults_served, recv.stats.urgent_pages);
            assert_eq!(summary.collapses, 3, "collapses reported in Done");
            assert!(summary.pages_pushed > 0);
        }
    }
}

#[test]
fn precopy_64mib_with_a_running_guest() {
    full_migration(Mode::Precopy, true);
}

#[test]
fn postcopy_64mib_with_faults() {
    full_migration(Mode::Postcopy, false);
}

#[test]
fn hybrid_64mib_with_a_running_guest() {
    full_migration(Mode::Hybrid, true);
}

#[test]
fn wrong_secret_fails_on_both_sides() {
    let (l, addr) = listener(Some(secret(1)));
    let dest = spawn_destination(l, false);
    let src = TestSource::new(&[(0, 0, MIB)]);
    let err =
        source::migrate(&src, addr, options(Mode::Precopy, Some(secret(2))), &|_| {}).unwrap_err();
    let derr = dest
        .join()
        .unwrap()
        .err()
        .expect("destination accepted a wrong secret");
    assert!(
        err.to_string().contains("authentication failed"),
        "source: {err}"
    );
    assert!(
        derr.to_string().contains("authentication failed"),
        "destination: {derr}"
    );
    assert_eq!(src.pauses(), 0);
}

#[test]
fn missing_secret_on_one_side_fails_authentication() {
    let (l, addr) = listener(Some(secret(1)));
    let dest = spawn_destination(l, false);
    let src = TestSource::new(&[(0, 0, MIB)]);
    let err = source::migrate(&src, addr, options(Mode::Postcopy, None), &|_| {}).unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
    assert!(dest
        .join()
        .unwrap()
        .err()
        .unwrap()
        .to_string()
        .contains("authentication failed"));
}

#[test]
fn no_secret_refuses_non_loopback() {
    let e = destination::listen("0.0.0.0:0".parse().unwrap(), None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("without a shared secret"), "{e}");
    let src = TestSource::new(&[(0, 0, MIB)]);
    let e = source::migrate(
        &src,
        "192.0.2.1:4444".parse().unwrap(),
        options(Mode::Precopy, None),
        &|_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("without a shared secret"), "{e}");
}

#[test]
fn garbage_instead_of_hello_is_rejected() {
    let (l, addr) = listener(None);
    let dest = spawn_destination(l, false);
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let e = dest.join().unwrap().err().unwrap();
    assert!(e.to_string().contains("bad frame magic"), "{e}");
}

#[test]
fn a_huge_frame_before_authentication_is_refused_without_allocating_it() {
    let (l, addr) = listener(None);
    let dest = spawn_destination(l, false);
    let mut s = TcpStream::connect(addr).unwrap();
    // A State header announcing 64 MiB, as the very first frame: nothing may be sized for it
    // before the peer authenticated.
    let h = wire::FrameHeader {
        magic: zerocopy::little_endian::U32::new(wire::MAGIC),
        version: zerocopy::little_endian::U16::new(wire::VERSION),
        kind: zerocopy::little_endian::U16::new(wire::Kind::State as u16),
        len: zerocopy::little_endian::U32::new(wire::MAX_STATE_BYTES),
        reserved: zerocopy::little_endian::U32::new(0),
    };
    s.write_all(zerocopy::IntoBytes::as_bytes(&h)).unwrap();
    let e = dest.join().unwrap().err().unwrap();
    assert!(
        e.to_string()
            .contains(&format!("allowed 0..={}", transport::HANDSHAKE_MAX_PAYLOAD)),
        "{e}"
    );
}

#[test]
fn garbage_after_the_handshake_is_rejected() {
    let (l, addr) = listener(Some(secret(3)));
    let dest = spawn_destination(l, false);
    let s = transport::connect(addr, Some(&secret(3)), &timeouts()).unwrap();
    let mut raw = s.main.writer.get_ref().try_clone().unwrap();
    // A header with the right magic and version but an unknown kind.
    raw.write_all(&[
        b'V',
        b'M',
        b'M',
        b'G',
        wire::VERSION as u8,
        0,
        0xee,
        0x7f,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ])
    .unwrap();
    let e = dest.join().unwrap().err().unwrap();
    assert!(e.to_string().contains("unknown message kind 32750"), "{e}");
}

/// A recovery Hello (main channel, naming a session) at a destination waiting for a new
/// migration: refused, and the destination's error says what is wrong on the main channel
/// (it names a session to recover, a new migration was expected), not that an urgent channel
/// names the wrong session.
#[test]
fn a_main_hello_naming_a_session_at_a_fresh_destination_says_what_is_wrong() {
    let (l, addr) = listener(None);
    let dest = spawn_destination(l, false);
    let e = transport::reconnect(addr, 0x5a5a, None, &timeouts())
        .err()
        .expect("a recovery into no session was accepted");
    assert!(e.to_string().contains("unknown session"), "{e}");
    let e = dest.join().unwrap().err().unwrap().to_string();
    assert!(!e.contains("urgent"), "{e}");
    assert!(
        e.contains("main channel") && e.contains("0x5a5a") && e.contains("new migration"),
        "{e}"
    );
}

/// A fake source: handshake, Config, wait for Ready.
fn fake_source(addr: SocketAddr, layout: &[(u32, u64, u64)]) -> transport::Session {
    let mut s = transport::connect(addr, None, &timeouts()).unwrap();
    let layout = RamLayout::new(
        layout
            .iter()
            .map(|&(slot, gpa, size)| RegionLayout { slot, gpa, size })
            .collect(),
    )
    .unwrap();
    let config = MigrationConfig {
        mode: Mode::Precopy,
        memory_kind: Backing::Anon,
        vcpu_count: 1,
        layout,
    };
    s.main.send(&Message::Config(config), "config").unwrap();
    assert_eq!(s.main.reader.read("ready").unwrap(), Message::Ready);
    s
}

#[test]
fn truncated_stream_is_a_clear_error_and_nothing_starts() {
    let (l, addr) = listener(None);
    let started = Arc::new(AtomicBool::new(false));
    let st = started.clone();
    let dest = std::thread::spawn(move || {
        let incoming = l.accept()?;
        let vm = TestDest::new(incoming.config());
        let r = incoming.receive(&vm);
        st.store(vm.started.load(Ordering::Relaxed), Ordering::Relaxed);
        r
    });
    let s = fake_source(addr, &[(0, 0, MIB)]);
    let mut frame = Vec::new();
    wire::encode(
        &Message::Pages {
            gpa: 0,
            data: &[5u8; 8192],
        },
        &mut frame,
    );
    let mut raw = s.main.writer.get_ref().try_clone().unwrap();
    raw.write_all(&frame[..frame.len() - 100]).unwrap();
    drop(raw);
    s.main.shutdown();
    let e = dest.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("truncated frame"), "{e}");
    assert!(!started.load(Ordering::Relaxed));
}

#[test]
fn pages_outside_the_layout_are_rejected() {
    let (l, addr) = listener(None);
    let dest = spawn_destination(l, false);
    let mut s = fake_source(addr, &[(0, 0, MIB)]);
    s.main
        .send(
            &Message::Pages {
                gpa: MIB - PAGE_SIZE,
                data: &[1u8; 2 * PAGE],
            },
            "pages",
        )
        .unwrap();
    let e = dest.join().unwrap().err().unwrap();
    assert!(
        e.to_string().contains("outside the announced RAM layout"),
        "{e}"
    );
    // The source is told why.
    match s.main.reader.read("error") {
        Ok(Message::Error { message, .. }) => assert!(message.contains("outside"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn stalled_source_times_out_at_the_destination() {
    let (l, addr) = listener(None);
    let dest = spawn_destination(l, false);
    let _s = fake_source(addr, &[(0, 0, MIB)]);
    let t = Instant::now();
    let e = dest.join().unwrap().err().unwrap();
    assert!(e.to_string().contains("stalled"), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn silent_destination_times_out_the_handshake() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        std::thread::sleep(Duration::from_secs(4));
    });
    let src = TestSource::new(&[(0, 0, MIB)]);
    let t = Instant::now();
    let e = source::migrate(&src, addr, options(Mode::Precopy, None), &|_| {}).unwrap_err();
    assert!(e.to_string().contains("stalled"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(4));
    assert_eq!(src.pauses(), 0);
    peer.join().unwrap();
}

#[test]
fn destination_that_stops_reading_times_out_the_source() {
    let (acceptor, addr) = fake_destination();
    let peer = std::thread::spawn(move || {
        let mut s = accept_config(&acceptor);
        s.main.send(&Message::Ready, "ready").unwrap();
        std::thread::sleep(Duration::from_secs(6));
    });
    let src = TestSource::new(LAYOUT_64M);
    src.run_guest(1024);
    let t = Instant::now();
    let e = source::migrate(&src, addr, options(Mode::Precopy, None), &|_| {}).unwrap_err();
    src.stop_guest();
    assert!(e.to_string().contains("stalled"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(6));
    assert_eq!(src.pauses(), 0, "paused although precopy never finished");
    src.assert_dirty_logging_off();
    peer.join().unwrap();
}

#[test]
fn version_mismatch_is_reported_on_both_sides() {
    // A newer source talking to this destination.
    let (l, addr) = listener(None);
    let dest = spawn_destination(l, false);
    let mut s = TcpStream::connect(addr).unwrap();
    let mut hello = Vec::new();
    wire::encode(
        &Message::Hello {
            channel: wire::ChannelKind::Main,
            session_id: 0,
            nonce: [0; 32],
        },
        &mut hello,
    );
    let newer = wire::VERSION + 1;
    hello[4] = newer as u8;
    s.write_all(&hello).unwrap();
    let e = dest.join().unwrap().err().unwrap();
    assert!(
        e.to_string().contains(&format!(
            "version mismatch: peer speaks version {newer}, we speak {}",
            wire::VERSION
        )),
        "{e}"
    );

    // A newer destination answering this source.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 64];
        s.read_exact(&mut buf).unwrap();
        let mut reply = Vec::new();
        wire::encode(
            &Message::Challenge {
                session_id: 1,
                nonce: [0; 32],
                proof: [0; 32],
            },
            &mut reply,
        );
        reply[4] = (wire::VERSION + 1) as u8;
        s.write_all(&reply).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let src = TestSource::new(&[(0, 0, MIB)]);
    let e = source::migrate(&src, addr, options(Mode::Precopy, None), &|_| {}).unwrap_err();
    assert!(e.to_string().contains("version mismatch"), "{e}");
    peer.join().unwrap();
}

#[test]
fn failed_start_at_the_destination_resumes_the_source() {
    for mode in [Mode::Precopy, Mode::Postcopy] {
        let (l, addr) = listener(None);
        let dest = spawn_destination(l, true);
        let src = TestSource::new(&[(0, 0, 4 * MIB)]);
        let e = source::migrate(&src, addr, options(mode, None), &|_| {}).unwrap_err();
        assert!(e.to_string().contains("refuse to start"), "{mode:?}: {e}");
        assert!(!e.destination_started());
        assert_eq!(src.pauses(), 1);
        assert_eq!(src.resumes(), 1, "{mode:?}: source not resumed");
        let de = dest.join().unwrap().err().unwrap();
        assert!(de.to_string().contains("refuse to start"), "{de}");
    }
}

#[test]
fn destination_rejection_reaches_the_source() {
    let (l, addr) = listener(None);
    let dest = std::thread::spawn(move || {
        let incoming = l.accept().unwrap();
        incoming.reject("no huge pages for 64 MiB");
    });
    let src = TestSource::new(&[(0, 0, MIB)]);
    let e = source::migrate(&src, addr, options(Mode::Postcopy, None), &|_| {}).unwrap_err();
    assert!(e.to_string().contains("no huge pages"), "{e}");
    assert!(matches!(e, SourceError::Wire(_)));
    assert_eq!(src.pauses(), 0);
    dest.join().unwrap();
}

#[test]
fn page_fetch_of_a_bad_address_is_refused() {
    struct Probe(Mutex<Option<Arc<dyn PageFetcher>>>);
    impl DestinationVm for Probe {
        fn write_pages(&self, _: u64, _: &[u8]) -> Result<(), migration::types::HookError> {
            Ok(())
        }
        fn load_state(&self, _: &[u8]) -> Result<(), migration::types::HookError> {
            Ok(())
        }
        fn begin_postcopy(
            &self,
            f: Arc<dyn PageFetcher>,
            _: &PageSet,
        ) -> Result<Arc<dyn PostcopySink>, migration::types::HookError> {
            let mut buf = [0u8; PAGE];
            assert!(matches!(
                f.fetch(0x123, &mut buf),
                Err(FetchError::BadAddress { gpa: 0x123 })
            ));
            assert!(matches!(
                f.fetch(1 << 40, &mut buf),
                Err(FetchError::BadAddress { .. })
            ));
            *self.0.lock().unwrap() = Some(f);
            Err("probe done".into())
        }
        fn start(&self) -> Result<(), migration::types::HookError> {
            Ok(())
        }
    }
    let (l, addr) = listener(None);
    let dest = std::thread::spawn(move || {
        let incoming = l.accept().unwrap();
        let probe = Probe(Mutex::new(None));
        let e = incoming.receive(&probe).unwrap_err();
        // After the failed set-up the fetcher reports the closed channel.
        let f = probe.0.lock().unwrap().clone().unwrap();
        let mut buf = [0u8; PAGE];
        assert!(matches!(
            f.fetch(0, &mut buf),
            Err(FetchError::Disconnected { .. })
        ));
        e
    });
    let src = TestSource::new(&[(0, 0, MIB)]);
    let e = source::migrate(&src, addr, options(Mode::Postcopy, None), &|_| {}).unwrap_err();
    assert!(e.to_string().contains("probe done"), "{e}");
    assert_eq!(src.resumes(), 1);
    assert!(dest.join().unwrap().to_string().contains("probe done"));
}

// ---- postcopy recovery: the link fails after the switchover, through a relay the test drives ----

#[test]
fn postcopy_recovers_from_three_resets_and_a_blackhole() {
    let (l, addr) = listener(Some(secret(1)));
    let dest = spawn_destination(l, false);
    let relay = relay_to(addr);
    let src = TestSource::new(LAYOUT_128M);
    let over = AtomicBool::new(false);
    let summary = std::thread::scope(|s| {
        s.spawn(|| {
            let limit = Duration::from_secs(30);
            for k in 0..3 {
                relay.reset_after_bytes(12 * MIB);
                wait_until(limit, || relay.resets() > k || over.load(Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(1));
                wait_until(limit, || {
                    relay.open_connections() >= 2 || over.load(Ordering::Relaxed)
                });
            }
            // Then a silent link: nothing forwarded, nothing reset, for three times the
            // liveness bound.
            let before = relay.forwarded().0;
            wait_until(limit, || {
                relay.forwarded().0 > before + 4 * MIB || over.load(Ordering::Relaxed)
            });
            relay.set_blackhole(true);
            std::thread::sleep(Duration::from_secs(3));
            relay.set_blackhole(false);
        });
        let r = source::migrate(
            &src,
            relay.addr(),
            options(Mode::Postcopy, Some(secret(1))),
            &|_| {},
        );
        over.store(true, Ordering::Relaxed);
        r
    })
    .unwrap();
    assert_eq!(relay.resets(), 3, "the script's resets did not all fire");
    assert_recovered(&src, &summary, dest, 4);
}

#[test]
fn hybrid_recovers_from_a_reset_in_the_push() {
    let (l, addr) = listener(None);
    let dest = spawn_destination(l, false);
    let relay = relay_to(addr);
    let src = TestSource::new(LAYOUT_64M);
    src.run_guest(2048);
    // Reset as the postcopy push begins (the destination runs the VM).
    let armed = AtomicBool::new(false);
    let summary = source::migrate(&src, relay.addr(), options(Mode::Hybrid, None), &|p| {
        if p.phase == source::Phase::Postcopy && !armed.swap(true, Ordering::Relaxed) {
            relay.reset();
        }
    });
    src.stop_guest();
    let summary = summary.unwrap();
    assert_eq!(relay.resets(), 1);
    assert_recovered(&src, &summary, dest, 1);
}

#[test]
fn a_link_lost_between_postcopy_start_and_started_is_settled_by_recovery() {
    let (l, addr) = listener(None);
    let relay = Arc::new(relay_to(addr));
    let r = relay.clone();
    // The destination starts the VM while the link is cut: the source cannot know whether it
    // started until it asks.
    let hook: StartHook = Box::new(move || {
        r.set_refuse(true);
        r.reset();
        std::thread::sleep(Duration::from_millis(1500));
        r.set_refuse(false);
    });
    let dest = spawn_destination_with(l, false, None, Some(hook));
    let src = TestSource::new(&[(0, 0, 16 * MIB)]);
    let summary =
        source::migrate(&src, relay.addr(), options(Mode::Postcopy, None), &|_| {}).unwrap();
    assert_recovered(&src, &summary, dest, 1);
}

#[test]
fn a_link_that_never_returns_loses_the_vm_on_both_sides() {
    let mut t = timeouts();
    t.recover = Duration::from_secs(3);
    let l = destination::listen_with("127.0.0.1:0".parse().unwrap(), None, t).unwrap();
    let addr = l.local_addr().unwrap();
    let dest = spawn_destination(l, false);
    let relay = relay_to(addr);
    let src = TestSource::new(LAYOUT_64M);
    relay.reset_after_bytes(8 * MIB);
    let cut = std::thread::scope(|s| {
        let h = s.spawn(|| {
            wait_until(Duration::from_secs(20), || relay.resets() > 0);
            relay.set_refuse(true);
            relay.reset();
        });
        let mut o = options(Mode::Postcopy, None);
        o.timeouts.recover = Duration::from_secs(3);
        let start = Instant::now();
        let e = source::migrate(&src, relay.addr(), o, &|_| {}).unwrap_err();
        h.join().unwrap();
        (e, start.elapsed())
    });
    let (e, took) = cut;
    assert!(e.destination_started(), "{e}");
    assert!(e.to_string().contains("VM lost"), "{e}");
    assert!(e.to_string().contains("did not come back"), "{e}");
    assert!(took < Duration::from_secs(20), "gave up after {took:?}");
    assert_eq!(src.resumes(), 0, "a stale copy resumed");
    let de = dest
        .join()
        .unwrap()
        .err()
        .expect("the destination must fail");
    assert!(de.to_string().contains("VM lost"), "{de}");
}

#[test]
fn strangers_are_refused_while_paused_and_the_source_still_recovers() {
    let (l, addr) = listener(Some(secret(1)));
    let (tx, rx) = std::sync::mpsc::channel();
    let dest = spawn_destination_with(l, false, Some(tx), None);
    let relay = relay_to(addr);
    let src = TestSource::new(LAYOUT_64M);
    relay.reset_after_bytes(8 * MIB);
    let summary = std::thread::scope(|s| {
        let relay = &relay;
        s.spawn(move || {
            let session = rx.recv().unwrap();
            assert!(wait_until(Duration::from_secs(20), || relay.resets() > 0));
            relay.set_refuse(true);
            relay.reset();
            std::thread::sleep(Duration::from_millis(1200)); // the destination notices
            let t = timeouts();
            // Garbage.
            let mut g = TcpStream::connect(addr).unwrap();
            g.write_all(&[0xab; 64]).unwrap();
            let mut buf = [0u8; 256];
            g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = g.read(&mut buf);
            drop(g);
            // A new migration.
            let e = transport::connect(addr, Some(&secret(1)), &t)
                .err()
                .unwrap();
            assert!(e.to_string().contains("busy"), "{e}");
            // Another session.
            let e = transport::reconnect(addr, session ^ 0x5a5a, Some(&secret(1)), &t)
                .err()
                .unwrap();
            assert!(e.to_string().contains("unknown session"), "{e}");
            // This session, the wrong secret.
            let e = transport::reconnect(addr, session, Some(&secret(2)), &t)
                .err()
                .unwrap();
            assert!(e.to_string().contains("authentication failed"), "{e}");
            relay.set_refuse(false);
        });
        source::migrate(
            &src,
            relay.addr(),
            options(Mode::Postcopy, Some(secret(1))),
            &|_| {},
        )
    })
    .unwrap();
    assert_recovered(&src, &summary, dest, 1);
}

// ---- a destination that speaks out of turn before the switchover ----

/// A fake destination's acceptor on 127.0.0.1 (any port), and its address.
fn fake_destination() -> (Acceptor, SocketAddr) {
    let acceptor = Acceptor::bind("127.0.0.1:0".parse().unwrap(), None, timeouts()).unwrap();
    let addr = acceptor.local_addr().unwrap();
    (acceptor, addr)
}

/// Accepts the source's session and reads its first frame, which must be the Config.
fn accept_config(acceptor: &Acceptor) -> transport::Session {
    let mut s = acceptor.accept().unwrap();
    assert!(matches!(
        s.main.reader.read("config").unwrap(),
        Message::Config(_)
    ));
    s
}

/// A fake destination: reads Config, answers Ready and then `then` at once, and drains what
/// the source sends until it closes.
fn speaking_destination(then: Message<'static>) -> (SocketAddr, JoinHandle<()>) {
    let (acceptor, addr) = fake_destination();
    let peer = std::thread::spawn(move || {
        let mut s = accept_config(&acceptor);
        s.main.lift_size_limit();
        // Both frames in one write: they arrive together, as from a peer that does not wait.
        let mut bytes = Vec::new();
        wire::encode(&Message::Ready, &mut bytes);
        wire::encode(&then, &mut bytes);
        s.main.writer.get_ref().write_all(&bytes).unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if s.main.reader.poll("drain").is_err() {
                break;
            }
        }
    });
    (addr, peer)
}

#[test]
fn an_error_right_after_ready_fails_precopy_before_the_pause() {
    let (addr, peer) = speaking_destination(Message::Error {
        code: wire::ErrorCode::Rejected,
        message: "test: out of memory".into(),
    });
    let src = TestSource::new(LAYOUT_128M);
    src.run_guest(1024);
    let e = source::migrate(&src, addr, options(Mode::Precopy, None), &|_| {}).unwrap_err();
    src.stop_guest();
    assert!(e.to_string().contains("out of memory"), "{e}");
    assert_eq!(
        src.pauses(),
        0,
        "the source paused although the destination had given up"
    );
    peer.join().unwrap();
}

/// A hostile destination that follows the protocol up to State, then runs `act` (which may read
/// on), and returns the text of the Error the source sends it, if any.
fn destination_turning_at_state(
    act: fn(&mut transport::Session),
) -> (SocketAddr, JoinHandle<Option<String>>) {
    let (acceptor, addr) = fake_destination();
    let peer = std::thread::spawn(move || {
        let mut s = accept_config(&acceptor);
        s.main.lift_size_limit();
        s.main.send(&Message::Ready, "ready").unwrap();
        loop {
            match s.main.reader.read("stream").unwrap() {
                Message::State(_) => break,
                Message::Pages { .. } | Message::ZeroPages { .. } | Message::RoundEnd { .. } => {}
                other => panic!("unexpected {other:?} before State"),
            }
        }
        act(&mut s);
        // The source answers with an Error naming the refusal, then closes.
        let t = Instant::now();
        let mut said = None;
        while t.elapsed() < Duration::from_secs(10) {
            match s.main.reader.poll("drain") {
                Ok(Some(Message::Error { message, .. })) => said = Some(message),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        said
    });
    (addr, peer)
}

/// A hostile destination that answers State with a Started of its own, before PostcopyStart
/// reached it (it cannot know the switchover nonce yet): the source refuses that Started,
/// says why, and runs the VM again.
#[test]
fn a_started_written_before_postcopy_start_is_refused_and_the_vm_runs_again() {
    let (addr, peer) = destination_turning_at_state(|s| {
        s.main
            .send(&Message::Started { nonce: 0x1234_5678 }, "early Started")
            .unwrap();
        let nonce = match s.main.reader.read("switchover").unwrap() {
            Message::PostcopyStart { nonce } => nonce,
            other => panic!("expected PostcopyStart, got {other:?}"),
        };
        assert_ne!(nonce, 0x1234_5678);
    });
    let src = TestSource::new(&[(0, 0, 4 * MIB)]);
    let e = source::migrate(&src, addr, options(Mode::Postcopy, None), &|_| {}).unwrap_err();
    assert!(
        matches!(
            e,
            source::SourceError::EarlyStarted {
                got: 0x1234_5678,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("not written in answer"), "{e}");
    assert!(!e.destination_started() && !e.keeps_paused(), "{e}");
    // It got as far as the pause, and the VM runs again.
    assert_eq!(src.pauses(), 1);
    assert_eq!(src.resumes(), 1);
    let said = peer.join().unwrap();
    assert!(
        said.as_deref()
            .is_some_and(|m| m.contains("switchover nonce")),
        "{said:?}"
    );
}

/// A hostile destination that sends an unaligned PageRequest on the urgent channel after
/// PostcopyStart, before Started: the source's urgent server reports the malformed request, the
/// migration fails naming it (not as a lost link left to recovery), and the VM runs again.
#[test]
fn an_unaligned_page_request_before_started_fails_the_migration() {
    let (addr, peer) = destination_turning_at_state(|s| {
        assert!(matches!(
            s.main.reader.read("switchover").unwrap(),
            Message::PostcopyStart { .. }
        ));
        s.urgent
            .send(
                &Message::PageRequest { id: 1, gpa: 0x1001 },
                "a bad request",
            )
            .unwrap();
    });
    let src = TestSource::new(&[(0, 0, 4 * MIB)]);
    let e = source::migrate(&src, addr, options(Mode::Postcopy, None), &|_| {}).unwrap_err();
    // Reported as the destination's protocol violation: not a link failure that would pause
    // the migration for recovery (and end as an unknown outcome, the VM kept paused).
    let text = e.to_string();
    assert!(
        text.contains("PageRequest") && text.contains("0x1001"),
        "{text}"
    );
    assert!(!e.destination_started() && !e.keeps_paused(), "{e}");
    assert_eq!(src.pauses(), 1);
    assert_eq!(src.resumes(), 1);
    peer.join().unwrap();
}

#[test]
fn a_started_before_any_switchover_frame_is_refused() {
    let (addr, peer) = speaking_destination(Message::Started { nonce: 1 });
    let src = TestSource::new(&[(0, 0, 4 * MIB)]);
    let e = source::migrate(&src, addr, options(Mode::Postcopy, None), &|_| {}).unwrap_err();
    assert!(e.to_string().contains("Started"), "{e}");
    assert!(!e.destination_started(), "{e}");
    assert_eq!(src.resumes(), src.pauses());
    peer.join().unwrap();
}

// ---- a destination that goes silent after the switchover frame ----

/// A hostile destination reads State and the switchover frame, then sends nothing more (no
/// Started, no heartbeat) and keeps the connection open. The source must not wait out the
/// setup timeout paused: the liveness bound (1 s) ends the wait, and since the destination
/// may have started the VM, the source does not resume but recovers; when no recovery
/// succeeds before the recover timeout, the outcome is unknown and the VM stays paused.
fn a_destination_silent_after_the_switchover_frame(mode: Mode) {
    let (addr, peer) = destination_turning_at_state(|s| loop {
        match s.main.reader.read("switchover").unwrap() {
            Message::PostcopyStart { .. } | Message::Switchover { .. } => break,
            Message::Complete { .. } => {}
            other => panic!("expected the switchover frame, got {other:?}"),
        }
    });
    let src = TestSource::new(&[(0, 0, 4 * MIB)]);
    let mut o = options(mode, None);
    // A Started may legitimately take this long; silence may not.
    o.timeouts.setup = Duration::from_secs(60);
    o.timeouts.recover = Duration::from_secs(2);
    let phases = Mutex::new(Vec::new());
    let t = Instant::now();
    let e = source::migrate(&src, addr, o, &|p| {
        phases.lock().unwrap().push((p.phase, Instant::now()))
    })
    .unwrap_err();
    let took = t.elapsed();
    let phases = phases.into_inner().unwrap();
    let at = |want: source::Phase| {
        phases
            .iter()
            .find(|(p, _)| *p == want)
            .map(|&(_, t)| t)
            .unwrap_or_else(|| panic!("no {want:?} phase in {phases:?}"))
    };
    let blackout = at(source::Phase::PostcopyPaused) - at(source::Phase::Switchover);
    println!("{e}\nsilence noticed {blackout:?} after the pause; migrate returned after {took:?}");
    assert!(
        blackout < Duration::from_secs(3),
        "the source stayed paused {blackout:?} before it noticed the silence"
    );
    assert!(took < Duration::from_secs(30), "migrate took {took:?}");
    // Recovery was tried and timed out; the outcome is unknown, so the VM stays paused.
    match &e {
        SourceError::OutcomeUnknown(inner) => assert!(
            matches!(**inner, SourceError::RecoverTimeout { attempts, .. } if attempts >= 1),
            "{inner:?}"
        ),
        other => panic!("expected OutcomeUnknown, got {other:?}"),
    }
    assert!(e.keeps_paused() && !e.destination_started(), "{e}");
    assert!(e.to_string().contains("the VM stays paused here"), "{e}");
    assert_eq!(src.pauses(), 1);
    assert_eq!(
        src.resumes(),
        0,
        "resumed although the destination may run the VM"
    );
    peer.join().unwrap();
}

#[test]
fn a_destination_silent_after_postcopy_start_pauses_the_source_about_a_second() {
    a_destination_silent_after_the_switchover_frame(Mode::Postcopy);
}

#[test]
fn a_destination_silent_after_switchover_pauses_the_source_about_a_second() {
    a_destination_silent_after_the_switchover_frame(Mode::Precopy);
}

/// The urgent channel's sockets ask for interactive priority on both ends (so a priority-aware
/// qdisc sends a page reply ahead of queued bulk pages); the main channel keeps the default.
#[test]
fn the_urgent_channel_asks_for_interactive_priority_on_both_ends() {
    use nix::sys::socket::{getsockopt, sockopt::Priority};
    let acceptor =
        transport::Acceptor::bind("127.0.0.1:0".parse().unwrap(), None, timeouts()).unwrap();
    let addr = acceptor.local_addr().unwrap();
    let dest = std::thread::spawn(move || acceptor.accept().unwrap());
    let src = transport::connect(addr, None, &timeouts()).unwrap();
    let dst = dest.join().unwrap();
    for (side, s) in [("source", &src), ("destination", &dst)] {
        let prio = |ch: &transport::Channel| getsockopt(&ch.stream_handle().unwrap(), Priority);
        assert_eq!(prio(&s.urgent).unwrap(), 6, "{side} urgent channel");
        assert_eq!(prio(&s.main).unwrap(), 0, "{side} main channel");
    }
}

//! Hostile input against a running receiver: clients without a
//! certificate or speaking TLS 1.2, connections that trickle their
//! handshake, a thousand idle connections, protocol abuse (huge frames,
//! replayed sequence numbers, writes past the disk's end, disk ids that
//! are paths), an agent registering ten thousand disks, one that never
//! reads what it asked for, and configuration mistakes in both daemons.
//! Each is refused with a logged reason, the receiver's memory stays
//! bounded, and another agent goes on replicating. Real TLS on 127.0.0.1;
//! only the real-agent test needs root and loop devices.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tidemark_common::proto::messages::Extent;
use tidemark_common::proto::{ErrorCode, Message, SumKind};
use tidemark_common::tls::server_name;
use tidemark_tests::raw::{self, register, register_msg, Stream};
use tidemark_tests::site::{agent_sync, assert_fails_with, path, point_id, receiver_cmd, Site};
use tidemark_tests::{fill_mixed, free_port, workspace_bin, LoopDev, SplitMix64};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the receiver may hold at its peak, whatever the abuse.
const RSS_LIMIT_MIB: u64 = 200;
/// The receiver's handshake limit (TLS, preamble and hello), with room for
/// a loaded machine.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
const HANDSHAKE_SLACK: Duration = Duration::from_secs(3);

/// The next message that is not an ack must be this error; then the
/// receiver closes the connection.
async fn refused(s: &mut Stream, want: ErrorCode, needles: &[&str]) -> anyhow::Result<String> {
    let message = loop {
        match raw::recv(s).await? {
            Some(Message::Ack { .. }) => continue,
            Some(Message::Error { code, message }) => {
                ensure!(code == want, "expected {want:?}, got {code:?}: {message}");
                break message;
            }
            other => bail!("expected {want:?}, got {other:?}"),
        }
    };
    for n in needles {
        ensure!(message.contains(n), "{message:?} lacks {n:?}");
    }
    ensure!(
        raw::recv(s).await.map_or(true, |m| m.is_none()),
        "the connection stayed open after the error"
    );
    Ok(message)
}

/// The receiver's peak resident memory (VmHWM), MiB.
fn peak_rss_mib(site: &Site) -> anyhow::Result<u64> {
    status_mib(site, "VmHWM:")
}

/// A memory figure of the receiver from /proc/PID/status, MiB.
fn status_mib(site: &Site, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", site.receiver.pid()))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .with_context(|| format!("no {field}"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib >> 10)
}

fn assert_bounded(site: &Site) -> anyhow::Result<u64> {
    let peak = peak_rss_mib(site)?;
    ensure!(
        peak < RSS_LIMIT_MIB,
        "receiver peaked at {peak} MiB resident (limit {RSS_LIMIT_MIB} MiB)"
    );
    Ok(peak)
}

/// Open descriptors of the receiver.
fn receiver_fds(site: &Site) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{}/fd", site.receiver.pid()))?.count())
}

/// The receiver logs a session's end after the agent was told, so give
/// it a moment.
fn assert_logged(site: &Site, needle: &str) {
    if let Err(e) = site.receiver.wait_for_log(needle, Duration::from_secs(10)) {
        panic!("{e:#}");
    }
}

/// Another agent replicates: writes data into `disk` (registered anew if
/// `new`), takes a point, and the export equals what it wrote.
async fn still_replicates(site: &Site, name: &str, disk: &str) -> anyhow::Result<()> {
    const SIZE: u64 = 1 << 20;
    let dir = match site.dir.path().join(name) {
        d if d.is_dir() => d,
        _ => site.agent_dir(name)?,
    };
    let mut s = raw::hello(site.addr, &dir, name).await?;
    let handle = register(&mut s, disk, SIZE).await?;
    let mut rng = SplitMix64::new(SIZE ^ name.len() as u64);
    let mut data = vec![0u8; 96 << 10];
    data.chunks_mut(8)
        .for_each(|c| c.copy_from_slice(&rng.next_u64().to_le_bytes()));
    raw::send(
        &mut s,
        &Message::Extent(Extent::pack(1, handle, 8192, &data, SumKind::Crc32c, None)),
    )
    .await?;
    raw::point(&mut s, 2, "after abuse")
        .await
        .with_context(|| format!("{name} could not replicate"))?;
    let mut want = site.export(disk, "latest")?;
    ensure!(want.len() as u64 == SIZE, "export is {} bytes", want.len());
    ensure!(
        want[8192..8192 + data.len()] == data[..],
        "export lacks the data"
    );
    want[8192..8192 + data.len()].fill(0);
    ensure!(want.iter().all(|&b| b == 0), "export has stray data");
    Ok(())
}

/// Every path under the site's image and retention directories.
fn stored_paths(site: &Site) -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, out: &mut BTreeSet<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            }
            out.insert(p);
        }
    }
    let mut out = BTreeSet::new();
    walk(&site.dir.path().join("images"), &mut out);
    walk(&site.dir.path().join("retention"), &mut out);
    out
}

fn roots(ca: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Connects with `config` and tries to get past the preamble: Ok only if
/// the receiver answers it.
async fn try_session(site: &Site, config: rustls::ClientConfig) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(site.addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name("tidemark-receiver")?, tcp)
        .await?;
    tls.write_all(&tidemark_common::proto::handshake::agent_preamble())
        .await?;
    tls.flush().await?;
    let mut reply = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut reply)).await??;
    Ok(())
}

#[test]
fn clients_without_a_certificate_or_tls13_are_refused() -> anyhow::Result<()> {
    let site = Site::start_network_only(&[])?;
    let dir = site.agent_dir("agent-t")?;
    let roots = roots(&dir.join("ca.pem"))?;
    raw::block_on(async {
        // No client certificate: the receiver requires one.
        let no_cert = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let err = try_session(&site, no_cert)
            .await
            .expect_err("a client without a certificate got a session");
        eprintln!("no certificate: {err:#}");

        // A valid agent certificate, but only TLS 1.2: the receiver speaks
        // TLS 1.3 only, and says so with a protocol_version alert.
        let certs =
            CertificateDer::pem_file_iter(dir.join("agent.pem"))?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(dir.join("agent-key.pem"))?;
        let tls12 = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(certs, key)?;
        let err = try_session(&site, tls12)
            .await
            .expect_err("a TLS 1.2 client got a session");
        assert!(
            format!("{err:#}").contains("ProtocolVersion"),
            "TLS 1.2 was not refused as a version: {err:#}"
        );
        Ok::<_, anyhow::Error>(())
    })?;
    // Both are logged once the receiver has seen them through.
    site.receiver
        .wait_for_log("peer sent no certificates", Duration::from_secs(5))?;
    site.receiver
        .wait_for_log("TLS1.3 not offered", Duration::from_secs(5))
        .or_else(|_| {
            site.receiver
                .wait_for_log("ProtocolVersion", Duration::from_secs(1))
        })
        .or_else(|_| {
            site.receiver
                .wait_for_log("incompatible", Duration::from_secs(1))
        })?;
    raw::block_on(still_replicates(&site, "agent-ok", "disk-ok"))?;
    assert_bounded(&site)?;
    Ok(())
}

/// The bytes a TLS client sends first (its ClientHello), made by rustls.
fn client_hello(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&dir.join("ca.pem"))?)
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), server_name("tidemark-receiver")?)?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

/// Sends `bytes` one at a time, `gap` apart, on plain TCP; returns how
/// long after connecting the receiver closed the connection.
fn trickle_tcp(site: &Site, bytes: &[u8], gap: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect(site.addr)?;
    s.set_read_timeout(Some(gap))?;
    let mut buf = [0u8; 4096];
    for b in bytes.iter().cycle() {
        if s.write_all(&[*b]).is_err() {
            return Ok(started.elapsed());
        }
        match s.read(&mut buf) {
            Ok(0) => return Ok(started.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Ok(started.elapsed()),
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "a trickling connection was held for a minute"
        );
    }
    unreachable!("cycle never ends")
}

/// Completes TLS at once, then trickles the preamble and a hello, each
/// part inside the old per-part limit; returns when the receiver closed.
async fn trickle_after_tls(site: &Site, dir: &Path, gap: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let files = tidemark_common::tls::TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("agent.pem"),
        key: dir.join("agent-key.pem"),
    };
    let connector = tokio_rustls::TlsConnector::from(tidemark_common::tls::client_config(&files)?);
    let tcp = tokio::net::TcpStream::connect(site.addr).await?;
    let mut tls = connector
        .connect(server_name("tidemark-receiver")?, tcp)
        .await?;
    let mut bytes = tidemark_common::proto::handshake::agent_preamble().to_vec();
    Message::Hello {
        agent_name: "agent-s".into(),
        software_version: "slow".into(),
    }
    .encode_frame(&mut bytes);
    let mut buf = [0u8; 4096];
    for b in bytes.iter().cycle() {
        if tls.write_all(&[*b]).await.is_err() || tls.flush().await.is_err() {
            return Ok(started.elapsed());
        }
        match tokio::time::timeout(gap, tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(started.elapsed()),
            Ok(Ok(_)) | Err(_) => {}
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "a trickling session was held for a minute"
        );
    }
    unreachable!("cycle never ends")
}

#[test]
fn trickled_handshakes_are_dropped_within_the_handshake_limit() -> anyhow::Result<()> {
    let site = Site::start_network_only(&[])?;
    let dir = site.agent_dir("agent-s")?;
    let hello_bytes = client_hello(&dir)?;
    let gap = Duration::from_millis(700);
    let (tcp_held, tls_held) = std::thread::scope(|scope| {
        let tcp = scope.spawn(|| trickle_tcp(&site, &hello_bytes, gap));
        let tls = raw::block_on(trickle_after_tls(&site, &dir, gap));
        (tcp.join().expect("trickle thread"), tls)
    });
    let (tcp_held, tls_held) = (tcp_held?, tls_held?);
    eprintln!("ClientHello trickle held {tcp_held:?}, preamble+hello trickle held {tls_held:?}");
    for held in [tcp_held, tls_held] {
        assert!(
            held >= HANDSHAKE_LIMIT - Duration::from_secs(1),
            "closed after {held:?}: too early"
        );
        assert!(
            held < HANDSHAKE_LIMIT + HANDSHAKE_SLACK,
            "held for {held:?}: TLS, preamble and hello share one {HANDSHAKE_LIMIT:?} limit"
        );
    }
    // The receiver closes the connection, then logs why: give the second
    // line a moment to land.
    let needle = "TLS handshake, preamble and hello not done within 10s";
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut log = site.receiver.log();
    while log.matches(needle).count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        log = site.receiver.log();
    }
    assert_eq!(
        log.matches(needle).count(),
        2,
        "both trickles are logged:\n{log}"
    );
    assert!(!log.contains("agent agent-s connected"), "{log}");
    raw::block_on(still_replicates(&site, "agent-ok", "disk-ok"))?;
    assert_bounded(&site)?;
    Ok(())
}

#[test]
fn protocol_abuse_is_refused_by_name_and_stores_nothing() -> anyhow::Result<()> {
    let site = Site::start_network_only(&[])?;
    let dir = site.agent_dir("agent-p")?;
    raw::block_on(async {
        // A 4 GiB frame length where the hello should be.
        let mut s = raw::connect(site.addr, &dir).await?;
        s.write_all(&[0xff, 0xff, 0xff, 0xff, 1]).await?;
        s.flush().await?;
        refused(&mut s, ErrorCode::Protocol, &["4294967295", "exceeds"]).await?;

        // Sequence numbers replayed, going backwards, or starting at 0.
        let mut s = raw::hello(site.addr, &dir, "agent-p").await?;
        let h = register(&mut s, "disk-p", 1 << 20).await?;
        let zero = |seq, offset_bytes| Message::Zero {
            seq,
            disk: h,
            offset_bytes,
            len_bytes: 4096,
        };
        raw::send(&mut s, &zero(1, 0)).await?;
        raw::send(&mut s, &zero(1, 4096)).await?;
        refused(
            &mut s,
            ErrorCode::Protocol,
            &["sequence number 1 does not follow 1"],
        )
        .await?;
        let mut s = raw::hello(site.addr, &dir, "agent-p").await?;
        let h = register(&mut s, "disk-p", 1 << 20).await?;
        raw::send(
            &mut s,
            &Message::Zero {
                seq: 9,
                disk: h,
                offset_bytes: 0,
                len_bytes: 512,
            },
        )
        .await?;
        raw::send(
            &mut s,
            &Message::Zero {
                seq: 4,
                disk: h,
                offset_bytes: 0,
                len_bytes: 512,
            },
        )
        .await?;
        refused(
            &mut s,
            ErrorCode::Protocol,
            &["sequence number 4 does not follow 9"],
        )
        .await?;
        let mut s = raw::hello(site.addr, &dir, "agent-p").await?;
        let h = register(&mut s, "disk-p", 1 << 20).await?;
        raw::send(
            &mut s,
            &Message::Zero {
                seq: 0,
                disk: h,
                offset_bytes: 0,
                len_bytes: 512,
            },
        )
        .await?;
        refused(&mut s, ErrorCode::Protocol, &["sequence number 0"]).await?;

        // Writes past the end of the disk, by a little and by overflow, and
        // a handle never registered.
        let mut s = raw::hello(site.addr, &dir, "agent-p").await?;
        let h = register(&mut s, "disk-p", 1 << 20).await?;
        let e = Extent::pack(1, h, (1 << 20) - 2048, &[0x5a; 4096], SumKind::Blake3, None);
        raw::send(&mut s, &Message::Extent(e)).await?;
        refused(
            &mut s,
            ErrorCode::OutOfRange,
            &["beyond the end of disk disk-p"],
        )
        .await?;
        let mut s = raw::hello(site.addr, &dir, "agent-p").await?;
        let h = register(&mut s, "disk-p", 1 << 20).await?;
        raw::send(
            &mut s,
            &Message::Zero {
                seq: 1,
                disk: h,
                offset_bytes: (1 << 20) - 512,
                len_bytes: 4096,
            },
        )
        .await?;
        refused(&mut s, ErrorCode::OutOfRange, &["disk-p"]).await?;
        // An end past 2^64 is refused by the decoder, as malformed.
        let mut s = raw::hello(site.addr, &dir, "agent-p").await?;
        let h = register(&mut s, "disk-p", 1 << 20).await?;
        raw::send(
            &mut s,
            &Message::Zero {
                seq: 1,
                disk: h,
                offset_bytes: u64::MAX - 10,
                len_bytes: 100,
            },
        )
        .await?;
        refused(
            &mut s,
            ErrorCode::Protocol,
            &["zero length has invalid value 100"],
        )
        .await?;
        let mut s = raw::hello(site.addr, &dir, "agent-p").await?;
        let h = register(&mut s, "disk-p", 1 << 20).await?;
        raw::send(
            &mut s,
            &Message::HashRequest {
                seq: 1,
                disk: h,
                offset_bytes: 1 << 20,
                len_bytes: 4096,
                block_bytes: 4096,
            },
        )
        .await?;
        refused(&mut s, ErrorCode::OutOfRange, &["disk-p"]).await?;
        let mut s = raw::hello(site.addr, &dir, "agent-p").await?;
        raw::send(
            &mut s,
            &Message::Zero {
                seq: 1,
                disk: 7,
                offset_bytes: 0,
                len_bytes: 512,
            },
        )
        .await?;
        refused(&mut s, ErrorCode::UnknownDisk, &["handle 7"]).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    let image = std::fs::read(site.image("disk-p"))?;
    assert!(
        image.iter().all(|&b| b == 0),
        "refused writes reached the image"
    );

    // Disk ids that are paths, or too long: refused before anything is
    // created for them.
    let before = stored_paths(&site);
    let long = "a".repeat(200);
    let ids = [
        "../x",
        "/",
        "a/b",
        "/etc/passwd",
        "x\0y",
        ".hidden",
        "",
        &long,
    ];
    raw::block_on(async {
        for id in ids {
            let mut s = raw::hello(site.addr, &dir, "agent-p").await?;
            raw::send(&mut s, &register_msg(id, 1 << 20)).await?;
            refused(&mut s, ErrorCode::Protocol, &["is not valid"]).await?;
        }
        // Longer than any name may be (255 bytes): our encoder would cut
        // it, so the frame is made by hand.
        let mut s = raw::hello(site.addr, &dir, "agent-p").await?;
        let mut body = vec![3u8];
        body.extend_from_slice(&300u16.to_be_bytes());
        body.extend_from_slice(&[b'b'; 300]);
        body.extend_from_slice(&(1u64 << 20).to_be_bytes());
        body.extend_from_slice(&512u32.to_be_bytes());
        s.write_all(&(body.len() as u32).to_be_bytes()).await?;
        s.write_all(&body).await?;
        s.flush().await?;
        refused(
            &mut s,
            ErrorCode::Protocol,
            &["disk id has invalid value 300"],
        )
        .await?;
        Ok::<_, anyhow::Error>(())
    })?;
    assert_eq!(stored_paths(&site), before, "a refused disk id left files");
    for needle in [
        r#"refusing agent agent-p: Protocol: disk id "../x" is not valid"#,
        r#"disk id "x\0y" is not valid"#,
        r#"disk id "/" is not valid"#,
        "disk id has invalid value 300",
        "frame of 4294967295 bytes exceeds",
        "sequence number 4 does not follow 9",
        "OutOfRange: range 1046528+4096 lies beyond the end of disk disk-p",
        "UnknownDisk: disk handle 7 was never registered",
    ] {
        assert_logged(&site, needle);
    }
    raw::block_on(still_replicates(&site, "agent-ok", "disk-ok"))?;
    assert_bounded(&site)?;
    Ok(())
}

#[test]
fn ten_thousand_disks_are_refused_beyond_max_disks() -> anyhow::Result<()> {
    const MAX: usize = 8;
    let site = Site::start_network_only_with_config(&format!("max_disks = {MAX}"))?;
    // The healthy agent's disk exists before the flood.
    raw::block_on(still_replicates(&site, "agent-ok", "disk-ok"))?;
    let dir = site.agent_dir("agent-m")?;
    let ids: Vec<String> = (0..10_000).map(|i| format!("disk-{i:05}")).collect();
    let (registered, refusal) = raw::block_on(async {
        let s = raw::hello(site.addr, &dir, "agent-m").await?;
        let (mut rd, mut wr) = tokio::io::split(s);
        let flood = {
            let ids = ids.clone();
            tokio::spawn(async move {
                let mut bytes = Vec::new();
                for id in &ids {
                    register_msg(id, 1 << 20).encode_frame(&mut bytes);
                }
                // The receiver hangs up part way: that is the point.
                let _ = wr.write_all(&bytes).await;
                let _ = wr.flush().await;
                wr
            })
        };
        let mut registered = 0;
        let mut buf = Vec::new();
        let refusal = loop {
            let m = tokio::time::timeout(
                Duration::from_secs(20),
                tidemark_common::proto::frame::read_message(&mut rd, &mut buf),
            )
            .await??;
            match m {
                Some(Message::DiskRegistered { .. }) => registered += 1,
                Some(Message::Error { code, message }) => {
                    assert_eq!(code, ErrorCode::Limit, "{message}");
                    break message;
                }
                other => bail!("expected registrations then a refusal, got {other:?}"),
            }
        };
        drop(flood.await?);
        // A new connection is refused its first new disk at once.
        let mut s = raw::hello(site.addr, &dir, "agent-m").await?;
        raw::send(&mut s, &register_msg("disk-09999", 1 << 20)).await?;
        refused(&mut s, ErrorCode::Limit, &["max_disks"]).await?;
        Ok::<_, anyhow::Error>((registered, refusal))
    })?;
    assert_eq!(registered, MAX - 1, "disk-ok plus these make max_disks");
    assert!(
        refusal.contains(&format!(
            "already protects {MAX} disks (max_disks = {MAX}); raise max_disks"
        )),
        "{refusal}"
    );
    assert_logged(
        &site,
        &format!(
            "refusing agent agent-m: Limit: receiver test-receiver already protects {MAX} disks"
        ),
    );
    // Nothing of the refused disks exists, on either volume.
    for p in stored_paths(&site) {
        let name = p.to_string_lossy();
        if let Some(i) = name.find("disk-0") {
            let n: usize = name[i + 5..i + 10].parse()?;
            assert!(n < MAX - 1, "{} exists for a refused disk", p.display());
        }
    }
    let status = site.status_json()?;
    assert_eq!(status["disks"].as_array().map(Vec::len), Some(MAX));
    raw::block_on(still_replicates(&site, "agent-ok", "disk-ok"))?;
    let peak = assert_bounded(&site)?;
    eprintln!("receiver peak RSS {peak} MiB");
    Ok(())
}

#[test]
fn an_agent_that_never_reads_cannot_grow_the_receiver() -> anyhow::Result<()> {
    let site = Site::start_network_only(&[])?;
    let dir = site.agent_dir("agent-n")?;
    raw::block_on(async {
        let mut s = raw::hello(site.addr, &dir, "agent-n").await?;
        let h = register(&mut s, "disk-n", 16 << 20).await?;
        // Each request is 33 bytes; each answer is 1 MiB of hashes. Before
        // replies were bounded, 400 of them queued 400 MiB.
        let mut bytes = Vec::new();
        for seq in 1..=400u64 {
            Message::HashRequest {
                seq,
                disk: h,
                offset_bytes: 0,
                len_bytes: 16 << 20,
                block_bytes: 512,
            }
            .encode_frame(&mut bytes);
        }
        // The receiver stops reading once its queues are full, so the
        // write may never finish: that is the bound working.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            s.write_all(&bytes).await?;
            s.flush().await
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Bounded, not merely slow: once the queues are full nothing grows.
        let settled = status_mib(&site, "VmRSS:")?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let later = status_mib(&site, "VmRSS:")?;
        ensure!(
            later < settled + 8,
            "the receiver grew from {settled} to {later} MiB while the agent read nothing"
        );
        let peak = assert_bounded(&site)?;
        eprintln!("receiver peak RSS with an agent not reading: {peak} MiB");
        drop(s);
        Ok::<_, anyhow::Error>(())
    })?;
    raw::block_on(still_replicates(&site, "agent-ok", "disk-ok"))?;
    // The hung-up session ends rather than waiting on its replies.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ![
        "session with agent agent-n ended",
        "agent agent-n disconnected",
    ]
    .iter()
    .any(|n| site.receiver.log().contains(n))
    {
        ensure!(
            Instant::now() < deadline,
            "agent-n's session did not end: {}",
            site.receiver.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_bounded(&site)?;
    Ok(())
}

/// Raises this process's soft descriptor limit to at least `want`.
fn raise_nofile(want: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < want {
        ensure!(
            hard >= want,
            "RLIMIT_NOFILE hard limit {hard} is below the {want} descriptors this test opens"
        );
        setrlimit(Resource::RLIMIT_NOFILE, want, hard)?;
    }
    Ok(())
}

#[test]
fn a_real_agent_syncs_through_a_thousand_idle_connections() -> anyhow::Result<()> {
    const IDLE: usize = 1000;
    raise_nofile(IDLE as u64 + 1024)?;
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk0.raw"), 32 << 20)?;
    fill_mixed(&dev, 13)?;
    let cfg = site.agent("agent-i", site.addr, &[(dev.path(), "disk-i")])?;
    let hello_bytes = client_hello(cfg.parent().context("dir")?)?;

    // Half say nothing, half start a ClientHello and stop.
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let mut s = TcpStream::connect(site.addr)?;
        if i % 2 == 1 {
            s.write_all(&hello_bytes[..hello_bytes.len() / 2])?;
        }
        idle.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let fds = receiver_fds(&site)?;
    eprintln!("{IDLE} idle connections open; the receiver holds {fds} descriptors");
    assert!(fds < 400, "the receiver holds {fds} descriptors");

    let started = Instant::now();
    let out = agent_sync(&cfg, &["--give-up-after", "60"]);
    let took = started.elapsed();
    let p = point_id(&out)?;
    eprintln!("agent sync beside {IDLE} idle connections took {took:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !said.contains("retrying in"),
        "the agent had to wait out the idle connections ({took:?}): {said}"
    );
    assert!(site.export("disk-i", &p.to_string())? == dev.read_all()?);
    assert_logged(&site, "before its handshake finished");
    let peak = assert_bounded(&site)?;
    eprintln!("receiver peak RSS {peak} MiB");
    drop(idle);
    Ok(())
}

/// A copy of `cfg` with `edit` applied to its text, beside it.
fn edited(cfg: &Path, name: &str, edit: impl Fn(String) -> String) -> anyhow::Result<PathBuf> {
    let out = cfg.with_file_name(name);
    std::fs::write(&out, edit(std::fs::read_to_string(cfg)?))?;
    Ok(out)
}

fn set_line(text: String, key: &str, value: &str) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with(&format!("{key} =")) {
                format!("{key} = {value}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn serve(cfg: &Path) -> std::process::Output {
    let mut cmd = receiver_cmd();
    cmd.args(["serve", "--config", path(cfg)]);
    // A serve that wrongly starts must not hang the test.
    let child = tidemark_tests::Daemon::spawn(cmd).expect("spawn serve");
    let status = child
        .wait_timeout(Duration::from_secs(20))
        .expect("serve exits on a bad configuration");
    let log = child.log();
    std::process::Output {
        status,
        stdout: Vec::new(),
        stderr: log.into_bytes(),
    }
}

fn agent(cmd: &str, cfg: &Path) -> std::process::Output {
    std::process::Command::new(workspace_bin("tidemark-agent"))
        .args([cmd, "--config", path(cfg)])
        .output()
        .expect("agent runs")
}

fn chmod(p: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[test]
fn configuration_mistakes_are_one_line_naming_the_thing() -> anyhow::Result<()> {
    let mut site = Site::start_network_only(&[])?;
    let agent_cfg = site.agent(
        "agent-c",
        site.addr,
        &[(Path::new("/dev/tidemark-none"), "d")],
    )?;
    // The receiver's own files are tried with it stopped (it holds the
    // retention volume's lock).
    site.receiver.kill();
    let cfg = site.config();
    let rx = site.dir.path().join("rx");

    let unknown = edited(&cfg, "unknown.toml", |t| format!("listen_backlog = 5\n{t}"))?;
    assert_fails_with(
        &serve(&unknown),
        &["unknown.toml", "unknown field `listen_backlog`"],
    );
    for (key, file) in [
        ("ca", "ca.pem"),
        ("cert", "receiver.pem"),
        ("key", "receiver-key.pem"),
    ] {
        let missing = rx.join(format!("missing-{file}"));
        let c = edited(&cfg, &format!("missing-{key}.toml"), |t| {
            set_line(t, key, &format!("\"{}\"", missing.display()))
        })?;
        assert_fails_with(&serve(&c), &[path(&missing)]);
    }
    let key = rx.join("receiver-key.pem");
    for mode in [0o644, 0o640, 0o604] {
        chmod(&key, mode)?;
        assert_fails_with(&serve(&cfg), &[path(&key), "chmod 600"]);
    }
    chmod(&key, 0o600)?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let busy = taken.local_addr()?;
    let c = edited(&cfg, "busy.toml", |t| {
        set_line(t, "listen", &format!("\"{busy}\""))
    })?;
    let out = serve(&c);
    assert_fails_with(&out, &[&format!("cannot listen on {busy}"), "in use"]);
    let errors = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("error:"))
        .count();
    assert_eq!(errors, 1, "one error line");
    drop(taken);
    // And with the files right again, it serves.
    let port = free_port();
    let c = edited(&cfg, "good.toml", |t| {
        set_line(t, "listen", &format!("\"127.0.0.1:{port}\""))
    })?;
    let mut cmd = receiver_cmd();
    cmd.args(["serve", "--config", path(&c)]);
    let good = tidemark_tests::Daemon::spawn(cmd)?;
    good.wait_for_log("listening on", Duration::from_secs(20))?;
    drop(good);

    // The agent: sync and run, before any device is opened.
    let adir = agent_cfg.parent().context("dir")?.to_path_buf();
    for cmd in ["sync", "run"] {
        let unknown = edited(&agent_cfg, "unknown.toml", |t| {
            format!("reciever = \"x:1\"\n{t}")
        })?;
        assert_fails_with(
            &agent(cmd, &unknown),
            &["unknown.toml", "unknown field `reciever`"],
        );
        for (key, file) in [
            ("ca", "ca.pem"),
            ("cert", "agent.pem"),
            ("key", "agent-key.pem"),
        ] {
            let missing = adir.join(format!("missing-{file}"));
            let c = edited(&agent_cfg, &format!("missing-{key}.toml"), |t| {
                set_line(t, key, &format!("\"{}\"", missing.display()))
            })?;
            assert_fails_with(&agent(cmd, &c), &[path(&missing)]);
        }
        let key = adir.join("agent-key.pem");
        chmod(&key, 0o644)?;
        assert_fails_with(&agent(cmd, &agent_cfg), &[path(&key), "chmod 600"]);
        chmod(&key, 0o600)?;
    }
    Ok(())
}

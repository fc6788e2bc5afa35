//! End to end on real loop devices: `init`, `issue-cert`, `serve` on
//! 127.0.0.1, `sync`, `points`, `export`, compared byte for byte with the
//! device, and every rejection the first capability promises.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use tidemark_tests::raw;
use tidemark_tests::site::{
    agent_sync, assert_fails_with, path, point_id, receiver_cmd, run_ok, Site,
};
use tidemark_tests::{
    fill_mixed, free_port, require_cmd, workspace_bin, CountingProxy, Daemon, LoopDev,
};

#[test]
fn sync_exports_byte_for_byte_and_zeros_do_not_travel() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk0.raw"), 96 << 20)?;
    let report = fill_mixed(&dev, 42)?;
    let proxy = CountingProxy::start(site.addr)?;
    let cfg = site.agent("agent-a", proxy.addr(), &[(dev.path(), "disk-a")])?;

    let first = agent_sync(&cfg, &[]);
    let p1 = point_id(&first)?;
    let device = dev.read_all()?;
    assert!(
        site.export("disk-a", "latest")? == device,
        "export differs from device"
    );

    // The agent read the device in requests its queue takes whole: the
    // loop device's limits, read here from sysfs, not 1 MiB that the block
    // layer would split (and io_uring then hand to a worker thread).
    let queue = dev.sysfs()?.join("queue");
    let limit = |f: &str| -> anyhow::Result<u64> {
        Ok(std::fs::read_to_string(queue.join(f))?.trim().parse()?)
    };
    let takes_kib = limit("max_sectors_kb")?
        .min(limit("max_segments")? * 4)
        .min(1024);
    let log = String::from_utf8_lossy(&first.stderr);
    assert!(
        log.contains(&format!("reads of up to {takes_kib} KiB per request")),
        "expected reads of up to {takes_kib} KiB: {log}"
    );
    assert!(site.export("disk-a", &p1.to_string())? == device);

    // Zeros travel as records: the wire carries at most the non-zero data
    // (random data does not compress), and the image leaves them unallocated.
    let nonzero = report.random_bytes + report.compressible_bytes;
    let up = proxy.bytes_up();
    assert!(
        up < nonzero + nonzero / 20 + (1 << 20),
        "{up} bytes went up for {nonzero} non-zero bytes"
    );
    assert!(up > report.random_bytes, "random data cannot shrink: {up}");
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(site.image("disk-a"))?.blocks() * 512;
    assert!(
        allocated <= nonzero + (4 << 20),
        "image allocates {allocated} bytes for {nonzero} non-zero bytes"
    );

    let points = site.points_json()?;
    let listed = points["points"].as_array().context("points is an array")?;
    assert_eq!(points["disks"]["disk-a"]["latest"], p1);
    assert_eq!(points["disks"]["disk-a"]["latest_processed"], p1);
    assert!(points["disks"]["disk-a"]["latest_app_consistent"].is_null());
    assert!(points["disks"]["disk-a"]["rpo_seconds"]
        .as_i64()
        .is_some_and(|s| (0..600).contains(&s)));
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], p1);
    assert_eq!(listed[0]["kind"], "crash-consistent");
    assert_eq!(listed[0]["disks"][0], "disk-a");
    assert_eq!(listed[0]["machine"], "agent-a");

    // Change part of the device (data over zeros, zeros over data) and
    // sync again: the same image follows, and the first point can still be
    // exported from the undo journal.
    let before = device;
    dev.write_at(5 << 20, &vec![0x5a; 3 << 20])?;
    dev.write_at(0, &vec![0u8; 1 << 20])?;
    let second = agent_sync(&cfg, &[]);
    let p2 = point_id(&second)?;
    assert!(p2 > p1);
    let device = dev.read_all()?;
    assert!(
        site.export("disk-a", "latest")? == device,
        "second export differs"
    );
    assert!(
        site.export("disk-a", &p1.to_string())? == before,
        "point {p1} no longer exports as it was"
    );
    Ok(())
}

#[test]
fn qemu_img_agrees_with_the_export() -> anyhow::Result<()> {
    require_cmd("qemu-img")?;
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk0.raw"), 64 << 20)?;
    dev.mkfs_ext4()?;
    let cfg = site.agent("agent-q", site.addr, &[(dev.path(), "disk-q")])?;
    point_id(&agent_sync(&cfg, &[]))?;
    let out = site.dir.path().join("q.raw");
    run_ok(
        receiver_cmd()
            .args([
                "export",
                "--config",
                path(&site.config()),
                "--disk",
                "disk-q",
            ])
            .args(["--point", "latest", "--format", "raw", "--out", path(&out)]),
    )?;
    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        path(&out),
        path(dev.path()),
    ]))?;
    Ok(())
}

#[test]
fn bad_disk_paths_are_refused_by_name() -> anyhow::Result<()> {
    let site = Site::start()?;
    let file = site.dir.path().join("not-a-disk.img");
    std::fs::write(&file, vec![0u8; 1 << 20])?;
    let cfg = site.agent("agent-b", site.addr, &[(&file, "d1")])?;
    assert_fails_with(
        &agent_sync(&cfg, &[]),
        &["not-a-disk.img", "not a block device"],
    );
    let cfg = site.agent(
        "agent-c",
        site.addr,
        &[(Path::new("/dev/tidemark-missing"), "d1")],
    )?;
    assert_fails_with(&agent_sync(&cfg, &[]), &["/dev/tidemark-missing"]);
    Ok(())
}

#[test]
fn unreachable_receiver_is_retried_then_reported() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk0.raw"), 16 << 20)?;
    let nobody: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let cfg = site.agent("agent-u", nobody, &[(dev.path(), "disk-u")])?;
    let out = agent_sync(&cfg, &["--give-up-after", "3"]);
    assert_fails_with(&out, &[&nobody.to_string(), "gave up"]);
    assert_eq!(out.status.code(), Some(1), "a passing state is no refusal");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("retrying in"),
        "no retry was logged: {stderr}"
    );
    Ok(())
}

#[test]
fn agent_rejects_a_receiver_from_another_ca() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk0.raw"), 16 << 20)?;
    let cfg = site.agent("agent-w", site.addr, &[(dev.path(), "disk-w")])?;
    // Swap in the CA of an unrelated receiver.
    let other = site.unrelated_receiver()?;
    std::fs::copy(other.join("ca.pem"), cfg.with_file_name("ca.pem"))?;
    assert_fails_with(
        &agent_sync(&cfg, &["--give-up-after", "5"]),
        &["does not trust"],
    );
    assert!(!site.image("disk-w").exists(), "nothing may be written");
    Ok(())
}

#[test]
fn receiver_rejects_foreign_and_expired_agent_certificates() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk0.raw"), 16 << 20)?;

    // Foreign: a certificate from another CA, trusting the right receiver.
    let cfg = site.agent("agent-f", site.addr, &[(dev.path(), "disk-f")])?;
    let other = site.unrelated_receiver()?;
    run_ok(
        receiver_cmd()
            .args(["issue-cert", "--dir", path(&other), "--name", "agent-f"])
            .args([
                "--receiver",
                &site.addr.to_string(),
                "--out",
                path(&other.join("a")),
            ]),
    )?;
    for f in ["agent.pem", "agent-key.pem"] {
        std::fs::copy(other.join("a").join(f), cfg.with_file_name(f))?;
    }
    assert_fails_with(
        &agent_sync(&cfg, &["--give-up-after", "5"]),
        &["rejected this agent's certificate"],
    );

    // Expired: signed by the right CA, but its validity ended yesterday.
    let cfg = site.agent("agent-e", site.addr, &[(dev.path(), "disk-e")])?;
    let ca_dir = site.dir.path().join("rx");
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem"))?)?;
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(ca_dir.join("ca.pem"))?, ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "agent-e");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::write(cfg.with_file_name("agent.pem"), cert.pem())?;
    std::fs::write(cfg.with_file_name("agent-key.pem"), key.serialize_pem())?;
    assert_fails_with(
        &agent_sync(&cfg, &["--give-up-after", "5"]),
        &["rejected this agent's certificate"],
    );

    assert!(!site.image("disk-f").exists() && !site.image("disk-e").exists());
    let log = site.receiver.log();
    assert!(
        log.contains("TLS handshake failed"),
        "receiver did not log the rejection: {log}"
    );
    Ok(())
}

#[test]
fn garbage_and_oversized_frames_drop_only_that_connection() -> anyhow::Result<()> {
    use std::io::Write;
    use tidemark_common::proto::{ErrorCode, Message};
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk0.raw"), 16 << 20)?;
    fill_mixed(&dev, 7)?;
    let cfg = site.agent("agent-g", site.addr, &[(dev.path(), "disk-g")])?;

    // Plaintext garbage at the TLS port.
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(site.addr)?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01\x02garbage")?;
        drop(s);
    }
    // A valid agent that then sends a 4 GiB frame header and junk.
    raw::block_on(async {
        let mut s = raw::connect(site.addr, cfg.parent().expect("dir")).await?;
        raw::send(
            &mut s,
            &Message::Hello {
                agent_name: "agent-g".into(),
                software_version: "t".into(),
            },
        )
        .await?;
        assert!(matches!(
            raw::recv(&mut s).await?,
            Some(Message::Welcome { .. })
        ));
        use tokio::io::AsyncWriteExt;
        s.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await?;
        s.flush().await?;
        match raw::recv(&mut s).await? {
            Some(Message::Error { code, message }) => {
                assert_eq!(code, ErrorCode::Protocol);
                assert!(message.contains("exceeds"), "{message}");
            }
            other => anyhow::bail!("expected a protocol error, got {other:?}"),
        }
        // And the receiver closes that connection.
        assert!(raw::recv(&mut s).await.map_or(true, |m| m.is_none()));
        Ok::<_, anyhow::Error>(())
    })?;
    // The receiver still serves real agents.
    point_id(&agent_sync(&cfg, &[]))?;
    assert!(site.export("disk-g", "latest")? == dev.read_all()?);
    Ok(())
}

#[test]
fn checksum_mismatch_is_rejected_and_never_written() -> anyhow::Result<()> {
    use tidemark_common::proto::messages::Extent;
    use tidemark_common::proto::{ErrorCode, ExtentSum, Message, SumKind};
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk0.raw"), 16 << 20)?;
    let cfg = site.agent("agent-k", site.addr, &[(dev.path(), "disk-k")])?;
    // Both checksums: BLAKE3 (protocol 1) and CRC32C (protocol 2). Each
    // mismatch ends its session.
    for sum in [SumKind::Blake3, SumKind::Crc32c] {
        raw::block_on(async {
            let mut s = raw::hello(site.addr, cfg.parent().expect("dir"), "agent-k").await?;
            raw::send(&mut s, &raw::register_msg("disk-k", 1 << 20)).await?;
            let handle = match raw::recv(&mut s).await? {
                Some(Message::DiskRegistered { handle, .. }) => handle,
                other => anyhow::bail!("expected registration, got {other:?}"),
            };
            let mut e = Extent::pack(1, handle, 8192, &[0xab; 4096], sum, None);
            match &mut e.checksum {
                ExtentSum::Blake3(b) => b[0] ^= 0xff,
                ExtentSum::Crc32c(c) => *c ^= 1 << 17,
            }
            raw::send(&mut s, &Message::Extent(e)).await?;
            match raw::recv(&mut s).await? {
                Some(Message::Error { code, message }) => {
                    assert_eq!(code, ErrorCode::ChecksumMismatch, "{sum:?}");
                    assert!(message.contains("nothing written"), "{message}");
                }
                other => anyhow::bail!("expected a checksum error for {sum:?}, got {other:?}"),
            }
            Ok::<_, anyhow::Error>(())
        })?;
    }
    let image = std::fs::read(site.image("disk-k"))?;
    assert_eq!(image.len(), 1 << 20);
    assert!(
        image.iter().all(|&b| b == 0),
        "rejected data reached the image"
    );
    Ok(())
}

#[test]
fn disk_larger_than_its_image_is_refused_and_nothing_is_lost() -> anyhow::Result<()> {
    // A format that cannot grow in place (flat VMDK, raw and fixed VHD
    // grow: e2e_host).
    let site = Site::start_with_config("image_format = \"vmdk-sparse\"")?;
    let small = LoopDev::create(&site.dir.path().join("small.raw"), 16 << 20)?;
    fill_mixed(&small, 3)?;
    let cfg = site.agent("agent-l", site.addr, &[(small.path(), "disk-l")])?;
    let p1 = point_id(&agent_sync(&cfg, &[]))?;
    let before = site.export("disk-l", "latest")?;

    let big = LoopDev::create(&site.dir.path().join("big.raw"), 32 << 20)?;
    let cfg = site.agent("agent-l2", site.addr, &[(big.path(), "disk-l")])?;
    // Another agent claiming the disk is refused first...
    assert_fails_with(&agent_sync(&cfg, &[]), &["belongs to agent agent-l"]);
    // ...and the owner with a bigger disk is refused for its size.
    let mut text = std::fs::read_to_string(site.dir.path().join("agent-l/agent.toml"))?;
    text = text.replace(path(small.path()), path(big.path()));
    std::fs::write(site.dir.path().join("agent-l/agent.toml"), text)?;
    assert_fails_with(
        &agent_sync(&site.dir.path().join("agent-l/agent.toml"), &[]),
        &["disk-l", "cannot grow in place", "image_format"],
    );
    assert_eq!(site.export("disk-l", &p1.to_string())?, before);
    Ok(())
}

#[test]
fn a_cut_connection_costs_a_retry_not_the_sync() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk0.raw"), 128 << 20)?;
    // Mostly incompressible data, so the transfer lasts long enough to cut.
    let mut rng = tidemark_tests::SplitMix64::new(11);
    let mut chunk = vec![0u8; 1 << 20];
    for mib in 0..128u64 {
        chunk
            .chunks_mut(8)
            .for_each(|c| c.copy_from_slice(&rng.next_u64().to_le_bytes()));
        dev.write_at(mib << 20, &chunk)?;
    }
    let proxy = CountingProxy::start(site.addr)?;
    let cfg = site.agent("agent-r", proxy.addr(), &[(dev.path(), "disk-r")])?;
    let mut cmd = Command::new(workspace_bin("tidemark-agent"));
    cmd.args(["sync", "--config", path(&cfg)]);
    let agent = Daemon::spawn(cmd)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while proxy.bytes_up() < 16 << 20 {
        ensure!(
            std::time::Instant::now() < deadline,
            "sync never got going: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    proxy.cut_all();
    let status = agent.wait_timeout(Duration::from_secs(120))?;
    let log = agent.log();
    ensure!(status.success(), "sync failed after the cut: {log}");
    // "lost: …; reconnecting" when the receiver had acknowledged something
    // on the cut connection, "lost: …; retrying in …" when not yet (the
    // window lets 16 MiB go before the first ack): either is the cut seen.
    ensure!(
        log.contains("connection to receiver") && log.contains(" lost: "),
        "the cut was not noticed: {log}"
    );
    ensure!(proxy.connections() >= 2, "no second connection was made");
    assert!(
        site.export("disk-r", "latest")? == dev.read_all()?,
        "export differs after the cut"
    );
    Ok(())
}

#[test]
fn exports_in_every_format_read_back_in_qemu() -> anyhow::Result<()> {
    require_cmd("qemu-img")?;
    let site = Site::start()?;
    // Not a whole number of MiB: the fixed VHD must round up for Azure.
    let size = (40 << 20) + (64 << 10);
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), size)?;
    let mut rng = tidemark_tests::SplitMix64::new(77);
    let mut random = vec![0u8; 8 << 20];
    random
        .chunks_mut(8)
        .for_each(|c| c.copy_from_slice(&rng.next_u64().to_le_bytes()));
    dev.write_at(0, &random)?;
    dev.write_at(16 << 20, &b"compressible text ".repeat(100_000))?;
    dev.write_at(size - 4096, &[0x99; 4096])?;
    let id = "naa.6000c29a1b2c3d4e5f60718293a4b5c6";
    let cfg = site.agent("agent-x", site.addr, &[(dev.path(), id)])?;
    point_id(&agent_sync(&cfg, &[]))?;
    let info = |fmt: &str, file: &Path| -> anyhow::Result<serde_json::Value> {
        let out = run_ok(Command::new("qemu-img").args([
            "info",
            "--output=json",
            "-f",
            fmt,
            path(file),
        ]))?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let compare = |fmt: &str, file: &Path| {
        run_ok(Command::new("qemu-img").args([
            "compare",
            "-f",
            "raw",
            "-F",
            fmt,
            path(dev.path()),
            path(file),
        ]))
    };
    let export = |fmt: &str, out: &Path| {
        run_ok(
            receiver_cmd()
                .args(["export", "--config", path(&site.config()), "--disk", id])
                .args(["--point", "latest", "--format", fmt, "--out", path(out)]),
        )
    };

    let vhd = site.dir.path().join("x.vhd");
    export("vhd-fixed", &vhd)?;
    compare("vpc", &vhd)?;
    let want = size.div_ceil(1 << 20) << 20;
    assert_eq!(info("vpc", &vhd)?["virtual-size"], want);
    assert_eq!(
        std::fs::metadata(&vhd)?.len(),
        want + 512,
        "N MiB + 512 bytes"
    );

    let vmdk = site.dir.path().join("x.vmdk");
    export("vmdk", &vmdk)?;
    for d in [&vmdk, &site.dir.path().join("x-hosted.vmdk")] {
        compare("vmdk", d)?;
        assert_eq!(info("vmdk", d)?["virtual-size"], size);
        run_ok(Command::new("qemu-img").args(["check", "-f", "vmdk", path(d)]))?;
    }
    let text = std::fs::read_to_string(&vmdk)?;
    assert!(text.contains("createType=\"vmfs\""), "{text}");
    assert!(
        text.contains("ddb.uuid = \"60 00 c2 9a 1b 2c 3d 4e-5f 60 71 82 93 a4 b5 c6\""),
        "the NAA WWID must be the VMDK's UUID: {text}"
    );
    let out = receiver_cmd()
        .args([
            "export",
            "--config",
            path(&site.config()),
            "--disk",
            id,
            "--format",
            "qcow9",
        ])
        .args(["--out", path(&site.dir.path().join("x.q"))])
        .output()?;
    assert_fails_with(&out, &["qcow9", "supported"]);
    Ok(())
}

/// Sets (or adds) the `ddb.uuid` of a VMDK descriptor.
fn set_ddb_uuid(descriptor: &Path, uuid_text: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(descriptor)?;
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("ddb.uuid "))
        .map(str::to_owned)
        .collect();
    lines.push(format!("ddb.uuid = \"{uuid_text}\""));
    std::fs::write(descriptor, lines.join("\n") + "\n")?;
    Ok(())
}

const NAA_ID: &str = "naa.6000c29a1b2c3d4e5f60718293a4b5c6";
const NAA_UUID: &str = "60 00 c2 9a 1b 2c 3d 4e-5f 60 71 82 93 a4 b5 c6";

#[test]
fn an_existing_vmdk_with_the_disks_uuid_is_written_in_place() -> anyhow::Result<()> {
    require_cmd("qemu-img")?;
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 32 << 20)?;
    fill_mixed(&dev, 5)?;
    // The image the guest's disk came from, made by qemu-img, not by us.
    let images = site.dir.path().join("images");
    let vmdk = images.join("web.vmdk");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vmdk"])
            .args([
                "-o",
                "subformat=monolithicFlat",
                path(dev.path()),
                path(&vmdk),
            ]),
    )?;
    set_ddb_uuid(&vmdk, NAA_UUID)?;
    dev.write_at(3 << 20, &vec![0x77; 1 << 20])?;

    let cfg = site.agent("agent-v", site.addr, &[(dev.path(), NAA_ID)])?;
    point_id(&agent_sync(&cfg, &[]))?;
    assert!(
        site.receiver
            .log()
            .contains("by its UUID (original location")
            && site.receiver.log().contains("web.vmdk"),
        "{}",
        site.receiver.log()
    );
    assert!(
        !site.image(NAA_ID).exists(),
        "no additional disk may be created"
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "vmdk"])
            .args([path(dev.path()), path(&vmdk)]),
    )?;
    Ok(())
}

#[test]
fn two_images_with_one_uuid_are_an_error_not_a_guess() -> anyhow::Result<()> {
    require_cmd("qemu-img")?;
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 16 << 20)?;
    let images = site.dir.path().join("images");
    for name in ["a.vmdk", "b.vmdk"] {
        let p = images.join(name);
        run_ok(
            Command::new("qemu-img")
                .args(["create", "-f", "vmdk", "-o", "subformat=monolithicFlat"])
                .args([path(&p), "16M"]),
        )?;
        set_ddb_uuid(&p, NAA_UUID)?;
    }
    let cfg = site.agent("agent-d", site.addr, &[(dev.path(), NAA_ID)])?;
    assert_fails_with(
        &agent_sync(&cfg, &["--give-up-after", "2"]),
        &["a.vmdk", "b.vmdk", "UUID"],
    );
    assert!(!site.image(NAA_ID).exists());
    Ok(())
}

#[test]
fn a_deleted_replica_is_recreated_with_a_full_copy() -> anyhow::Result<()> {
    let site = Site::start()?;
    let dev = LoopDev::create(&site.dir.path().join("disk.raw"), 16 << 20)?;
    fill_mixed(&dev, 8)?;
    let cfg = site.agent("agent-z", site.addr, &[(dev.path(), "disk-z")])?;
    let p1 = point_id(&agent_sync(&cfg, &[]))?;
    for f in ["disk-z-flat.vmdk", "disk-z.vmdk", "disk-z-hosted.vmdk"] {
        std::fs::remove_file(site.dir.path().join("images").join(f))?;
    }
    let p = point_id(&agent_sync(&cfg, &[]))?;
    assert!(site
        .receiver
        .log()
        .contains("is missing; creating a new one"));
    assert!(site.image("disk-z").exists());
    assert!(site.export("disk-z", &p.to_string())? == dev.read_all()?);
    // The old point's history went with the old image: refused, not wrong.
    let out = receiver_cmd()
        .args([
            "export",
            "--config",
            path(&site.config()),
            "--disk",
            "disk-z",
        ])
        .args([
            "--point",
            &p1.to_string(),
            "--out",
            path(&site.dir.path().join("old.raw")),
        ])
        .output()?;
    assert_fails_with(&out, &["pruned"]);
    Ok(())
}

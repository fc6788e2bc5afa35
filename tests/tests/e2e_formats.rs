//! Live image formats end to end: replicas kept as sparse VMDK, dynamic
//! and fixed VHD (chosen per receiver and per disk), exports of every point in every
//! export format checked by qemu-img, and images made by qemu-img found by
//! their UUID so only changes travel.

use std::path::Path;
use std::process::Command;

use anyhow::ensure;
use tidemark_receiver::image::storage::FileStorage;
use tidemark_receiver::image::vhd::{validate_dynamic, validate_fixed, VhdKind};
use tidemark_tests::site::{
    agent_sync, assert_fails_with, path, point_id, receiver_cmd, run_ok, Site,
};
use tidemark_tests::{fill_mixed, require_cmd, CountingProxy, LoopDev, SplitMix64};

/// Replaces receiver.toml's `image_format` and appends per-disk sections,
/// then restarts the receiver so it reads them.
fn set_formats(site: &mut Site, default: &str, per_disk: &[(&str, &str)]) -> anyhow::Result<()> {
    let cfg = site.config();
    let text = std::fs::read_to_string(&cfg)?;
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("image_format"))
        .map(str::to_owned)
        .collect();
    // Top-level keys must come before any table.
    out.insert(0, format!("image_format = \"{default}\""));
    for (disk, format) in per_disk {
        out.push(format!("\n[disks.\"{disk}\"]\nimage_format = \"{format}\""));
    }
    std::fs::write(&cfg, out.join("\n") + "\n")?;
    site.restart_receiver()
}

fn qemu_compare(raw: &Path, fmt: &str, image: &Path) -> anyhow::Result<()> {
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", fmt])
            .args([path(raw), path(image)]),
    )?;
    Ok(())
}

fn export(site: &Site, disk: &str, point: &str, fmt: &str, out: &Path) -> anyhow::Result<()> {
    run_ok(
        receiver_cmd()
            .args(["export", "--config", path(&site.config()), "--disk", disk])
            .args(["--point", point, "--format", fmt, "--out", path(out)]),
    )?;
    Ok(())
}

/// Random writes of random sizes, unaligned to grains, some of them zeros.
fn churn(dev: &LoopDev, rng: &mut SplitMix64, writes: usize) -> anyhow::Result<()> {
    let size = dev.size_bytes();
    for _ in 0..writes {
        let len = 4096 * (1 + rng.below(64));
        let at = 4096 * rng.below((size - len) / 4096);
        let mut data = vec![0u8; len as usize];
        if rng.below(4) != 0 {
            rng.fill_bytes(&mut data);
        }
        dev.write_at(at, &data)?;
    }
    Ok(())
}

#[test]
fn sparse_vmdk_and_vhd_replicas_export_every_point_in_every_format() -> anyhow::Result<()> {
    require_cmd("qemu-img")?;
    let mut site = Site::start()?;
    set_formats(
        &mut site,
        "vmdk-sparse",
        &[("disk-h", "vhd-fixed"), ("disk-d", "vhd")],
    )?;
    // Not whole grains or MiB: the last partial grain and Azure's rounding.
    let size = (24 << 20) + (12 << 10);
    let s = LoopDev::create(&site.dir.path().join("s.raw"), size)?;
    let h = LoopDev::create(&site.dir.path().join("h.raw"), size)?;
    let d = LoopDev::create(&site.dir.path().join("d.raw"), size)?;
    let cfg = site.agent(
        "agent-f",
        site.addr,
        &[
            (s.path(), "disk-s"),
            (h.path(), "disk-h"),
            (d.path(), "disk-d"),
        ],
    )?;
    let mut rng = SplitMix64::new(31);
    let mut phases = Vec::new();
    for phase in 0..3 {
        churn(&s, &mut rng, if phase == 0 { 200 } else { 40 })?;
        churn(&h, &mut rng, if phase == 0 { 200 } else { 40 })?;
        churn(&d, &mut rng, if phase == 0 { 200 } else { 40 })?;
        // The last, partial grain changes in every phase.
        s.write_at(size - 4096, &[phase + 1; 4096])?;
        h.write_at(size - 4096, &[phase + 1; 4096])?;
        d.write_at(size - 4096, &[phase + 1; 4096])?;
        let p = point_id(&agent_sync(&cfg, &[]))?;
        phases.push((p, s.read_all()?, h.read_all()?, d.read_all()?));
    }
    let images = site.dir.path().join("images");
    let live_s = images.join("disk-s.vmdk");
    let live_h = images.join("disk-h.vhd");
    let live_d = images.join("disk-d.vhd");
    ensure!(
        live_s.exists() && live_h.exists() && live_d.exists(),
        "live images not where expected"
    );
    assert!(
        !images.join("disk-s-flat.vmdk").exists(),
        "default vmdk must not be used"
    );
    qemu_compare(s.path(), "vmdk", &live_s)?;
    qemu_compare(h.path(), "vpc", &live_h)?;
    qemu_compare(d.path(), "vpc", &live_d)?;
    run_ok(Command::new("qemu-img").args(["check", "-f", "vmdk", path(&live_s)]))?;
    // qemu-img check has no VHD check: our structural one, which reads the
    // footer copies, header, BAT and bitmaps as the spec lays them out.
    validate_vhd(&live_d, VhdKind::Dynamic)?;
    validate_vhd(&live_h, VhdKind::Fixed)?;

    for (p, want_s, want_h, want_d) in &phases {
        for (disk, want) in [("disk-s", want_s), ("disk-h", want_h), ("disk-d", want_d)] {
            let out = site.dir.path().join(format!("{disk}-{p}.raw"));
            export(&site, disk, &p.to_string(), "raw", &out)?;
            assert!(
                std::fs::read(&out)? == *want,
                "{disk} exported at point {p} differs from the device then"
            );
            std::fs::remove_file(&out)?;
        }
    }
    // Every export format of the oldest point, read back by qemu-img
    // against the device as it was then.
    let (p1, first_s, _, _) = &phases[0];
    let then = site.dir.path().join("then.raw");
    std::fs::write(&then, first_s)?;
    for (fmt, qfmt, name) in [
        ("vmdk", "vmdk", "x.vmdk"),
        ("vmdk-sparse", "vmdk", "x-sparse.vmdk"),
        ("vmdk-stream", "vmdk", "x-stream.vmdk"),
        ("vhd-fixed", "vpc", "x.vhd"),
        ("vhd", "vpc", "x-dynamic.vhd"),
        ("raw", "raw", "x.raw"),
    ] {
        let out = site.dir.path().join(name);
        export(&site, "disk-s", &p1.to_string(), fmt, &out)?;
        qemu_compare(&then, qfmt, &out)?;
        if qfmt == "vmdk" {
            run_ok(Command::new("qemu-img").args(["check", "-f", "vmdk", path(&out)]))?;
        }
    }
    validate_vhd(&site.dir.path().join("x.vhd"), VhdKind::Fixed)?;
    validate_vhd(&site.dir.path().join("x-dynamic.vhd"), VhdKind::Dynamic)?;
    let stream = std::fs::read(site.dir.path().join("x-stream.vmdk"))?;
    let text = String::from_utf8_lossy(&stream[512..2048]);
    assert!(text.contains("streamOptimized"), "{text}");
    Ok(())
}

/// Puts `ddb.uuid` into the descriptor embedded in a sparse VMDK, in the
/// padding after it (qemu-img writes none).
fn set_embedded_uuid(vmdk: &Path, uuid_text: &str) -> anyhow::Result<()> {
    let mut bytes = std::fs::read(vmdk)?;
    let start = bytes
        .windows(21)
        .position(|w| w == b"# Disk DescriptorFile")
        .ok_or_else(|| anyhow::anyhow!("no embedded descriptor"))?;
    let end = start
        + bytes[start..]
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| anyhow::anyhow!("descriptor not terminated"))?;
    let line = format!("ddb.uuid = \"{uuid_text}\"\n");
    bytes[end..end + line.len()].copy_from_slice(line.as_bytes());
    std::fs::write(vmdk, bytes)?;
    Ok(())
}

/// Sets the unique id of a VHD made by qemu-img in its footer (and in the
/// copy at offset 0 a dynamic VHD has) and fixes the checksum (one's
/// complement of the byte sum, VHD spec).
fn set_vhd_uuid(vhd: &Path, uuid: [u8; 16]) -> anyhow::Result<()> {
    let mut bytes = std::fs::read(vhd)?;
    let tail = bytes.len() - 512;
    let mut copies = vec![tail];
    if bytes.starts_with(b"conectix") {
        copies.push(0);
    }
    for at in copies {
        let footer = &mut bytes[at..at + 512];
        footer[68..84].copy_from_slice(&uuid);
        footer[64..68].fill(0);
        let sum = footer
            .iter()
            .fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
        footer[64..68].copy_from_slice(&(!sum).to_be_bytes());
    }
    std::fs::write(vhd, bytes)?;
    Ok(())
}

fn validate_vhd(file: &Path, kind: VhdKind) -> anyhow::Result<()> {
    let storage = FileStorage::new(std::fs::File::open(file)?);
    let checked = match kind {
        VhdKind::Dynamic => validate_dynamic(&storage),
        VhdKind::Fixed => validate_fixed(&storage),
    };
    checked.map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

const NAA_ID: &str = "naa.6000c29a1b2c3d4e5f60718293a4b5c6";
const NAA_UUID_TEXT: &str = "60 00 c2 9a 1b 2c 3d 4e-5f 60 71 82 93 a4 b5 c6";
const NAA_UUID: [u8; 16] = [
    0x60, 0x00, 0xc2, 0x9a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6,
];

#[test]
fn qemu_made_sparse_vmdk_and_vhds_are_found_by_uuid_and_only_changes_travel() -> anyhow::Result<()>
{
    require_cmd("qemu-img")?;
    for (fmt, opts, qfmt, file) in [
        ("vmdk", "subformat=monolithicSparse", "vmdk", "guest.vmdk"),
        ("vpc", "subformat=fixed,force_size=on", "vpc", "guest.vhd"),
        (
            "vpc",
            "subformat=dynamic,force_size=on",
            "vpc",
            "guest-dyn.vhd",
        ),
    ] {
        let site = Site::start()?;
        let dev = LoopDev::create(&site.dir.path().join("guest.raw"), 32 << 20)?;
        fill_mixed(&dev, 9)?;
        // The image the guest's disk came from, made by qemu-img.
        let image = site.dir.path().join("images").join(file);
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", fmt, "-o", opts])
                .args([path(dev.path()), path(&image)]),
        )?;
        if qfmt == "vmdk" {
            set_embedded_uuid(&image, NAA_UUID_TEXT)?;
        } else {
            set_vhd_uuid(&image, NAA_UUID)?;
        }
        // 1 MiB of 32 changes after the image was made.
        let mut rng = SplitMix64::new(5);
        let mut changed = vec![0u8; 1 << 20];
        rng.fill_bytes(&mut changed);
        dev.write_at(7 << 20, &changed)?;

        let proxy = CountingProxy::start(site.addr)?;
        let name = format!("agent-{}", file.replace('.', "-"));
        let cfg = site.agent(&name, proxy.addr(), &[(dev.path(), NAA_ID)])?;
        point_id(&agent_sync(&cfg, &[]))?;
        let log = site.receiver.log();
        assert!(log.contains("found") && log.contains(file), "{log}");
        qemu_compare(dev.path(), qfmt, &image)?;
        // Found, so compared by checksums: only the changed MiB (random,
        // incompressible) and protocol overhead travel, not the disk.
        assert!(
            proxy.bytes_up() < (1 << 20) + (256 << 10),
            "{} bytes sent for 1 MiB of changes",
            proxy.bytes_up()
        );
        let images: Vec<_> = std::fs::read_dir(site.dir.path().join("images"))?.collect();
        assert_eq!(
            images.len(),
            1,
            "no additional disk may be created: {images:?}"
        );
    }
    Ok(())
}

#[test]
fn a_disk_too_large_for_its_format_is_refused_at_registration() -> anyhow::Result<()> {
    let mut site = Site::start()?;
    set_formats(&mut site, "vmdk", &[("big", "vmdk-sparse")])?;
    // A sparse backing file: 3 TiB costs nothing until written.
    let dev = LoopDev::create(&site.dir.path().join("big.raw"), 3 << 40)?;
    let cfg = site.agent("agent-b", site.addr, &[(dev.path(), "big")])?;
    assert_fails_with(
        &agent_sync(&cfg, &["--give-up-after", "2"]),
        &["big", "monolithicSparse", "image_format"],
    );
    // qemu reads a dynamic VHD only up to 2040 GiB.
    set_formats(&mut site, "vhd", &[])?;
    let cfg = site.agent("agent-b2", site.addr, &[(dev.path(), "big")])?;
    assert_fails_with(
        &agent_sync(&cfg, &["--give-up-after", "2"]),
        &["big", "dynamic VHD", "vhd-fixed"],
    );
    let images: Vec<_> = std::fs::read_dir(site.dir.path().join("images"))?.collect();
    assert!(images.is_empty(), "nothing may be created: {images:?}");
    Ok(())
}

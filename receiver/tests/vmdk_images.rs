//! VMDK images against the real tools: every live kind is written with
//! random writes mirrored in a raw shadow file, then checked with
//! `qemu-img compare/info/check`, our validators, and the independent
//! readers `vmdkinfo` (libvmdk) and `7zz` (7-Zip). Crash tests cut power
//! after every sync of a monolithicSparse workload on `CrashStorage`.
//!
//! The tools are prerequisites: a missing one fails the test (Debian:
//! `apt-get install qemu-utils libvmdk-utils 7zip`).

use std::path::{Path, PathBuf};
use std::process::Command;

use tidemark_receiver::image::raw::RawImage;
use tidemark_receiver::image::storage::{CrashStorage, FileStorage};
use tidemark_receiver::image::vmdk::{
    self, export_stream, is_extent_file, probe, validate_sparse, validate_stream, VmdkImage,
    VmdkKind,
};
use tidemark_receiver::image::{DiskUuid, Image};

const UUID: DiskUuid = [
    0x60, 0x00, 0xc2, 0x9a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6,
];
const UUID_TEXT: &str = "60 00 c2 9a 1b 2c 3d 4e-5f 60 71 82 93 a4 b5 c6";
const GRAIN: u64 = 64 << 10;

/// Runs a tool; a missing tool is a failure, not a skip.
fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is it installed?): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn run_ok(cmd: &mut Command) -> String {
    let (rc, text) = run(cmd);
    assert_eq!(rc, 0, "{cmd:?} failed: {text}");
    text
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn qemu_compare(raw: &Path, vmdk: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "vmdk"])
            .args([s(raw), s(vmdk)]),
    );
}

fn qemu_info(vmdk: &Path) -> serde_json::Value {
    let text =
        run_ok(Command::new("qemu-img").args(["info", "--output=json", "-f", "vmdk", s(vmdk)]));
    serde_json::from_str(&text).expect("qemu-img info json")
}

fn qemu_check(vmdk: &Path) {
    run_ok(Command::new("qemu-img").args(["check", "-f", "vmdk", s(vmdk)]));
}

fn vmdkinfo(vmdk: &Path) -> String {
    run_ok(Command::new("vmdkinfo").arg(s(vmdk)))
}

/// 7-Zip extracts the disk as a raw image; it must equal the shadow.
fn sevenzip_matches(vmdk: &Path, shadow: &Path) {
    run_ok(Command::new("7zz").args(["t", s(vmdk)]));
    let out = tempfile::tempdir().expect("tempdir");
    run_ok(
        Command::new("7zz")
            .args(["x", "-y"])
            .arg(format!("-o{}", s(out.path())))
            .arg(s(vmdk)),
    );
    let files: Vec<PathBuf> = std::fs::read_dir(out.path())
        .expect("7zz output")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(files.len(), 1, "7zz extracted {files:?}");
    let got = std::fs::read(&files[0]).expect("extracted disk");
    let want = std::fs::read(shadow).expect("shadow");
    assert_eq!(got.len(), want.len(), "7zz disk size");
    assert!(
        got == want,
        "7zz extracted different content from {}",
        vmdk.display()
    );
}

/// xorshift64*: the same workload on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        // Half random, half a compressible pattern, so grains differ in kind.
        let pattern = self.below(2) == 0;
        let fill = self.next() as u8;
        (0..n)
            .map(|i| {
                if pattern {
                    fill ^ (i / 512) as u8
                } else {
                    self.next() as u8
                }
            })
            .collect()
    }
}

/// One random operation, applied to the image and to the shadow.
fn random_op(rng: &mut Rng, img: &mut dyn Image, shadow: &mut [u8]) {
    let size = shadow.len() as u64;
    let len = match rng.below(4) {
        0 => 1 + rng.below(4096),
        1 => 1 + rng.below(3 * GRAIN),
        2 => GRAIN * (1 + rng.below(4)),
        _ => 1 + rng.below(700),
    }
    .min(size);
    let off = match rng.below(5) {
        0 => size - len, // the last, partial grain
        1 => (rng.below(size / GRAIN) * GRAIN).min((size - len) / GRAIN * GRAIN),
        _ => rng.below(size - len + 1),
    };
    let (o, l) = (off as usize, len as usize);
    match rng.below(6) {
        0 => {
            img.write_zeroes(off, len).expect("write_zeroes");
            shadow[o..o + l].fill(0);
        }
        1 => {
            let zeros = vec![0u8; l];
            img.write_at(off, &zeros).expect("write zeros");
            shadow[o..o + l].fill(0);
        }
        _ => {
            let data = rng.bytes(l);
            img.write_at(off, &data).expect("write");
            shadow[o..o + l].copy_from_slice(&data);
        }
    }
}

fn assert_reads(img: &mut dyn Image, shadow: &[u8]) {
    let mut buf = vec![0u8; shadow.len()];
    img.read_at(0, &mut buf).expect("read all");
    assert!(buf == shadow, "image content differs from the shadow");
}

/// Random writes into `img` (and `shadow`), with flushes in between.
fn workload(seed: u64, ops: usize, img: &mut dyn Image, shadow: &mut [u8]) {
    let mut rng = Rng(seed);
    for i in 0..ops {
        random_op(&mut rng, img, shadow);
        if i % 17 == 16 {
            img.flush().expect("flush");
        }
    }
    img.flush().expect("flush");
    assert_reads(img, shadow);
}

fn sparse_storage(path: &Path) -> FileStorage {
    FileStorage::new(std::fs::File::open(path).expect("open"))
}

/// Sizes with a last partial grain.
const SIZE: u64 = (40 << 20) + 3 * 512;

#[test]
fn every_live_kind_matches_its_shadow_in_qemu_and_libvmdk() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, kind) in [
        VmdkKind::FlatVmfs,
        VmdkKind::MonolithicFlat,
        VmdkKind::MonolithicSparse,
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("disk{i}.vmdk"));
        let mut shadow = vec![0u8; SIZE as usize];
        let mut img = VmdkImage::create_file(&path, SIZE, UUID, kind).expect("create");
        workload(100 + i as u64, 300, &mut img, &mut shadow);
        img.close().expect("close");
        // Reopened: more writes on top, then checked.
        let mut img = VmdkImage::open_file(&path, true).expect("reopen");
        assert_eq!((img.kind(), img.uuid()), (kind, Some(UUID)));
        workload(200 + i as u64, 100, &mut img, &mut shadow);
        img.close().expect("close");

        let raw = dir.path().join(format!("shadow{i}.raw"));
        std::fs::write(&raw, &shadow).expect("shadow");
        qemu_compare(&raw, &path);
        let info = qemu_info(&path);
        assert_eq!(info["virtual-size"], SIZE, "{info}");
        assert_eq!(
            info["format-specific"]["data"]["create-type"],
            kind.create_type(),
            "{info}"
        );
        qemu_check(&path);
        let text = vmdkinfo(&path);
        assert!(text.contains(&format!("({SIZE} bytes)")), "{text}");
        assert_eq!(probe(&path).expect("probe"), Some((Some(UUID), kind, SIZE)));

        let descriptor = match kind {
            VmdkKind::MonolithicSparse => {
                validate_sparse(&sparse_storage(&path)).expect("valid sparse");
                sevenzip_matches(&path, &raw);
                let bytes = std::fs::read(&path).expect("read");
                String::from_utf8_lossy(&bytes[512..512 * 21]).into_owned()
            }
            _ => {
                let extent = dir.path().join(format!("disk{i}-flat.vmdk"));
                assert!(is_extent_file(&extent));
                assert_eq!(std::fs::metadata(&extent).expect("extent").len(), SIZE);
                std::fs::read_to_string(&path).expect("descriptor")
            }
        };
        assert!(descriptor.starts_with("# Disk DescriptorFile\nversion=1\n"));
        assert!(
            descriptor.contains(&format!("ddb.uuid = \"{UUID_TEXT}\"")),
            "{descriptor}"
        );
        assert!(!is_extent_file(&path));
    }
}

#[test]
fn qemu_writes_into_our_sparse_image_and_we_read_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.vmdk");
    let mut shadow = vec![0u8; SIZE as usize];
    let mut img =
        VmdkImage::create_file(&path, SIZE, UUID, VmdkKind::MonolithicSparse).expect("create");
    workload(7, 80, &mut img, &mut shadow);
    img.close().expect("close");
    run_ok(Command::new("qemu-io").args([
        "-f",
        "vmdk",
        "-c",
        "write -P 0x5a 100000 200000",
        s(&path),
    ]));
    shadow[100000..300000].fill(0x5a);
    validate_sparse(&sparse_storage(&path)).expect("valid after qemu wrote");
    let mut img = VmdkImage::open_file(&path, true).expect("open");
    assert_eq!(img.uuid(), Some(UUID), "qemu's CID rewrite kept ddb.uuid");
    assert_reads(&mut img, &shadow);
    workload(8, 50, &mut img, &mut shadow);
    img.close().expect("close");
    let raw = dir.path().join("shadow.raw");
    std::fs::write(&raw, &shadow).expect("shadow");
    qemu_compare(&raw, &path);
    qemu_check(&path);
    validate_sparse(&sparse_storage(&path)).expect("valid");
}

#[test]
fn images_made_by_qemu_are_probed_opened_and_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let mut shadow = vec![0u8; SIZE as usize];
    let mut rng = Rng(42);
    for _ in 0..40 {
        let off = rng.below(SIZE - 300000) as usize;
        let n = 1 + rng.below(300000) as usize;
        let data = rng.bytes(n);
        shadow[off..off + data.len()].copy_from_slice(&data);
    }
    std::fs::write(&src, &shadow).expect("src");
    for (name, sub, kind) in [
        ("ms.vmdk", None, VmdkKind::MonolithicSparse),
        (
            "mf.vmdk",
            Some("subformat=monolithicFlat"),
            VmdkKind::MonolithicFlat,
        ),
    ] {
        // Empty, from `qemu-img create`.
        let empty = dir.path().join(format!("empty-{name}"));
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-f", "vmdk"]);
        if let Some(o) = sub {
            cmd.args(["-o", o]);
        }
        run_ok(cmd.args([s(&empty), &SIZE.to_string()]));
        assert_eq!(probe(&empty).expect("probe"), Some((None, kind, SIZE)));
        let mut img = VmdkImage::open_file(&empty, false).expect("open empty");
        assert_eq!((img.kind(), img.uuid()), (kind, None));
        assert_reads(&mut img, &vec![0u8; SIZE as usize]);

        // With data, from `qemu-img convert`, then written by us.
        let path = dir.path().join(name);
        let mut cmd = Command::new("qemu-img");
        cmd.args(["convert", "-f", "raw", "-O", "vmdk"]);
        if let Some(o) = sub {
            cmd.args(["-o", o]);
        }
        run_ok(cmd.args([s(&src), s(&path)]));
        assert_eq!(probe(&path).expect("probe"), Some((None, kind, SIZE)));
        if kind == VmdkKind::MonolithicSparse {
            validate_sparse(&sparse_storage(&path)).expect("qemu's sparse file validates");
        } else {
            assert!(is_extent_file(&dir.path().join("mf-flat.vmdk")));
        }
        let mut img = VmdkImage::open_file(&path, true).expect("open");
        let mut mine = shadow.clone();
        assert_reads(&mut img, &mine);
        workload(9, 120, &mut img, &mut mine);
        img.close().expect("close");
        let raw = dir.path().join("mine.raw");
        std::fs::write(&raw, &mine).expect("shadow");
        qemu_compare(&raw, &path);
        qemu_check(&path);
        if kind == VmdkKind::MonolithicSparse {
            validate_sparse(&sparse_storage(&path)).expect("still valid");
        }
    }
    // Raw and garbage files are not VMDKs.
    assert_eq!(probe(&src).expect("probe raw"), None);
    let junk = dir.path().join("junk.vmdk");
    std::fs::write(&junk, b"# not a descriptor\nhello=1\n").expect("junk");
    assert_eq!(probe(&junk).expect("probe junk"), None);
}

#[test]
fn a_vmfs_descriptor_with_qemu_traps_is_repaired_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.vmdk");
    let img = VmdkImage::create_file(&path, 1 << 20, UUID, VmdkKind::FlatVmfs).expect("create");
    img.close().expect("close");
    let text = std::fs::read_to_string(&path).expect("descriptor");
    let cid_line = text
        .lines()
        .find(|l| l.starts_with("CID="))
        .expect("CID")
        .to_owned();
    let broken = text
        .replace(&format!("{cid_line}\n"), "")
        .replace(
            "parentCID=ffffffff\n",
            &format!("parentCID=ffffffff\n{cid_line}\n"),
        )
        .replace("createType=\"vmfs\"", "createType = \"vmfs\"");
    std::fs::write(&path, &broken).expect("break it");
    // The extent is also cut short, as a failed copy would leave it.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("t-flat.vmdk"))
        .expect("extent")
        .set_len(4096)
        .expect("truncate");
    let img = VmdkImage::open_file(&path, true).expect("open repairs");
    img.close().expect("close");
    let fixed = std::fs::read_to_string(&path).expect("descriptor");
    assert!(fixed.contains("createType=\"vmfs\""), "{fixed}");
    assert!(fixed.find("\nCID=") < fixed.find("\nparentCID="), "{fixed}");
    let info = qemu_info(&path);
    assert_eq!(info["virtual-size"], 1 << 20);
    assert_eq!(info["format-specific"]["data"]["create-type"], "vmfs");
    qemu_check(&path);
}

#[test]
fn a_4_tib_flat_image_is_sparse_and_qemu_reads_its_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 4u64 << 40;
    for kind in [VmdkKind::FlatVmfs, VmdkKind::MonolithicFlat] {
        let path = dir.path().join(format!("{kind:?}.vmdk"));
        let mut img = VmdkImage::create_file(&path, size, UUID, kind).expect("create 4 TiB");
        img.write_at(size - (1 << 20), &vec![0xab; 1 << 20])
            .expect("write the end");
        img.write_at(0, &vec![0xcd; 4096]).expect("write the start");
        img.close().expect("close");
        let extent = dir.path().join(format!("{kind:?}-flat.vmdk"));
        let meta = std::fs::metadata(&extent).expect("extent");
        assert_eq!(meta.len(), size);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 64 << 20,
            "the data file must stay sparse"
        );
        let info = qemu_info(&path);
        assert_eq!(info["virtual-size"], size, "{info}");
        qemu_check(&path);
        let read = format!("read -P 0xab {} 1M", size - (1 << 20));
        let out = run_ok(Command::new("qemu-io").args(["-r", "-f", "vmdk", "-c", &read, s(&path)]));
        assert!(!out.contains("Pattern verification failed"), "{out}");
        assert_eq!(probe(&path).expect("probe"), Some((Some(UUID), kind, size)));
    }
    let e = VmdkImage::create_file(
        &dir.path().join("s.vmdk"),
        size,
        UUID,
        VmdkKind::MonolithicSparse,
    )
    .err()
    .expect("4 TiB does not fit a sparse extent");
    assert!(e.to_string().contains("monolithicSparse"), "{e}");
    assert!(vmdk::max_size_bytes(VmdkKind::MonolithicSparse) < 2 << 40);
}

#[test]
fn stream_export_is_accepted_by_qemu_libvmdk_and_7zip() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Data, zeros and a partial last grain; more than one grain table.
    let size = (70 << 20) + 1536;
    let raw = dir.path().join("src.raw");
    let mut shadow = vec![0u8; size as usize];
    {
        let mut img = RawImage::create(&raw, size).expect("raw");
        workload(5, 300, &mut img, &mut shadow);
        // A run of zero grains across a grain-table boundary.
        img.write_zeroes(30 << 20, 6 << 20).expect("zero");
        shadow[30 << 20..36 << 20].fill(0);
        img.flush().expect("flush");
    }
    for threads in [1, 3] {
        let sub = dir.path().join(format!("t{threads}"));
        std::fs::create_dir(&sub).expect("dir");
        let out = sub.join("s.vmdk");
        let mut src = RawImage::open(&raw, false).expect("open raw");
        export_stream(&mut src, size, UUID, &out, threads).expect("export");
        validate_stream(&sparse_storage(&out)).expect("valid stream");
        qemu_compare(&raw, &out);
        qemu_check(&out);
        let info = qemu_info(&out);
        assert_eq!(info["virtual-size"], size, "{info}");
        assert_eq!(
            info["format-specific"]["data"]["create-type"],
            "streamOptimized"
        );
        let text = vmdkinfo(&out);
        assert!(text.contains("Stream optimized"), "{text}");
        sevenzip_matches(&out, &raw);
        let bytes = std::fs::read(&out).expect("stream");
        assert!(String::from_utf8_lossy(&bytes[512..1024]).contains(UUID_TEXT));
        assert!(
            export_stream(&mut src, size, UUID, &out, threads).is_err(),
            "never overwrites"
        );
    }
    assert!(
        std::fs::read(dir.path().join("t1/s.vmdk")).expect("s1")
            == std::fs::read(dir.path().join("t3/s.vmdk")).expect("s3"),
        "output does not depend on the thread count"
    );
    // An all-zero disk has no grains at all.
    let zero = dir.path().join("zero.raw");
    RawImage::create(&zero, 8 << 20).expect("zero raw");
    let out = dir.path().join("zero.vmdk");
    let mut src = RawImage::open(&zero, false).expect("open");
    export_stream(&mut src, 8 << 20, UUID, &out, 2).expect("export");
    validate_stream(&sparse_storage(&out)).expect("valid");
    assert!(std::fs::metadata(&out).expect("out").len() < 80 << 10);
    qemu_compare(&zero, &out);
}

/// Batches of random writes, each ended by a flush. Returns the batch
/// during which the storage crashed (1-based), if any, and, with
/// `states`, the shadow disk after each batch (index 0: before any).
fn crash_workload(
    img: &mut VmdkImage,
    storage: &CrashStorage,
    size: u64,
    mut states: Option<&mut Vec<Vec<u8>>>,
) -> Option<usize> {
    let mut rng = Rng(77);
    let mut shadow = vec![0u8; size as usize];
    if let Some(s) = states.as_deref_mut() {
        s.push(shadow.clone());
    }
    let mut interrupted = None;
    for batch in 0..CRASH_BATCHES {
        for _ in 0..6 {
            random_op(&mut rng, img, &mut shadow);
        }
        img.flush().expect("flush");
        if let Some(s) = states.as_deref_mut() {
            s.push(shadow.clone());
        }
        if interrupted.is_none() && storage.crashed() {
            interrupted = Some(batch + 1);
        }
    }
    interrupted
}

const CRASH_BATCHES: usize = 10;

fn crash_at_every_sync(initial: Vec<u8>, size: u64) {
    let path = Path::new("crash.vmdk");
    let start = |storage: &CrashStorage| {
        if initial.is_empty() {
            VmdkImage::create_sparse(Box::new(storage.clone()), path, size, UUID).expect("create")
        } else {
            VmdkImage::open_sparse(Box::new(storage.clone()), path, true).expect("open")
        }
    };
    // The workload is deterministic: its states, computed once.
    let mut states = Vec::new();
    let storage = CrashStorage::new(initial.clone(), None);
    let mut img = start(&storage);
    crash_workload(&mut img, &storage, size, Some(&mut states));
    drop(img);
    for n in 0u64.. {
        let storage = CrashStorage::new(initial.clone(), Some(n));
        let mut img = start(&storage);
        let crashed_before = storage.crashed();
        let interrupted = crash_workload(&mut img, &storage, size, None);
        drop(img);
        if !storage.crashed() {
            assert!(n > 10, "the workload must sync many times ({n})");
            break;
        }
        let durable = storage.durable();
        if initial.is_empty() && durable.get(..4) != Some(&b"KDMV"[..]) {
            // Cut during create: no image, and nothing that looks like one.
            assert!(crashed_before, "sync {n}: a created image lost its header");
            continue;
        }
        // The batch in flight: its old or new data may survive, per grain.
        let (old, new) = match (crashed_before, interrupted) {
            (true, _) => (0, 0),
            (false, Some(k)) => (k - 1, k),
            (false, None) => (CRASH_BATCHES, CRASH_BATCHES),
        };
        let check = |bytes: Vec<u8>, writable: bool| {
            let s = CrashStorage::new(bytes, None);
            validate_sparse(&s).unwrap_or_else(|e| panic!("sync {n}: invalid: {e}"));
            let mut img = VmdkImage::open_sparse(Box::new(s.clone()), path, writable)
                .unwrap_or_else(|e| panic!("sync {n}: cannot open: {e}"));
            let mut got = vec![0u8; size as usize];
            img.read_at(0, &mut got).expect("read");
            let (k, old, new) = (new, &states[old], &states[new]);
            for (g, chunk) in got.chunks(GRAIN as usize).enumerate() {
                let r = g * GRAIN as usize..g * GRAIN as usize + chunk.len();
                assert!(
                    chunk == &old[r.clone()] || chunk == &new[r],
                    "sync {n}: grain {g} is neither the old nor the new data of batch {k}"
                );
            }
            drop(img);
            validate_sparse(&s).unwrap_or_else(|e| panic!("sync {n}: invalid after open: {e}"));
            (got, s)
        };
        check(durable.clone(), false);
        // A writable open repairs (orphans, unclean flag) and keeps content.
        let (before, s) = check(durable, true);
        let mut img = VmdkImage::open_sparse(Box::new(s.clone()), path, true).expect("reopen");
        assert_reads(&mut img, &before);
        let mut after = before.clone();
        workload(n, 20, &mut img, &mut after);
        drop(img);
        validate_sparse(&s).expect("valid after more writes");
    }
}

#[test]
fn a_sparse_image_survives_a_power_cut_at_every_sync() {
    crash_at_every_sync(Vec::new(), (8 << 20) + 1536);
}

#[test]
fn a_sparse_image_with_grain_directory_holes_survives_a_power_cut_at_every_sync() {
    // A foreign image whose GD has no table for the first 32 MiB: the
    // table is then made at the end of the file, table before directory.
    let size = 33 << 20;
    let s = CrashStorage::new(Vec::new(), None);
    let img = VmdkImage::create_sparse(Box::new(s.clone()), Path::new("g.vmdk"), size, UUID)
        .expect("create");
    img.close().expect("close");
    let mut bytes = s.durable();
    let header = &bytes[..512];
    let rgd = u64::from_le_bytes(header[48..56].try_into().expect("8 bytes")) as usize * 512;
    let gd = u64::from_le_bytes(header[56..64].try_into().expect("8 bytes")) as usize * 512;
    for base in [gd, rgd] {
        bytes[base..base + 4].fill(0);
    }
    validate_sparse(&CrashStorage::new(bytes.clone(), None)).expect("holes are valid");
    crash_at_every_sync(bytes, size);
}

//! VHD images against the real tools: fixed and dynamic images written
//! with random writes mirrored in a raw shadow file, then checked with
//! `qemu-img compare/info`, our validators, and the independent readers
//! `vhdiinfo` (libvhdi: size, type, identifier) and `7zz` (content).
//! `qemu-img check` does not support VHD (FORMATS.md §4.1); a test pins
//! that down so we notice when it does. Crash tests cut power after every
//! sync of a workload on `CrashStorage`.
//!
//! The tools are prerequisites: a missing one fails the test (Debian:
//! `apt-get install qemu-utils libvhdi-utils 7zip`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tidemark_receiver::image::raw::RawImage;
use tidemark_receiver::image::storage::{CrashStorage, FileStorage, Storage};
use tidemark_receiver::image::vhd::dynamic::MAX_SIZE_BYTES;
use tidemark_receiver::image::vhd::{
    export_dynamic, probe, validate_dynamic, validate_fixed, DynamicVhd, FixedVhd, VhdKind,
};
use tidemark_receiver::image::{DiskUuid, Image, ImageError};

const UUID: DiskUuid = [
    0x60, 0x00, 0xc2, 0x9a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6,
];
const BLOCK: u64 = 2 << 20;

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

fn qemu_compare(raw: &Path, vhd: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "vpc"])
            .args([s(raw), s(vhd)]),
    );
}

fn qemu_size(vhd: &Path) -> u64 {
    let text =
        run_ok(Command::new("qemu-img").args(["info", "--output=json", "-f", "vpc", s(vhd)]));
    let v: serde_json::Value = serde_json::from_str(&text).expect("qemu-img info json");
    assert_eq!(v["format"], "vpc", "{v}");
    v["virtual-size"].as_u64().expect("virtual-size")
}

/// `qemu-img check` has no VHD support (exit 63); should a qemu add it,
/// this fails and the tests should start using it.
fn qemu_check_is_unsupported(vhd: &Path) {
    let (rc, text) = run(Command::new("qemu-img").args(["check", "-f", "vpc", s(vhd)]));
    assert_eq!(rc, 63, "qemu-img check now supports vpc? use it: {text}");
    assert!(text.contains("does not support checks"), "{text}");
}

/// What libvhdi says: (disk type, media size, identifier).
fn vhdiinfo(vhd: &Path) -> (String, u64, DiskUuid) {
    let text = run_ok(Command::new("vhdiinfo").arg(s(vhd)));
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|r| r.trim().strip_prefix(':'))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("vhdiinfo prints no {name}: {text}"))
    };
    let media = field("Media size");
    let bytes = media
        .rsplit_once('(')
        .and_then(|(_, b)| b.strip_suffix(" bytes)"))
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("media size {media:?}"));
    let hex: String = field("Identifier").chars().filter(|c| *c != '-').collect();
    let mut uuid = [0u8; 16];
    for (i, b) in uuid.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("identifier hex");
    }
    (field("Disk type"), bytes, uuid)
}

/// 7-Zip extracts the disk; it must equal the shadow.
fn sevenzip_matches(vhd: &Path, shadow: &Path) {
    run_ok(Command::new("7zz").args(["t", s(vhd)]));
    let out = tempfile::tempdir().expect("tempdir");
    run_ok(
        Command::new("7zz")
            .args(["x", "-y"])
            .arg(format!("-o{}", s(out.path())))
            .arg(s(vhd)),
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
        "7zz extracted other content from {}",
        vhd.display()
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

/// One random operation, applied to the image and to the shadow: small and
/// unaligned, block-sized, multi-block, the last (partial) block, zeros
/// written as data and as `write_zeroes`.
fn random_op(rng: &mut Rng, img: &mut dyn Image, shadow: &mut [u8]) {
    let size = shadow.len() as u64;
    let len = match rng.below(4) {
        0 => 1 + rng.below(4096),
        1 => 1 + rng.below(3 * BLOCK),
        2 => BLOCK * (1 + rng.below(2)),
        _ => 1 + rng.below(700),
    }
    .min(size);
    let off = match rng.below(5) {
        0 => size - len,
        1 => (rng.below(size / BLOCK) * BLOCK).min((size - len) / BLOCK * BLOCK),
        _ => rng.below(size - len + 1),
    };
    let (o, l) = (off as usize, len as usize);
    match rng.below(6) {
        0 => {
            img.write_zeroes(off, len).expect("write_zeroes");
            shadow[o..o + l].fill(0);
        }
        1 => {
            img.write_at(off, &vec![0u8; l]).expect("write zeros");
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

fn file_storage(path: &Path) -> FileStorage {
    FileStorage::new(std::fs::File::open(path).expect("open"))
}

/// A size whose last 2 MiB block is partial.
const SIZE: u64 = (40 << 20) + 3 * 512;

fn create(path: &Path, size: u64, kind: VhdKind) -> Box<dyn Image> {
    match kind {
        VhdKind::Dynamic => Box::new(DynamicVhd::create_file(path, size, UUID).expect("create")),
        VhdKind::Fixed => Box::new(FixedVhd::create_file(path, size, UUID).expect("create")),
    }
}

fn open(path: &Path, kind: VhdKind) -> Box<dyn Image> {
    match kind {
        VhdKind::Dynamic => Box::new(DynamicVhd::open_file(path, true).expect("open")),
        VhdKind::Fixed => Box::new(FixedVhd::open_file(path, true).expect("open")),
    }
}

fn validate(path: &Path, kind: VhdKind) {
    match kind {
        VhdKind::Dynamic => validate_dynamic(&file_storage(path)).expect("valid dynamic"),
        VhdKind::Fixed => validate_fixed(&file_storage(path)).expect("valid fixed"),
    }
}

/// Every check we have of `path` against the disk in `raw`.
fn check_all(path: &Path, raw: &Path, kind: VhdKind, size: u64) {
    qemu_compare(raw, path);
    assert_eq!(qemu_size(path), size);
    qemu_check_is_unsupported(path);
    validate(path, kind);
    let (disk_type, media, uuid) = vhdiinfo(path);
    let want_type = match kind {
        VhdKind::Dynamic => "Dynamic",
        VhdKind::Fixed => "Fixed",
    };
    assert_eq!((disk_type.as_str(), media, uuid), (want_type, size, UUID));
    assert_eq!(probe(path).expect("probe"), Some((UUID, kind, size)));
    sevenzip_matches(path, raw);
}

#[test]
fn both_kinds_match_their_shadow_in_qemu_libvhdi_and_7zip() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, kind) in [VhdKind::Dynamic, VhdKind::Fixed].into_iter().enumerate() {
        let path = dir.path().join(format!("disk{i}.vhd"));
        let mut shadow = vec![0u8; SIZE as usize];
        let mut img = create(&path, SIZE, kind);
        workload(100 + i as u64, 300, img.as_mut(), &mut shadow);
        drop(img);
        // Reopened: more writes on top, then checked.
        let mut img = open(&path, kind);
        assert_reads(img.as_mut(), &shadow);
        workload(200 + i as u64, 100, img.as_mut(), &mut shadow);
        drop(img);
        let raw = dir.path().join(format!("shadow{i}.raw"));
        std::fs::write(&raw, &shadow).expect("shadow");
        check_all(&path, &raw, kind, SIZE);
        let bytes = std::fs::read(&path).expect("image");
        let footer = &bytes[bytes.len() - 512..];
        assert_eq!(&footer[28..32], b"win ", "creator Azure and Hyper-V want");
        if kind == VhdKind::Dynamic {
            assert_eq!(&bytes[..512], footer, "head copy = tail");
        }
    }
}

#[test]
fn qemu_writes_into_our_dynamic_image_and_we_read_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.vhd");
    let mut shadow = vec![0u8; SIZE as usize];
    let mut img = DynamicVhd::create_file(&path, SIZE, UUID).expect("create");
    workload(7, 80, &mut img, &mut shadow);
    img.close().expect("close");
    // qemu appends its blocks 512-aligned after ours.
    for (pattern, off, len) in [(0x5a, 100000, 200000), (0x6b, 37 << 20, 3 << 20)] {
        let cmd = format!("write -P {pattern:#x} {off} {len}");
        run_ok(Command::new("qemu-io").args(["-f", "vpc", "-c", &cmd, s(&path)]));
        shadow[off..off + len].fill(pattern);
    }
    validate_dynamic(&file_storage(&path)).expect("valid after qemu wrote");
    let mut img = DynamicVhd::open_file(&path, true).expect("open");
    assert_reads(&mut img, &shadow);
    workload(8, 80, &mut img, &mut shadow);
    img.close().expect("close");
    let raw = dir.path().join("shadow.raw");
    std::fs::write(&raw, &shadow).expect("shadow");
    check_all(&path, &raw, VhdKind::Dynamic, SIZE);
}

#[test]
fn images_made_by_qemu_are_probed_opened_and_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; SIZE as usize];
    let mut rng = Rng(42);
    for _ in 0..30 {
        let off = rng.below(SIZE - 300000) as usize;
        let n = 1 + rng.below(300000) as usize;
        let d = rng.bytes(n);
        data[off..off + n].copy_from_slice(&d);
    }
    std::fs::write(&src, &data).expect("src");
    for (name, kind, opts) in [
        ("d.vhd", VhdKind::Dynamic, "subformat=dynamic"),
        ("f.vhd", VhdKind::Fixed, "subformat=fixed"),
        (
            "dfs.vhd",
            VhdKind::Dynamic,
            "subformat=dynamic,force_size=on",
        ),
        ("ffs.vhd", VhdKind::Fixed, "subformat=fixed,force_size=on"),
    ] {
        // Empty, from `qemu-img create`: qemu's random id, read by libvhdi.
        let empty = dir.path().join(format!("empty-{name}"));
        run_ok(
            Command::new("qemu-img")
                .args(["create", "-f", "vpc", "-o", opts])
                .args([s(&empty), &SIZE.to_string()]),
        );
        let size = qemu_size(&empty);
        let (_, media, qemu_uuid) = vhdiinfo(&empty);
        assert_eq!(media, size, "libvhdi and qemu agree on qemu's own image");
        assert_eq!(probe(&empty).expect("probe"), Some((qemu_uuid, kind, size)));
        assert_ne!(qemu_uuid, [0; 16]);
        match kind {
            VhdKind::Dynamic => {
                validate_dynamic(&file_storage(&empty)).expect("qemu's empty dynamic validates")
            }
            VhdKind::Fixed => {
                validate_fixed(&file_storage(&empty)).expect("qemu's empty fixed validates")
            }
        }

        // With data, from `qemu-img convert`, then written by us.
        let path = dir.path().join(name);
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "vpc", "-o", opts])
                .args([s(&src), s(&path)]),
        );
        let size = qemu_size(&path);
        assert!(size >= SIZE, "qemu rounds up to CHS ({size})");
        let (_, _, uuid) = vhdiinfo(&path);
        assert_eq!(probe(&path).expect("probe"), Some((uuid, kind, size)));
        validate(&path, kind);
        let mut mine = data.clone();
        mine.resize(size as usize, 0);
        let mut img = open(&path, kind);
        assert_eq!(img.size_bytes(), size);
        assert_reads(img.as_mut(), &mine);
        workload(9, 120, img.as_mut(), &mut mine);
        drop(img);
        let raw = dir.path().join("mine.raw");
        std::fs::write(&raw, &mine).expect("shadow");
        qemu_compare(&raw, &path);
        assert_eq!(qemu_size(&path), size);
        assert_eq!(vhdiinfo(&path).1, size);
        validate(&path, kind);
        sevenzip_matches(&path, &raw);
    }
}

#[test]
fn probe_says_none_or_error_for_other_files_and_never_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = dir.path().join("ours.vhd");
    let mut img = DynamicVhd::create_file(&ours, 6 << 20, UUID).expect("create");
    img.write_at(1 << 20, &[3u8; 3 << 20]).expect("write");
    img.close().expect("close");
    let qemu = dir.path().join("qemu.vhd");
    run_ok(Command::new("qemu-img").args(["create", "-f", "vpc", s(&qemu), "5M"]));
    let p = dir.path().join("x");
    for bytes in [&b""[..], b"hello", &[0u8; 4096], b"conectix", &[0xff; 1536]] {
        std::fs::write(&p, bytes).expect("write");
        assert_eq!(probe(&p).expect("probe"), None, "{bytes:?}");
    }
    // A raw disk is no VHD.
    let raw = dir.path().join("r.raw");
    RawImage::create(&raw, 1 << 20).expect("raw");
    assert_eq!(probe(&raw).expect("probe raw"), None);
    // A damaged head copy is an error, not "no VHD".
    let mut b = std::fs::read(&ours).expect("ours");
    b[40] ^= 1;
    let n = b.len();
    b[n - 512] = b'x';
    std::fs::write(&p, &b).expect("write");
    assert!(matches!(probe(&p), Err(ImageError::Format { .. })));
    // Truncations and random damage of ours and qemu's: never a panic.
    let mut rng = Rng(3);
    for src in [&ours, &qemu] {
        let good = std::fs::read(src).expect("image");
        for i in 0..400 {
            let mut b = good.clone();
            if i % 2 == 0 {
                b.truncate(rng.below(b.len() as u64 + 1) as usize);
            }
            for _ in 0..rng.below(4) {
                if b.is_empty() {
                    break;
                }
                let at = rng.below(b.len() as u64) as usize;
                b[at] = rng.next() as u8;
            }
            std::fs::write(&p, &b).expect("write");
            let _ = probe(&p);
            if let Ok(mut img) = DynamicVhd::open_file(&p, false) {
                let mut buf = vec![0u8; img.size_bytes().min(8 << 20) as usize];
                let _ = img.read_at(0, &mut buf);
            }
        }
    }
}

#[test]
fn export_is_accepted_by_qemu_libvhdi_and_7zip() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Data, zeros and a partial last block.
    let size = (70 << 20) + 1536;
    let raw = dir.path().join("src.raw");
    let mut shadow = vec![0u8; size as usize];
    {
        let mut img = RawImage::create(&raw, size).expect("raw");
        workload(5, 300, &mut img, &mut shadow);
        img.write_zeroes(30 << 20, 6 << 20).expect("zero");
        shadow[30 << 20..36 << 20].fill(0);
        img.flush().expect("flush");
    }
    let out = dir.path().join("e.vhd");
    let mut src = RawImage::open(&raw, false).expect("open raw");
    export_dynamic(&mut src, size, UUID, &out).expect("export");
    check_all(&out, &raw, VhdKind::Dynamic, size);
    assert!(
        export_dynamic(&mut src, size, UUID, &out).is_err(),
        "never overwrites"
    );
    // The export reads back through our own writer, and takes writes.
    let mut img = DynamicVhd::open_file(&out, true).expect("open export");
    assert_reads(&mut img, &shadow);
    workload(6, 50, &mut img, &mut shadow);
    img.close().expect("close");
    std::fs::write(&raw, &shadow).expect("shadow");
    check_all(&out, &raw, VhdKind::Dynamic, size);
    // An all-zero disk has no blocks at all.
    let zero = dir.path().join("zero.raw");
    RawImage::create(&zero, 64 << 20).expect("zero raw");
    let out = dir.path().join("zero.vhd");
    let mut src = RawImage::open(&zero, false).expect("open");
    export_dynamic(&mut src, 64 << 20, UUID, &out).expect("export");
    validate_dynamic(&file_storage(&out)).expect("valid");
    assert!(std::fs::metadata(&out).expect("out").len() < 8 << 10);
    qemu_compare(&zero, &out);
}

#[test]
fn the_2040_gib_limit_is_refused_at_create_and_leaves_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big.vhd");
    let e = DynamicVhd::create_file(&big, MAX_SIZE_BYTES + 512, UUID)
        .err()
        .expect("too large");
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
    assert!(!e.to_string().contains('\n'));
    assert!(!big.exists(), "no file left behind");
    let raw = dir.path().join("r.raw");
    let mut src = RawImage::create(&raw, 1 << 20).expect("raw");
    let e = export_dynamic(&mut src, 3 << 40, UUID, &big).expect_err("too large");
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
    assert!(!big.exists());
    // Exactly the limit works, and its end is readable in qemu.
    let mut img = DynamicVhd::create_file(&big, MAX_SIZE_BYTES, UUID).expect("2040 GiB");
    img.write_at(MAX_SIZE_BYTES - 4096, &[0xab; 4096])
        .expect("write the end");
    img.close().expect("close");
    assert_eq!(qemu_size(&big), MAX_SIZE_BYTES);
    assert_eq!(vhdiinfo(&big).1, MAX_SIZE_BYTES);
    validate_dynamic(&file_storage(&big)).expect("valid");
    let read = format!("read -P 0xab {} 4096", MAX_SIZE_BYTES - 4096);
    let out = run_ok(Command::new("qemu-io").args(["-r", "-f", "vpc", "-c", &read, s(&big)]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// Checks, after every write, that the file ends with the head footer: a
/// killed process (page cache intact) leaves an image as it is.
struct TailChecked {
    inner: CrashStorage,
    armed: Arc<AtomicBool>,
}

impl TailChecked {
    fn check(&self) {
        if !self.armed.load(Ordering::SeqCst) {
            return;
        }
        let live = self.inner.live();
        assert!(
            live.len() >= 1024 && live[..512] == live[live.len() - 512..],
            "the file does not end with its footer after a write"
        );
    }
}

impl Storage for TailChecked {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(data, offset)?;
        self.check();
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)?;
        self.check();
        Ok(())
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn punch_hole(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)?;
        self.check();
        Ok(())
    }
}

#[test]
fn the_file_ends_with_its_footer_after_every_write() {
    let armed = Arc::new(AtomicBool::new(false));
    let storage = TailChecked {
        inner: CrashStorage::new(Vec::new(), None),
        armed: armed.clone(),
    };
    let size = (20 << 20) + 1536;
    let mut img =
        DynamicVhd::create(Box::new(storage), Path::new("t.vhd"), size, UUID).expect("create");
    armed.store(true, Ordering::SeqCst);
    let mut shadow = vec![0u8; size as usize];
    workload(11, 200, &mut img, &mut shadow);
}

const CRASH_BATCHES: usize = 10;

/// Batches of random writes, each ended by a flush. Returns the batch
/// during which the storage crashed (1-based), and, with `states`, the
/// shadow disk after each batch (index 0: before any).
fn crash_workload(
    img: &mut dyn Image,
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
        for _ in 0..5 {
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

fn crash_at_every_sync(kind: VhdKind) {
    let size = (12 << 20) + 1536;
    let path = Path::new("crash.vhd");
    let start = |storage: &CrashStorage| -> Box<dyn Image> {
        let st = Box::new(storage.clone());
        match kind {
            VhdKind::Dynamic => Box::new(DynamicVhd::create(st, path, size, UUID).expect("create")),
            VhdKind::Fixed => Box::new(FixedVhd::create(st, path, size, UUID).expect("create")),
        }
    };
    let reopen = |storage: &CrashStorage, writable: bool| -> Result<Box<dyn Image>, ImageError> {
        let st = Box::new(storage.clone());
        Ok(match kind {
            VhdKind::Dynamic => Box::new(DynamicVhd::open(st, path, writable)?),
            VhdKind::Fixed => Box::new(FixedVhd::open(st, path, writable)?),
        })
    };
    let mut states = Vec::new();
    let storage = CrashStorage::new(Vec::new(), None);
    let mut img = start(&storage);
    crash_workload(img.as_mut(), &storage, size, Some(&mut states));
    drop(img);
    let dir = tempfile::tempdir().expect("tempdir");
    let (file, raw) = (dir.path().join("c.vhd"), dir.path().join("c.raw"));
    let mut tested = 0;
    for n in 0u64.. {
        let storage = CrashStorage::new(Vec::new(), Some(n));
        let mut img = start(&storage);
        let crashed_before = storage.crashed();
        let interrupted = crash_workload(img.as_mut(), &storage, size, None);
        drop(img);
        if !storage.crashed() {
            assert!(n > 10, "the workload must sync many times ({n})");
            break;
        }
        let durable = storage.durable();
        if crashed_before {
            // Cut during create: no image, and nothing that looks like one.
            let s = CrashStorage::new(durable, None);
            assert!(
                reopen(&s, false).is_err(),
                "sync {n}: a half-created image opens"
            );
            continue;
        }
        let (old, new) = match interrupted {
            Some(k) => (k - 1, k),
            None => (CRASH_BATCHES, CRASH_BATCHES),
        };
        // qemu reads the cut image as it is (it trusts the head copy).
        std::fs::write(&file, &durable).expect("cut image");
        let s = CrashStorage::new(durable, None);
        let mut got = vec![0u8; size as usize];
        reopen(&s, false)
            .unwrap_or_else(|e| panic!("sync {n}: cannot open read-only: {e}"))
            .read_at(0, &mut got)
            .expect("read");
        std::fs::write(&raw, &got).expect("raw");
        qemu_compare(&raw, &file);
        // A writable open repairs; then everything must hold.
        let mut img = reopen(&s, true).unwrap_or_else(|e| panic!("sync {n}: cannot open: {e}"));
        let mut after = vec![0u8; size as usize];
        img.read_at(0, &mut after).expect("read");
        assert!(after == got, "sync {n}: repair changed the content");
        drop(img);
        let valid = match kind {
            VhdKind::Dynamic => validate_dynamic(&s),
            VhdKind::Fixed => validate_fixed(&s),
        };
        valid.unwrap_or_else(|e| panic!("sync {n}: invalid after repair: {e}"));
        for (b, chunk) in got.chunks(BLOCK as usize).enumerate() {
            let r = b * BLOCK as usize..b * BLOCK as usize + chunk.len();
            assert!(
                chunk == &states[old][r.clone()] || chunk == &states[new][r],
                "sync {n}: block {b} is neither the old nor the new data of batch {new}"
            );
        }
        std::fs::write(&file, s.durable()).expect("repaired image");
        qemu_compare(&raw, &file);
        assert_eq!(qemu_size(&file), size);
        assert_eq!(vhdiinfo(&file).1, size, "libvhdi reads the repaired tail");
        // And it takes more writes.
        let mut img = reopen(&s, true).expect("reopen");
        workload(n, 20, img.as_mut(), &mut got);
        drop(img);
        tested += 1;
    }
    assert!(tested > 5, "{tested} cut points");
}

#[test]
fn a_dynamic_image_survives_a_power_cut_at_every_sync() {
    crash_at_every_sync(VhdKind::Dynamic);
}

#[test]
fn a_fixed_image_survives_a_power_cut_at_every_sync() {
    crash_at_every_sync(VhdKind::Fixed);
}

//! VHD writer throughput against qemu-img.
//!
//! The same mixed disk as examples/vmdk_bench.rs (random, compressible and
//! zero MiB; deterministic PRNG) is written into a dynamic and a fixed VHD
//! through the `Image` trait, the way the receiver writes a replica (1 MiB
//! sequential `write_at`, zero MiB as `write_zeroes`, one `flush`, close),
//! and exported with `export_dynamic`. Beside each: `qemu-img convert -f
//! raw -O vpc -o subformat=…` of a raw file with the same bytes. Prints
//! the median of the runs and the ratio ours/qemu (below 1: we are faster).
//!
//! `qemu-img convert` writes with `cache=unsafe` by default: it never
//! syncs the data it converted (one fdatasync, at create, before any
//! data; checked with strace). Ours returns with the image durable, so
//! the qemu time compared ("qemu s") includes an fsync of its output
//! right after it exits; "qemu nosync" is the bare convert, for reference.
//!
//! `--only fixed` runs just the cases whose name contains `fixed`.
//!
//! ```text
//! cargo run --release -p tidemark-receiver --example vhd_bench -- [--size-mib 2048] [--runs 3]
//! ```
//! Files go to /var/tmp/tidemark-vhd-bench-<pid> and are deleted at the end.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tidemark_receiver::image::raw::RawImage;
use tidemark_receiver::image::vhd::{export_dynamic, DynamicVhd, FixedVhd, VhdKind};
use tidemark_receiver::image::Image;

const MIB: usize = 1 << 20;
const UUID: [u8; 16] = [
    0x60, 0x00, 0xc2, 0x9a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6,
];

/// Removes the scratch directory however the program ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// What MiB `i` of the disk holds: 40 % random, 35 % compressible text,
/// 25 % zeros (a hole in the raw file).
fn fill_mib(rng: &mut Rng, i: usize, buf: &mut [u8]) -> bool {
    match rng.next() % 20 {
        0..=7 => {
            for c in buf.chunks_exact_mut(8) {
                c.copy_from_slice(&rng.next().to_le_bytes());
            }
            true
        }
        8..=14 => {
            let mut line = 0usize;
            let mut at = 0;
            while at < buf.len() {
                let word = ["lorem", "ipsum", "dolor", "sit", "amet", "block", "disk"]
                    [(rng.next() % 7) as usize];
                let text = format!(
                    "{i:06} {line:05} {word} {:08x}\n",
                    rng.next() as u32 & 0xfff
                );
                let n = text.len().min(buf.len() - at);
                buf[at..at + n].copy_from_slice(&text.as_bytes()[..n]);
                at += n;
                line += 1;
            }
            true
        }
        _ => {
            buf.fill(0);
            false
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn remove_vhd(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("scratch dir").flatten() {
        if e.path().extension().is_some_and(|x| x == "vhd") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn output_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("scratch dir")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "vhd"))
        .map(|e| e.metadata().map(|m| m.blocks() * 512).unwrap_or(0))
        .sum()
}

/// Writes `src` into a new image of `kind` the way the receiver does: the
/// MiB the replication stream marks as zero (`zero`) as `write_zeroes`.
fn ours_live(src: &File, zero: &[bool], out: &Path, kind: VhdKind) {
    let size = (zero.len() * MIB) as u64;
    let mut img: Box<dyn Image> = match kind {
        VhdKind::Dynamic => Box::new(DynamicVhd::create_file(out, size, UUID).expect("create")),
        VhdKind::Fixed => Box::new(FixedVhd::create_file(out, size, UUID).expect("create")),
    };
    let mut buf = vec![0u8; MIB];
    for (i, &z) in zero.iter().enumerate() {
        let off = (i * MIB) as u64;
        if z {
            img.write_zeroes(off, MIB as u64).expect("write_zeroes");
        } else {
            src.read_exact_at(&mut buf, off).expect("read source");
            img.write_at(off, &buf).expect("write");
        }
    }
    img.flush().expect("flush");
}

fn qemu_convert(src: &Path, out: &Path, subformat: &str) {
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vpc", "-o"])
        .arg(format!("subformat={subformat}"))
        .arg(src)
        .arg(out)
        .status()
        .expect("run qemu-img (is qemu-utils installed?)");
    assert!(st.success(), "qemu-img convert failed");
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size_mib = arg(&args, "--size-mib", 2048);
    let runs = arg(&args, "--runs", 3).max(1);
    // Runs only the cases whose name contains this (one case alone: the
    // earlier cases' writeback does not weigh on it).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let size = (size_mib * MIB) as u64;
    let scratch = Scratch(PathBuf::from(format!(
        "/var/tmp/tidemark-vhd-bench-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&scratch.0).expect("scratch dir");
    let dir = scratch.0.clone();

    // The source: a sparse raw file (zero MiB are holes), then read once
    // so both sides start from the page cache.
    let src_path = dir.join("src.raw");
    let mut kinds = [0usize; 2];
    let mut zero = vec![false; size_mib];
    {
        let raw = RawImage::create(&src_path, size).expect("source");
        drop(raw);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&src_path)
            .expect("source");
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut buf = vec![0u8; MIB];
        for (i, z) in zero.iter_mut().enumerate() {
            let data = fill_mib(&mut rng, i, &mut buf);
            kinds[usize::from(data)] += 1;
            *z = !data;
            if data {
                f.write_all_at(&buf, (i * MIB) as u64)
                    .expect("write source");
            }
        }
        f.sync_all().expect("sync source");
    }
    let src = File::open(&src_path).expect("source");
    let mut buf = vec![0u8; MIB];
    for i in 0..size_mib {
        src.read_exact_at(&mut buf, (i * MIB) as u64).expect("warm");
    }
    println!(
        "disk: {size_mib} MiB ({} MiB data, {} MiB zeros); {runs} runs; median seconds; {} cores",
        kinds[1],
        kinds[0],
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<26} {:>7} {:>7} {:>10} {:>12} {:>10} {:>10}   runs (s)",
        "case", "ours s", "qemu s", "ours/qemu", "qemu nosync", "ours MiB", "qemu MiB"
    );

    let out = dir.join("out.vhd");
    type Ours<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, Ours, &str)> = vec![
        (
            "dynamic (live writer)",
            Box::new(|| ours_live(&src, &zero, &out, VhdKind::Dynamic)),
            "dynamic",
        ),
        (
            "dynamic (export_dynamic)",
            Box::new(|| {
                let mut raw = RawImage::open(&src_path, false).expect("source");
                export_dynamic(&mut raw, size, UUID, &out).expect("export");
            }),
            "dynamic",
        ),
        (
            "fixed (live writer)",
            Box::new(|| ours_live(&src, &zero, &out, VhdKind::Fixed)),
            "fixed",
        ),
    ];
    // One untimed pass first: the first write after the source was made
    // is slowed by page-cache and filesystem warm-up.
    ours_live(&src, &zero, &out, VhdKind::Fixed);
    remove_vhd(&dir);
    for (name, ours, subformat) in cases {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let mut t_ours = Vec::new();
        let mut t_qemu = Vec::new();
        let mut t_nosync = Vec::new();
        let (mut b_ours, mut b_qemu) = (0, 0);
        for _ in 0..runs {
            // Start each run with no writeback of the previous one pending.
            nix::unistd::sync();
            let t = Instant::now();
            ours();
            t_ours.push(t.elapsed().as_secs_f64());
            b_ours = output_bytes(&dir);
            remove_vhd(&dir);
            nix::unistd::sync();
            let t = Instant::now();
            qemu_convert(&src_path, &out, subformat);
            t_nosync.push(t.elapsed().as_secs_f64());
            File::open(&out)
                .and_then(|f| f.sync_all())
                .expect("fsync qemu's output");
            t_qemu.push(t.elapsed().as_secs_f64());
            b_qemu = output_bytes(&dir);
            remove_vhd(&dir);
        }
        let runs_text = |v: &[f64]| {
            v.iter()
                .map(|t| format!("{t:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let all = format!("ours {} / qemu {}", runs_text(&t_ours), runs_text(&t_qemu));
        let (o, q, qn) = (median(&t_ours), median(&t_qemu), median(&t_nosync));
        let (mo, mq) = (b_ours >> 20, b_qemu >> 20);
        println!(
            "{name:<26} {o:>7.2} {q:>7.2} {:>10.2} {qn:>12.2} {mo:>10} {mq:>10}   {all}",
            o / q
        );
    }
}

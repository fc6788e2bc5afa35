//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs` call
//! [`run`]), so the seed corpus in `fuzz/corpus/<target>/` is replayed by a
//! normal test (`tests/tests/fuzz_corpus.rs`) through exactly the code the
//! fuzzer runs. Every parser that reads bytes from the network or from
//! disk is here; none may panic, whatever the input.

use tidemark_agent::tracking::DirtyMap;
use tidemark_common::proto::{Message, SumKind};
use tidemark_receiver::image::storage::CrashStorage;
use tidemark_receiver::image::vhd::{self, footer::Footer};
use tidemark_receiver::image::vmdk::sparse_header::SparseHeader;
use tidemark_receiver::image::vmdk::{self, descriptor, VmdkImage};
use tidemark_receiver::image::Image;

/// Every target, named as in `fuzz/fuzz_targets/`.
pub const TARGETS: &[&str] = &[
    "frame",
    "vmdk_descriptor",
    "vmdk_sparse",
    "vmdk_stream",
    "vhd_footer",
    "vhd_dynamic",
    "undo_journal",
    "point_log",
    "receiver_config",
    "agent_config",
    "dirty_map",
    "trace_page",
    "trace_format",
];

/// Feeds `data` to `target`'s parser; true if it was accepted as valid.
/// Panics only for an unknown target name.
pub fn run(target: &str, data: &[u8]) -> bool {
    match target {
        "frame" => match Message::decode(data) {
            // An extent's payload goes through the bounded decompressor
            // and the checksum, as in the receiver.
            Ok(Message::Extent(e)) => {
                let mut z = zstd::bulk::Decompressor::new().expect("zstd context");
                let mut scratch = Vec::new();
                e.unpack(&mut z, &mut scratch).is_ok()
            }
            Ok(_) => true,
            Err(_) => false,
        },
        "vmdk_descriptor" => {
            let parsed = descriptor::parse_bytes(data);
            if let Ok(text) = std::str::from_utf8(data) {
                let _ = descriptor::fix_header_traps(text);
                let _ = descriptor::find_uuid(text);
            }
            parsed.is_ok()
        }
        "vmdk_sparse" => {
            if let Some(h) = data.get(..512) {
                let _ = SparseHeader::decode(h.try_into().expect("512 bytes"));
            }
            let valid = vmdk::validate_sparse(&CrashStorage::new(data.to_vec(), None)).is_ok();
            // Opening for writing runs crash recovery on these bytes.
            for writable in [false, true] {
                let storage = Box::new(CrashStorage::new(data.to_vec(), None));
                if let Ok(mut img) =
                    VmdkImage::open_sparse(storage, std::path::Path::new("fuzz.vmdk"), writable)
                {
                    let size = img.size_bytes();
                    let mut buf = vec![0u8; 65536];
                    for at in [0, size / 2, size.saturating_sub(65536)] {
                        let n = (size - at.min(size)).min(65536) as usize;
                        let _ = img.read_at(at, &mut buf[..n]);
                    }
                }
            }
            valid
        }
        "vmdk_stream" => vmdk::validate_stream(&CrashStorage::new(data.to_vec(), None)).is_ok(),
        "vhd_footer" => Footer::decode(data).is_ok(),
        "vhd_dynamic" => {
            let path = std::path::Path::new("fuzz.vhd");
            let storage = CrashStorage::new(data.to_vec(), None);
            let _ = vhd::probe_storage(&storage, path);
            let valid = vhd::validate_dynamic(&storage).is_ok();
            // A writable open repairs the tail and orphans on these bytes.
            for writable in [false, true] {
                let storage = Box::new(CrashStorage::new(data.to_vec(), None));
                if let Ok(mut img) = vhd::DynamicVhd::open(storage, path, writable) {
                    let size = img.size_bytes();
                    let mut buf = vec![0u8; 65536];
                    for at in [0, size / 2, size.saturating_sub(65536)] {
                        let n = (size - at.min(size)).min(65536) as usize;
                        let _ = img.read_at(at, &mut buf[..n]);
                    }
                    if writable && size >= 4096 {
                        let _ = img.write_at(size / 3 / 512 * 512, &[0x5a; 4096]);
                        let _ = img.flush();
                    }
                }
            }
            valid
        }
        "undo_journal" => {
            use tidemark_receiver::journal::undo::{decode_all, is_padding};
            let (records, valid) = decode_all(data);
            !records.is_empty() && is_padding(&data[valid..])
        }
        "point_log" => tidemark_receiver::journal::points::decode(data).is_ok(),
        "receiver_config" => std::str::from_utf8(data).is_ok_and(|t| {
            toml::from_str::<tidemark_receiver::config::ReceiverConfig>(t)
                .is_ok_and(|c| c.validate().is_ok())
        }),
        "agent_config" => std::str::from_utf8(data)
            .is_ok_and(|t| toml::from_str::<tidemark_agent::config::AgentConfig>(t).is_ok()),
        "dirty_map" => DirtyMap::from_bytes(data).is_ok(),
        "trace_page" => {
            let mut events = 0u64;
            let _ = tidemark_agent::tracking::page::decode(data, |_, _| events += 1);
            events > 0
        }
        "trace_format" => {
            // "<id>\0<format file>": the event id file, then the format.
            let text = String::from_utf8_lossy(data);
            let (id, format) = text.split_once('\0').unwrap_or(("", &text));
            let _ = tidemark_agent::tracking::format::parse_fields(format);
            match tidemark_agent::tracking::format::layout(id, format) {
                Ok(layout) => {
                    let _ = layout.decode(data);
                    true
                }
                Err(_) => false,
            }
        }
        other => panic!(
            "unknown fuzz target {other:?}; targets: {}",
            TARGETS.join(", ")
        ),
    }
}

/// Valid inputs for every target, made by the project's own writers: the
/// seed corpus (`cargo run -p tidemark-tests --example fuzz_seeds` writes
/// them to `fuzz/corpus/`), and each must be accepted by [`run`].
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    use tidemark_common::proto::messages::Extent;
    use tidemark_common::proto::PointKind;
    let mut out: Vec<(&'static str, &'static str, Vec<u8>)> = Vec::new();
    let body = |m: &Message| {
        let mut b = Vec::new();
        m.encode_body(&mut b);
        b
    };
    let text = b"the quick brown fox jumps over the lazy dog ".repeat(200);
    let mut z = zstd::bulk::Compressor::new(1).expect("zstd");
    out.push((
        "frame",
        "valid-extent-zstd",
        body(&Message::Extent(Extent::pack(
            7,
            0,
            4096,
            &text,
            SumKind::Blake3,
            Some(&mut z),
        ))),
    ));
    out.push((
        "frame",
        "valid-extent-raw",
        body(&Message::Extent(Extent::pack(
            8,
            1,
            0,
            &[9u8; 512],
            SumKind::Crc32c,
            None,
        ))),
    ));
    out.push((
        "frame",
        "valid-zero",
        body(&Message::Zero {
            seq: 9,
            disk: 0,
            offset_bytes: 1 << 20,
            len_bytes: 4096,
        }),
    ));
    out.push((
        "frame",
        "valid-point",
        body(&Message::Point {
            seq: 10,
            kind: PointKind::AppConsistent,
            name: "nightly".into(),
            agent_time_ms: 1,
        }),
    ));
    out.push((
        "frame",
        "valid-hash-request",
        body(&Message::HashRequest {
            seq: 11,
            disk: 0,
            offset_bytes: 0,
            len_bytes: 1 << 20,
            block_bytes: 4096,
        }),
    ));
    out.push((
        "frame",
        "valid-hashes",
        body(&Message::Hashes {
            seq: 11,
            disk: 0,
            offset_bytes: 0,
            block_bytes: 4096,
            hashes: vec![[3u8; 32]; 4],
        }),
    ));
    out.push((
        "frame",
        "valid-register",
        body(&Message::RegisterDisk {
            disk_id: "web-01".into(),
            size_bytes: 1 << 30,
            logical_block_bytes: 512,
        }),
    ));

    let uuid = [0x60, 0, 0xc2, 0x9a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
    let flat = descriptor::flat(descriptor::FlatKind::Vmfs, 1 << 30, "web-flat.vmdk", &uuid);
    out.push(("vmdk_descriptor", "valid-vmfs", flat.into_bytes()));
    let hosted = descriptor::flat(
        descriptor::FlatKind::MonolithicFlat,
        1 << 30,
        "web-flat.vmdk",
        &uuid,
    );
    out.push((
        "vmdk_descriptor",
        "valid-monolithic-flat",
        hosted.into_bytes(),
    ));

    let storage = CrashStorage::new(Vec::new(), None);
    let mut img = VmdkImage::create_sparse(
        Box::new(storage.clone()),
        std::path::Path::new("seed.vmdk"),
        4 << 20,
        uuid,
    )
    .expect("sparse image on memory");
    img.write_at(65536, &text[..8192]).expect("write");
    img.write_at((4 << 20) - 512, &[1u8; 512]).expect("write");
    img.close().expect("close");
    out.push(("vmdk_sparse", "valid-small", storage.live()));

    let dir = tempfile::tempdir().expect("tempdir");
    let src_path = dir.path().join("src.raw");
    std::fs::write(
        &src_path,
        [text.as_slice(), &vec![0u8; (1 << 20) - text.len()]].concat(),
    )
    .expect("write");
    let mut src = tidemark_receiver::image::raw::RawImage::open(&src_path, false).expect("open");
    let stream = dir.path().join("s.vmdk");
    vmdk::export_stream(&mut src, 1 << 20, uuid, &stream, 1).expect("stream");
    out.push((
        "vmdk_stream",
        "valid-small",
        std::fs::read(&stream).expect("read"),
    ));

    out.push((
        "vhd_footer",
        "valid-fixed",
        Footer::fixed(1 << 30, uuid).encode().to_vec(),
    ));

    let storage = CrashStorage::new(Vec::new(), None);
    let mut img = vhd::DynamicVhd::create(
        Box::new(storage.clone()),
        std::path::Path::new("seed.vhd"),
        6 << 20,
        uuid,
    )
    .expect("dynamic vhd");
    img.write_at(4096, &text[..4096]).expect("write");
    img.write_at((4 << 20) + 512, &text[..1024]).expect("write");
    img.close().expect("close");
    out.push(("vhd_dynamic", "valid-small", storage.durable()));

    let mut log = tidemark_receiver::journal::undo::UndoLog::new(dir.path().join("undo"));
    log.append(3, 4096, &text[..4096]).expect("append");
    log.append(3, 0, &[0u8; 4096]).expect("append");
    log.sync().expect("sync");
    drop(log);
    let seg = std::fs::read_dir(dir.path().join("undo"))
        .expect("undo dir")
        .flatten()
        .next()
        .expect("a segment")
        .path();
    out.push((
        "undo_journal",
        "valid-two-records",
        std::fs::read(seg).expect("read"),
    ));

    out.push((
        "point_log",
        "valid-two-points",
        b"{\"id\":1,\"machine\":\"web-01\",\"kind\":\"crash-consistent\",\"name\":\"sync\",\"agent_time_ms\":1,\"recorded_at\":\"2026-11-22T10:00:00Z\",\"disks\":[\"d\"]}\n{\"id\":2,\"machine\":\"web-01\",\"kind\":\"app-consistent\",\"name\":\"\",\"agent_time_ms\":2,\"recorded_at\":\"2026-11-22T11:00:00Z\",\"disks\":[\"d\"]}\n".to_vec(),
    ));
    out.push((
        "receiver_config",
        "valid-minimal",
        b"name = \"rx\"\nimage_dir = \"/srv/images\"\nretention_dir = \"/mnt/retention\"\nca = \"ca.pem\"\ncert = \"rx.pem\"\nkey = \"rx-key.pem\"\nimage_format = \"vmdk-sparse\"\n\n[disks.\"web-01\"]\nimage_format = \"vhd-fixed\"\n".to_vec(),
    ));
    out.push((
        "agent_config",
        "valid-minimal",
        b"name = \"web-01\"\nreceiver = \"rx:443\"\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a-key.pem\"\n\n[[disk]]\ndevice = \"/dev/sdb\"\nid = \"web-01-data\"\n".to_vec(),
    ));
    let mut map = DirtyMap::new(1 << 30, 4096);
    map.mark(4096..65536);
    map.mark((1 << 29)..(1 << 29) + 512);
    // A whole chunk (4096 granules) is saved as one "full" record.
    map.mark((64 << 20)..(80 << 20));
    out.push((
        "dirty_map",
        "valid-two-ranges-one-full-chunk",
        map.to_bytes(),
    ));

    // One data record of 16 bytes: type_len 4, time delta 10.
    let mut page = Vec::new();
    page.extend_from_slice(&1000u64.to_le_bytes());
    page.extend_from_slice(&20u64.to_le_bytes());
    page.extend_from_slice(&((10u32 << 5) | 4).to_le_bytes());
    page.extend_from_slice(&[7u8; 16]);
    out.push(("trace_page", "valid-one-event", page));
    out.push((
        "trace_format",
        "valid-block-rq-complete",
        b"1234\0name: block_rq_complete\nID: 1234\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;\n\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;\n\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;\n\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;\n".to_vec(),
    ));
    out
}

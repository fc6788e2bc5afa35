//! The receiver's RPO and heartbeat alarms with a raw protocol client over
//! real TLS on 127.0.0.1 (no root: the same alarms with a real agent on a
//! loop device are in e2e_health.rs).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tidemark_common::proto::{Message, PointKind};
use tidemark_tests::raw::{self, Stream};
use tidemark_tests::site::Site;

async fn point(s: &mut Stream, seq: u64) -> anyhow::Result<u64> {
    raw::send(
        s,
        &Message::Point {
            seq,
            kind: PointKind::CrashConsistent,
            name: "t".into(),
            agent_time_ms: 1,
        },
    )
    .await?;
    loop {
        match raw::recv(s).await? {
            Some(Message::PointRecorded { point_id, .. }) => return Ok(point_id),
            Some(Message::Ack { .. }) => continue,
            other => bail!("expected the point recorded, got {other:?}"),
        }
    }
}

#[test]
fn rpo_and_heartbeat_alarms_cross_and_clear_once() -> anyhow::Result<()> {
    let site = Site::start_network_only_with_config(
        "rpo_threshold_secs = 4\nheartbeat_timeout_secs = 15",
    )?;
    let dir = site
        .agent("hb-a", site.addr, &[])?
        .parent()
        .context("agent dir")?
        .to_path_buf();
    raw::block_on(async {
        let mut s = raw::connect(site.addr, &dir).await?;
        raw::send(
            &mut s,
            &Message::Hello {
                agent_name: "hb-a".into(),
                software_version: "test".into(),
            },
        )
        .await?;
        ensure!(matches!(
            raw::recv(&mut s).await?,
            Some(Message::Welcome { .. })
        ));
        raw::send(
            &mut s,
            &Message::RegisterDisk {
                disk_id: "disk-x".into(),
                size_bytes: 1 << 20,
                logical_block_bytes: 512,
            },
        )
        .await?;
        ensure!(matches!(
            raw::recv(&mut s).await?,
            Some(Message::DiskRegistered { .. })
        ));
        point(&mut s, 1).await?;
        site.receiver
            .wait_for_log("RPO alarm: disk disk-x", Duration::from_secs(15))?;
        let st = site.status_json()?;
        ensure!(st["disks"][0]["alarms"][0] == "RPO alarm", "{st:#}");
        ensure!(st["disks"][0]["protection"] == "protected", "{st:#}");
        ensure!(
            st["agents"][0]["alarms"]
                .as_array()
                .is_some_and(Vec::is_empty),
            "{st:#}"
        );
        point(&mut s, 2).await?;
        site.receiver
            .wait_for_log("RPO alarm cleared: disk disk-x", Duration::from_secs(10))?;
        ensure!(
            site.receiver
                .log()
                .matches("RPO alarm: disk disk-x")
                .count()
                == 1
        );
        Ok::<_, anyhow::Error>(())
    })?;
    // The connection is gone: silence from here on.
    let gone = Instant::now();
    site.receiver
        .wait_for_log("heartbeat alarm: agent hb-a", Duration::from_secs(30))?;
    ensure!(
        gone.elapsed() >= Duration::from_secs(13),
        "after {:?}",
        gone.elapsed()
    );
    let st = site.status_json()?;
    ensure!(st["agents"][0]["alarms"][0] == "heartbeat lost", "{st:#}");
    Ok(())
}

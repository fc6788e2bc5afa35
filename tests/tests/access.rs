//! Who may write what, changed while `serve` runs: revocation by name and
//! by certificate fingerprint on SIGHUP (live sessions of revoked agents
//! closed, others untouched), a bad config on reload keeping the old one,
//! the receiver's certificate rotated without a restart, and `reassign`
//! moving a disk between agents, online and offline, with `status`
//! showing the result. Real TLS on 127.0.0.1 with raw protocol clients; no
//! root needed.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tidemark_common::proto::{ErrorCode, Message, PointKind};
use tidemark_tests::raw::{self, Stream};
use tidemark_tests::site::{assert_fails_with, path, receiver_cmd, run_ok, Site};

async fn register(s: &mut Stream, disk: &str) -> anyhow::Result<Message> {
    raw::send(
        s,
        &Message::RegisterDisk {
            disk_id: disk.into(),
            size_bytes: 1 << 20,
            logical_block_bytes: 512,
        },
    )
    .await?;
    raw::recv(s).await?.context("closed instead of answering")
}

/// The session answers a heartbeat.
async fn alive(s: &mut Stream) -> anyhow::Result<()> {
    raw::send(s, &Message::Heartbeat { time_ms: 1 }).await?;
    match raw::recv(s).await? {
        Some(Message::Heartbeat { .. }) => Ok(()),
        other => bail!("expected a heartbeat back, got {other:?}"),
    }
}

/// The receiver closed the connection (EOF or a reset), within 20 s.
async fn closed(s: &mut Stream) -> bool {
    loop {
        match raw::recv(s).await {
            Ok(Some(Message::Ack { .. })) => continue,
            Ok(None) | Err(_) => return true,
            Ok(Some(_)) => return false,
        }
    }
}

fn set_key(site: &Site, key: &str, value: &str) -> anyhow::Result<()> {
    let cfg = site.config();
    let text = std::fs::read_to_string(&cfg)?;
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{key} =")))
        .with_context(|| format!("no {key} in {text}"))?;
    std::fs::write(&cfg, text.replace(line, &format!("{key} = {value}")))?;
    Ok(())
}

fn hup(site: &Site, reloads_before: usize) -> anyhow::Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(site.receiver.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while reload_lines(site) <= reloads_before {
        if std::time::Instant::now() > deadline {
            bail!("no reload logged: {}", site.receiver.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn reload_lines(site: &Site) -> usize {
    site.receiver
        .log()
        .lines()
        .filter(|l| l.contains("reloaded /") || l.contains("reload of /"))
        .count()
}

fn pem_fingerprint(cert: &Path) -> anyhow::Result<String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(cert)?;
    Ok(tidemark_common::tls::fingerprint_sha256(&der))
}

#[test]
fn revocation_and_rotation_apply_on_reload_without_a_restart() -> anyhow::Result<()> {
    let site = Site::start_network_only(&[])?;
    let (a, b, c) = (
        site.agent_dir("agent-a")?,
        site.agent_dir("agent-b")?,
        site.agent_dir("agent-c")?,
    );
    raw::block_on(async {
        let mut sa = raw::hello(site.addr, &a, "agent-a").await?;
        let mut sb = raw::hello(site.addr, &b, "agent-b").await?;
        assert!(matches!(
            register(&mut sa, "disk-a").await?,
            Message::DiskRegistered { .. }
        ));
        assert!(matches!(
            register(&mut sb, "disk-b").await?,
            Message::DiskRegistered { .. }
        ));

        // Revoke agent-a by name: its live session goes, agent-b's stays.
        set_key(&site, "revoked_agents", r#"["agent-a"]"#)?;
        hup(&site, 0)?;
        assert!(closed(&mut sa).await, "agent-a's session was not closed");
        alive(&mut sb).await?;
        let err = raw::connect(site.addr, &a)
            .await
            .expect_err("agent-a refused");
        assert!(format!("{err:#}").contains("CertificateRevoked"), "{err:#}");
        let log = site.receiver.log();
        for needle in [
            "closed the live session of agent agent-a",
            "refused agent agent-a at the TLS handshake: agent agent-a is listed in revoked_agents",
        ] {
            assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
        }

        // Revoke one certificate of agent-c by fingerprint (openssl's
        // spelling); a new certificate for the same name is accepted.
        let fp = pem_fingerprint(&c.join("agent.pem"))?;
        let openssl_style = fp
            .as_bytes()
            .chunks(2)
            .map(|p| String::from_utf8_lossy(p).to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        set_key(
            &site,
            "revoked_fingerprints",
            &format!("[\"{openssl_style}\"]"),
        )?;
        hup(&site, 1)?;
        let err = raw::connect(site.addr, &c)
            .await
            .expect_err("agent-c's cert refused");
        assert!(format!("{err:#}").contains("CertificateRevoked"), "{err:#}");
        assert!(site
            .receiver
            .log()
            .contains(&format!("certificate sha256 {fp} of agent agent-c")));
        std::fs::remove_dir_all(&c)?;
        let c2 = site.agent_dir("agent-c")?;
        raw::hello(site.addr, &c2, "agent-c").await?;

        // A broken config on reload: logged, the old one stays in force.
        let cfg = site.config();
        let good = std::fs::read_to_string(&cfg)?;
        std::fs::write(&cfg, good.replace("revoked_agents", "revoked_agentz"))?;
        hup(&site, 2)?;
        assert!(site
            .receiver
            .log()
            .contains("keeping the previous configuration"));
        assert!(
            raw::connect(site.addr, &a).await.is_err(),
            "agent-a still revoked"
        );
        alive(&mut sb).await?;
        std::fs::write(&cfg, &good)?;

        // Rotate the receiver's certificate (same CA): new connections get
        // the new one, the old session goes on.
        let rx = site.dir.path().join("rx");
        let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(rx.join("ca-key.pem"))?)?;
        let issuer =
            rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(rx.join("ca.pem"))?, ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec!["tidemark-receiver".to_owned()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test-receiver");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(rx.join("receiver.pem"), cert.pem())?;
        std::fs::write(rx.join("receiver-key.pem"), key.serialize_pem())?;
        let new_fp = tidemark_common::tls::fingerprint_sha256(cert.der());
        hup(&site, 3)?;
        let s = raw::hello(site.addr, &b, "agent-b").await?;
        let seen = s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .context("no cert")?;
        assert_eq!(tidemark_common::tls::fingerprint_sha256(seen), new_fp);
        alive(&mut sb).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    assert!(
        site.receiver.try_wait()?.is_none(),
        "receiver restarted or died"
    );
    Ok(())
}

/// Waits until no session holds `disk` open.
async fn wait_idle(site: &Site, disk: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        let s = status_json(site)?;
        let state = s["disks"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["id"] == disk))
            .map(|d| d["state"].clone());
        if state.as_ref().and_then(|s| s.as_str()) == Some("idle") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("disk {disk} stayed open: {}", site.receiver.log())
}

fn reassign(site: &Site, disk: &str, agent: &str, extra: &[&str]) -> std::process::Output {
    receiver_cmd()
        .args([
            "reassign",
            "--config",
            path(&site.config()),
            "--disk",
            disk,
            "--agent",
            agent,
        ])
        .args(extra)
        .output()
        .expect("receiver binary runs")
}

fn status_json(site: &Site) -> anyhow::Result<serde_json::Value> {
    let out = run_ok(receiver_cmd().args(["status", "--config", path(&site.config()), "--json"]))?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn reassign_moves_a_disk_while_serve_runs_and_offline() -> anyhow::Result<()> {
    let mut site = Site::start_network_only(&[])?;
    let (a, b) = (site.agent_dir("agent-a")?, site.agent_dir("agent-b")?);
    raw::block_on(async {
        let mut sa = raw::hello(site.addr, &a, "agent-a").await?;
        assert!(matches!(
            register(&mut sa, "disk-r").await?,
            Message::DiskRegistered { .. }
        ));
        raw::send(
            &mut sa,
            &Message::Point {
                seq: 1,
                kind: PointKind::CrashConsistent,
                name: "p".into(),
                agent_time_ms: 1,
            },
        )
        .await?;
        let point = loop {
            match raw::recv(&mut sa).await? {
                Some(Message::PointRecorded { point_id, .. }) => break point_id,
                Some(Message::Ack { .. }) => continue,
                other => bail!("expected the point, got {other:?}"),
            }
        };

        // Another agent claiming the disk is refused, both names logged,
        // even while agent-a has it open (not "busy": retrying cannot help).
        let mut sb = raw::hello(site.addr, &b, "agent-b").await?;
        match register(&mut sb, "disk-r").await? {
            Message::Error { code, message } => {
                assert_eq!(code, ErrorCode::Unauthorized);
                assert!(
                    message.contains("agent-a") && message.contains("reassign"),
                    "{message}"
                );
            }
            other => bail!("expected a refusal, got {other:?}"),
        }
        assert!(site.receiver.log().contains(
            "agent agent-b tried to register disk disk-r, which belongs to agent agent-a"
        ));
        drop(sa);
        wait_idle(&site, "disk-r").await?;
        let mut sa = raw::hello(site.addr, &a, "agent-a").await?;
        assert!(matches!(
            register(&mut sa, "disk-r").await?,
            Message::DiskRegistered { .. }
        ));

        let s = status_json(&site)?;
        assert_eq!(s["disks"][0]["agent"], "agent-a");
        assert_eq!(s["disks"][0]["state"], "replicating");
        assert_eq!(s["disks"][0]["latest_point"], point);

        // Wrong inputs: one line each, naming the thing.
        assert_fails_with(
            &reassign(&site, "nope", "agent-b", &[]),
            &["\"nope\"", "not registered"],
        );
        assert_fails_with(
            &reassign(&site, "disk-r", "ghost", &[]),
            &["ghost", "--new-agent"],
        );
        assert_fails_with(&reassign(&site, "disk-r", "bad name", &[]), &["bad name"]);

        // Online: agent-a's live session is closed, agent-b may register.
        let out = run_ok(receiver_cmd().args([
            "reassign",
            "--config",
            path(&site.config()),
            "--disk",
            "disk-r",
            "--agent",
            "agent-b",
        ]))?;
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains("moved from agent agent-a to agent agent-b") && said.contains("agent-a"),
            "{said}"
        );
        assert!(closed(&mut sa).await, "the old owner's session stayed open");
        let mut sb = raw::hello(site.addr, &b, "agent-b").await?;
        // The old owner's worker may still be releasing the disk.
        let mut tries = 0;
        loop {
            match register(&mut sb, "disk-r").await? {
                Message::DiskRegistered { .. } => break,
                Message::Error {
                    code: ErrorCode::Busy,
                    ..
                } if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    sb = raw::hello(site.addr, &b, "agent-b").await?;
                }
                other => bail!("agent-b could not register its disk: {other:?}"),
            }
        }
        // Status while agent-b has it open.
        let s = status_json(&site)?;
        assert_eq!(s["disks"][0]["state"], "replicating");
        drop(sb);
        wait_idle(&site, "disk-r").await?;
        let mut sa = raw::hello(site.addr, &a, "agent-a").await?;
        match register(&mut sa, "disk-r").await? {
            Message::Error {
                code: ErrorCode::Unauthorized,
                message,
            } => {
                assert!(message.contains("agent-b"), "{message}")
            }
            other => bail!("the old owner was not refused: {other:?}"),
        }
        let s = status_json(&site)?;
        assert_eq!(s["disks"][0]["agent"], "agent-b");
        // Points of the old owner are no longer offered for this disk.
        assert!(s["disks"][0]["latest_point"].is_null(), "{s}");
        let agents: Vec<&str> = s["agents"]
            .as_array()
            .context("agents")?
            .iter()
            .filter_map(|a| a["name"].as_str())
            .collect();
        assert_eq!(agents, ["agent-a", "agent-b"]);
        let text = run_ok(receiver_cmd().args(["status", "--config", path(&site.config())]))?;
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains("disk-r") && text.contains("agent-b"),
            "{text}"
        );
        Ok::<_, anyhow::Error>(())
    })?;

    // Offline: no serve, the registry file is edited under the lock, and
    // a new agent needs --new-agent.
    site.receiver.kill();
    assert_fails_with(
        &reassign(&site, "disk-r", "agent-n", &[]),
        &["agent-n", "--new-agent"],
    );
    run_ok(receiver_cmd().args([
        "reassign",
        "--config",
        path(&site.config()),
        "--disk",
        "disk-r",
        "--agent",
        "agent-n",
        "--new-agent",
    ]))?;
    site.restart_receiver()?;
    let s = status_json(&site)?;
    assert_eq!(s["disks"][0]["agent"], "agent-n");
    Ok(())
}

#[test]
fn status_without_a_running_receiver_is_one_line() -> anyhow::Result<()> {
    let mut site = Site::start_network_only(&[])?;
    site.receiver.kill();
    let out = receiver_cmd()
        .args(["status", "--config", path(&site.config())])
        .output()?;
    assert_fails_with(
        &out,
        &["cannot reach the running receiver", "receiver.sock"],
    );
    Ok(())
}

//! Property tests for every parser of untrusted input: whatever the bytes, no panic; where a
//! renderer exists, render → parse gives back what was rendered; invalid input is an error.

use std::path::Path;

use ed25519_dalek::SigningKey;
use proptest::prelude::*;

/// Cases per property: 512 in CI, `PROPTEST_CASES` for a long run.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(512)
}
use upgradectl::appliance::bootinfo::BootReport;
use upgradectl::appliance::config::{Config, ConfigError};
use upgradectl::appliance::grub::{parse_env, render_env, Env};
use upgradectl::appliance::prepare::fetch;
use upgradectl::appliance::{gate, window};
use upgradectl::core::fleetlock;
use upgradectl::core::manifest::{self, Descriptor, Encoding, Manifest};
use upgradectl::core::sign::{self, Envelope};
use upgradectl::core::version::Version;
use upgradectl::error::{classify, Exit};
use upgradectl::sys::zfs::parse_snapshots;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

/// A version string: valid most of the time, sometimes not.
fn version_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::collection::vec(0u64..1000, 1..4)
            .prop_map(|p| p.iter().map(u64::to_string).collect::<Vec<_>>().join(".")),
        1 => "[0-9a-z./-]{0,12}",
    ]
}

fn hex64() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<[u8; 32]>().prop_map(hex::encode),
        1 => "[0-9a-fA-Fxz]{0,70}",
    ]
}

/// Descriptor JSON with every field drawn from around and beyond its valid range.
fn descriptor_json() -> impl Strategy<Value = serde_json::Value> {
    (
        version_text(),
        proptest::option::of(version_text()),
        prop_oneof![Just(0u64), 1u64..(64 << 20), any::<u64>()],
        prop_oneof![
            Just(0u64),
            Just(1u64 << 62),
            (1u64 << 16)..(1u64 << 27),
            any::<u64>()
        ],
        hex64(),
        proptest::collection::vec(hex64(), 0..40),
        prop_oneof![Just("xz".to_owned()), "[a-z]{0,4}"],
        proptest::bool::ANY,
    )
        .prop_map(|(to, from, size, chunk_size, sha, chunks, enc, named)| {
            let name = if named {
                match &from {
                    Some(f) => format!("{f}-to-{to}"),
                    None => format!("full-{to}"),
                }
            } else {
                format!("x{to}")
            };
            serde_json::json!({"name": name, "from": from, "to": to, "encoding": enc,
                "size": size, "sha256": sha, "chunk_size": chunk_size, "chunks": chunks})
        })
}

fn manifest_json() -> impl Strategy<Value = serde_json::Value> {
    let release = (
        version_text(),
        any::<u8>(),
        any::<bool>(),
        any::<u64>(),
        hex64(),
    )
        .prop_map(|(v, rollout, paused, size, sha)| {
            serde_json::json!({"version": v, "rollout": rollout, "paused": paused,
                "image": {"size": size, "sha256": sha}})
        });
    (
        prop_oneof![Just("stable".to_owned()), "[a-z]{0,8}"],
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(release, 0..8),
    )
        .prop_map(|(channel, issued, expires, releases)| {
            serde_json::json!({"channel": channel, "issued": issued, "expires": expires,
                "releases": releases})
        })
}

/// An accepted descriptor is one the downloader can use without overflow or panic.
fn assert_usable(d: &Descriptor) {
    assert!((manifest::MIN_CHUNK_SIZE..=manifest::MAX_CHUNK_SIZE).contains(&d.chunk_size));
    assert_eq!(d.chunks.len() as u64, d.size.div_ceil(d.chunk_size));
    assert!(d.size > 0 && d.size <= manifest::MAX_BLOB_SIZE);
    assert_eq!(d.encoding, Encoding::Xz);
    assert!(manifest::is_sha256_hex(&d.sha256));
    assert_eq!(
        manifest::parse_artifact_name(&d.name),
        Some((d.from.clone(), d.to.clone()))
    );
}

/// Every refusal of a correctly signed document is refused input (exit 2).
fn assert_refused(err: &anyhow::Error) {
    assert_eq!(classify(err).0, Exit::Refused, "{err:#}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn envelope_from_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(env) = serde_json::from_slice::<Envelope>(&bytes) {
            prop_assert!(sign::open::<serde_json::Value>(&env, &[key().verifying_key()], "x").is_err());
        }
    }

    #[test]
    fn envelope_with_arbitrary_fields_is_refused(
        payload in ".{0,80}",
        sigs in proptest::collection::vec((".{0,60}", ".{0,100}"), 0..4),
    ) {
        let env: Envelope = serde_json::from_value(serde_json::json!({
            "payload": payload,
            "signatures": sigs.iter().map(|(k, s)| serde_json::json!({"key": k, "sig": s}))
                .collect::<Vec<_>>(),
        })).unwrap();
        let err = sign::open::<serde_json::Value>(&env, &[key().verifying_key()], "x").unwrap_err();
        assert_refused(&err);
    }

    #[test]
    fn listed_descriptor_is_validated_never_panics(doc in descriptor_json()) {
        let bytes = serde_json::to_vec(&doc).unwrap();
        let name = doc["name"].as_str().unwrap_or_default();
        match manifest::descriptor_of_verified_target(&bytes, name) {
            Ok(d) => assert_usable(&d),
            Err(e) => assert_refused(&e),
        }
    }

    #[test]
    fn descriptor_from_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = manifest::descriptor_of_verified_target(&bytes, "full-1.0") {
            assert_refused(&e);
        }
    }

    #[test]
    fn manifest_is_validated_never_panics(doc in manifest_json(), now in any::<u64>()) {
        let parsed = serde_json::from_value::<Manifest>(doc)
            .map_err(|e| upgradectl::error::refused(e.to_string()))
            .and_then(|m| m.validate(now).map(|()| m));
        match parsed {
            Ok(m) => {
                prop_assert!(m.expires > m.issued && m.issued <= now.saturating_add(manifest::MAX_CLOCK_SKEW));
                prop_assert!(m.releases.iter().all(|r| r.rollout <= 100 && manifest::is_sha256_hex(&r.image.sha256)));
            }
            Err(e) => assert_refused(&e),
        }
    }

    #[test]
    fn a_document_round_trips_through_a_report_envelope(doc in manifest_json()) {
        if let Ok(m) = serde_json::from_value::<Manifest>(doc) {
            let env = sign::seal(&m, &key()).unwrap();
            let back: Manifest = sign::open(&env, &[key().verifying_key()], "m").unwrap();
            prop_assert_eq!(back, m);
        }
    }

    #[test]
    fn retry_after_is_always_within_bounds(header in proptest::option::of(prop_oneof![".{0,24}", any::<u64>().prop_map(|n| n.to_string())])) {
        let secs = fetch::retry_after_secs(header.as_deref());
        prop_assert!((1..=fetch::MAX_RETRY_AFTER).contains(&secs));
    }

    #[test]
    fn grubenv_from_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
        let _ = parse_env(&bytes);
        let mut with_header = b"# GRUB Environment Block\n".to_vec();
        with_header.extend_from_slice(&bytes);
        let _ = parse_env(&with_header);
    }

    #[test]
    fn grubenv_render_parse_round_trips(
        pairs in proptest::collection::btree_map(prop_oneof![".{0,12}", "#.{0,4}", "[a-z]{1,4}\r"], ".{0,40}", 0..8),
    ) {
        let env: Env = pairs;
        match render_env(&env) {
            Ok(block) => {
                prop_assert_eq!(block.len(), 1024);
                prop_assert_eq!(parse_env(&block).unwrap(), env);
            }
            // Refused only for a key GRUB could not read back, or a block over 1024 bytes.
            Err(e) => prop_assert!(
                env.keys().any(|k| k.is_empty() || k.contains(['=', '\n']) || k.starts_with('#'))
                    || format!("{e:#}").contains("exceeds"),
                "{e:#}"
            ),
        }
    }

    #[test]
    fn config_from_arbitrary_text_never_panics(text in ".{0,300}") {
        if let Err(e) = Config::parse(&text, Path::new("/etc/u.toml")) {
            prop_assert!(e.downcast_ref::<ConfigError>().is_some(), "{e:#}");
        }
    }

    #[test]
    fn config_numbers_are_accepted_exactly_within_range(
        stall in prop_oneof![0u64..4000, any::<u64>()],
        speed in prop_oneof![0u64..10, any::<u64>()],
    ) {
        let text = format!("[download]\nstall_seconds = {}\nmin_speed_bytes = {}\n",
            stall.min(i64::MAX as u64), speed.min(i64::MAX as u64));
        let stall = stall.min(i64::MAX as u64);
        let speed = speed.min(i64::MAX as u64);
        let ok = (1..=3600).contains(&stall) && (1..=1 << 30).contains(&speed);
        match Config::parse(&text, Path::new("/etc/u.toml")) {
            Ok(c) => {
                prop_assert!(ok);
                prop_assert_eq!(c.download.stall_seconds, stall);
            }
            Err(e) => {
                prop_assert!(!ok);
                let msg = format!("{e:#}");
                prop_assert!(msg.contains("/etc/u.toml") && msg.contains("download."), "{}", msg);
            }
        }
    }

    #[test]
    fn boot_report_never_panics_and_reads_back_its_fields(
        text in ".{0,300}",
        booted in version_text(),
        fsck in any::<i32>(),
    ) {
        let _ = BootReport::parse(&text);
        let r = BootReport::parse(&format!("{text}\nbooted=/images/{booted}.img\nfsck={fsck}\nfallback=1\n"));
        prop_assert_eq!(r.fsck, Some(fsck));
        prop_assert!(r.fallback);
        let file = booted.rsplit('/').next().unwrap_or_default();
        prop_assert_eq!(r.booted_version(), file.parse::<Version>().ok());
    }

    #[test]
    fn zfs_list_parser_keeps_exactly_the_versions_of_the_zvol(
        noise in ".{0,200}",
        versions in proptest::collection::btree_set(version_text(), 0..6),
    ) {
        let zvol = "box/upgradectl/image";
        let _ = parse_snapshots(zvol, &noise);
        let listing: String = versions
            .iter()
            .map(|v| format!("{zvol}@{v}\t17\nother/vol@{v}\t18\n"))
            .collect();
        let got = parse_snapshots(zvol, &listing);
        let mut want: Vec<Version> = versions.iter().filter_map(|v| v.parse().ok()).collect();
        want.sort();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn fleetlock_request_from_arbitrary_bytes_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        node in ".{0,140}",
        group in ".{0,140}",
    ) {
        let _ = fleetlock::parse_request(&bytes);
        let body = serde_json::json!({"client_params": {"node_uuid": node, "group": group}});
        let ok = |s: &str| (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic());
        let parsed = fleetlock::parse_request(body.to_string().as_bytes());
        prop_assert_eq!(parsed.is_ok(), ok(&node) && ok(&group));
    }

    #[test]
    fn window_ranges_never_panic_and_contain_their_start(text in ".{0,20}", a in 0u16..1440, b in 0u16..1440) {
        let _ = window::Range::parse(&text);
        let hm = |t: u16| format!("{:02}:{:02}", t / 60, t % 60);
        let r = window::Range::parse(&format!("{}-{}", hm(a), hm(b)));
        prop_assert_eq!(r.is_ok(), a != b);
        if let Ok(r) = r {
            prop_assert!(r.contains(a));
            prop_assert!(!r.contains(b));
            prop_assert_eq!(r.to_string(), format!("{}-{}", hm(a), hm(b)));
        }
    }

    #[test]
    fn inhibitor_listings_never_panic(text in ".{0,300}") {
        let _ = gate::parse_inhibitors(&text);
    }
}

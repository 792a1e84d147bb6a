//! The corruption campaign: a real artifact and its descriptor, built by the real server and
//! listed in its TUF repository, then thousands of mutations of each, taken by the box's own
//! code (`Metadata::descriptor`, `fetch::download`). Every mutated artifact is refused before a
//! byte reaches `zfs receive` (the download fails and the file never gets its final name);
//! every mutated descriptor is refused by the repository's hashes; and every edit the online
//! artifacts key itself signs (a compromised server) is refused or makes the download fail:
//! that key can waste bandwidth, never deliver other bytes. Nothing panics.
//! `CORRUPTION_CASES` sets the number of mutations (default 4000, about a minute: a listed edit
//! costs a new snapshot and timestamp and a new load, 0.4 s in a debug build).

#[path = "common/server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use server::{limits, start_with, wait_for, Fixture, Setup};
use upgradectl::appliance::config::Config;
use upgradectl::appliance::paths::Layout;
use upgradectl::appliance::prepare::fetch;
use upgradectl::appliance::prepare::metadata::Metadata;
use upgradectl::appliance::trust::Trusted;
use upgradectl::core::hashing::sha256_hex;
use upgradectl::core::manifest::{Descriptor, MIN_CHUNK_SIZE};

const NAME: &str = "full-0.5";

/// The campaign's fixed material: the server, the good artifact, two valid descriptors of it
/// (the server's own, and one re-chunked at `MIN_CHUNK_SIZE` so chunks can be swapped).
struct Campaign {
    f: Fixture,
    good: Vec<u8>,
    descriptors: [Descriptor; 2],
    served: PathBuf,
    served_descriptor: PathBuf,
    dest: PathBuf,
    /// One client for the whole campaign, as one box would use.
    client: reqwest::blocking::Client,
    url: String,
    server: String,
    config: Config,
    layout: Layout,
}

impl Campaign {
    fn new() -> Campaign {
        let f = start_with(Setup {
            versions: vec!["0.5"],
            full_size: 200 << 10,
            repo: true,
            ..Setup::default()
        });
        let server_made = f.descriptor(NAME);
        let store = &f.server.store;
        let (served, served_descriptor) = (store.artifact_path(NAME), store.descriptor_path(NAME));
        let good = std::fs::read(&served).unwrap();
        let mut fine = server_made.clone();
        fine.chunk_size = MIN_CHUNK_SIZE;
        fine.chunks = good
            .chunks(MIN_CHUNK_SIZE as usize)
            .map(sha256_hex)
            .collect();
        fine.validate().expect("the re-chunked descriptor is valid");
        assert!(fine.chunks.len() >= 3, "chunks to swap");
        let dest = f.root.join("box/var/download").join(NAME);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let mut config = Config::default();
        config.trust.root = Some("/etc/root.json".into());
        let layout = Layout::new(&f.root.join("box"), &config.host_mount);
        let c = Campaign {
            client: fetch::client(&limits()).unwrap(),
            url: f.url(&format!("/v1/artifacts/{NAME}")),
            server: format!("http://{}", f.addr),
            f,
            good,
            descriptors: [server_made, fine],
            served,
            served_descriptor,
            dest,
            config,
            layout,
        };
        wait_for("the artifact listed", Duration::from_secs(60), || {
            c.metadata().descriptor(&c.client, &c.server, NAME).is_ok()
        });
        c
    }

    /// The repository as a box verifies it now.
    fn metadata(&self) -> Metadata {
        Metadata::from(Trusted::load(&self.layout, &self.config, &self.server).unwrap())
    }

    /// Serves `bytes` as the descriptor and has the online artifacts key list it (what a
    /// compromised server can do).
    fn list_descriptor(&self, bytes: &[u8]) {
        std::fs::write(&self.served_descriptor, bytes).unwrap();
        let repo = self.f.repo.as_ref().unwrap();
        repo.artifact_built(&self.f.server.store, NAME).unwrap();
    }

    fn download(&self, d: &Descriptor) -> anyhow::Result<fetch::Fetched> {
        fetch::download(
            &self.client,
            &self.url,
            &self.dest,
            d,
            &limits(),
            &mut |_, _| {},
        )
    }

    /// Downloads with `d` from a clean slate; `true` when the box ended with nothing usable.
    fn refused_download(&self, d: &Descriptor) -> bool {
        clean(&self.dest);
        let refused = self.download(d).is_err();
        refused && !self.dest.exists()
    }

    /// Serves `bytes` as the artifact; `true` when the box refuses it.
    fn serve_and_refuse(&self, bytes: &[u8], d: &Descriptor) -> bool {
        std::fs::write(&self.served, bytes).unwrap();
        self.refused_download(d)
    }

    /// Leaves `bytes` as the finished download on the box with the good artifact served;
    /// `true` when the box does not use it (fetches the good bytes again).
    fn rotten_file_is_replaced(&self, bytes: &[u8], d: &Descriptor) -> bool {
        std::fs::write(&self.served, &self.good).unwrap();
        clean(&self.dest);
        std::fs::write(&self.dest, bytes).unwrap();
        self.download(d).is_ok() && std::fs::read(&self.dest).unwrap() == self.good
    }

    /// The descriptor `meta` gives the box is refused, or the download it allows fails.
    fn descriptor_refused(&self, meta: &Metadata) -> bool {
        match meta.descriptor(&self.client, &self.server, NAME) {
            Err(_) => true,
            Ok(d) => {
                std::fs::write(&self.served, &self.good).unwrap();
                self.refused_download(&d)
            }
        }
    }
}

fn clean(dest: &Path) {
    let _ = std::fs::remove_file(dest);
    let _ = std::fs::remove_file(format!("{}.partial", dest.display()));
}

/// A bit flip, a truncation, or 1..=`max_extra` random bytes inserted anywhere (the end too).
fn flip_truncate_or_extend(b: &mut Vec<u8>, max_extra: usize, rng: &mut StdRng) {
    match rng.gen_range(0..3) {
        0 => {
            let i = rng.gen_range(0..b.len());
            b[i] ^= 1 << rng.gen_range(0..8);
        }
        1 => b.truncate(rng.gen_range(0..b.len())),
        _ => {
            let i = rng.gen_range(0..=b.len());
            let junk: Vec<u8> = (0..rng.gen_range(1..=max_extra))
                .map(|_| rng.gen())
                .collect();
            b.splice(i..i, junk);
        }
    }
}

/// A mutation of the artifact's bytes, never the identity.
fn mutate_artifact(good: &[u8], chunk: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut b = good.to_vec();
    let whole = b.len() / chunk;
    match rng.gen_range(0..4) {
        0 => flip_truncate_or_extend(&mut b, 2 * chunk, rng),
        1 => {
            // Swap two different whole chunks.
            let i = rng.gen_range(0..whole);
            let j = (i + rng.gen_range(1..whole)) % whole;
            let (lo, hi) = (i.min(j), i.max(j));
            let (head, tail) = b.split_at_mut(hi * chunk);
            head[lo * chunk..(lo + 1) * chunk].swap_with_slice(&mut tail[..chunk]);
        }
        2 => {
            // Overwrite a run with random bytes (forcing at least one change).
            let start = rng.gen_range(0..b.len());
            let end = (start + rng.gen_range(1..4096)).min(b.len());
            b[start] = !b[start];
            for x in &mut b[start + 1..end] {
                *x = rng.gen();
            }
        }
        _ => {
            // One chunk repeated in place of the next.
            let i = rng.gen_range(0..whole);
            let j = (i + 1) % whole;
            let copy = b[i * chunk..(i + 1) * chunk].to_vec();
            b[j * chunk..(j + 1) * chunk].copy_from_slice(&copy);
        }
    }
    assert_ne!(b, good, "a mutation changes something");
    b
}

/// A field edit of a descriptor that no longer describes the artifact.
fn edit_descriptor(d: &Descriptor, rng: &mut StdRng) -> serde_json::Value {
    let mut e = d.clone();
    let n = e.chunks.len();
    match rng.gen_range(0..9) {
        0 => e.size = e.size.wrapping_add(rng.gen_range(1..1 << 20)),
        1 => e.size = rng.gen_range(0..e.size),
        2 => e.sha256 = sha256_hex(&rng.gen::<[u8; 8]>()),
        3 => {
            e.chunk_size = [0, 1, 4096, 1 << 62, u64::MAX, MIN_CHUNK_SIZE * 2][rng.gen_range(0..6)]
        }
        4 => e.chunks[rng.gen_range(0..n)] = sha256_hex(&rng.gen::<[u8; 8]>()),
        5 => e.chunks.swap(0, rng.gen_range(1..n)),
        6 => drop(e.chunks.remove(rng.gen_range(0..n))),
        7 => e.chunks.push(e.chunks[rng.gen_range(0..n)].clone()),
        _ => {
            let mut v = serde_json::to_value(&e).unwrap();
            let (field, value) = [
                ("encoding", serde_json::json!("zstd")),
                ("size", serde_json::json!(-1)),
                ("to", serde_json::json!("0.5-rc1")),
                ("name", serde_json::json!("full-0.6")),
                ("from", serde_json::json!("0.4")),
                ("chunks", serde_json::json!("nope")),
            ][rng.gen_range(0..6)]
            .clone();
            v[field] = value;
            return v;
        }
    }
    serde_json::to_value(&e).unwrap()
}

#[test]
fn every_mutated_artifact_and_descriptor_is_refused() {
    let cases: usize = std::env::var("CORRUPTION_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4_000);
    let seed: u64 = rand::random();
    eprintln!("corruption campaign: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let c = Campaign::new();
    // The controls: the good artifact downloads with both descriptors, each as listed.
    let fine = &c.descriptors[1];
    let listed = |d: &Descriptor| {
        let bytes = serde_json::to_vec(d).unwrap();
        c.list_descriptor(&bytes);
        (bytes, c.metadata())
    };
    for d in &c.descriptors {
        let (_, meta) = listed(d);
        assert_eq!(&meta.descriptor(&c.client, &c.server, NAME).unwrap(), d);
        clean(&c.dest);
        c.download(d).unwrap();
        assert_eq!(std::fs::read(&c.dest).unwrap(), c.good);
    }
    // `fine` is listed now: the box's view of the repository, as verified once.
    let (fine_bytes, meta) = listed(fine);
    let mut refused = 0;
    let mut failures = Vec::new();
    let mut seconds = std::collections::BTreeMap::<&str, f64>::new();
    for case in 0..cases {
        let started = std::time::Instant::now();
        let d = &c.descriptors[case % 2];
        // Mostly what is cheap to check, with thousands of downloads; one case in 50 the
        // online key signs an edit (a new snapshot and timestamp, a new load on the box).
        let (kind, ok) = match case % 50 {
            0..=37 => {
                let bad = mutate_artifact(&c.good, MIN_CHUNK_SIZE as usize, &mut rng);
                ("served artifact", c.serve_and_refuse(&bad, d))
            }
            38..=41 => {
                let mut bad = mutate_artifact(&c.good, MIN_CHUNK_SIZE as usize, &mut rng);
                bad.resize(c.good.len(), 0);
                if bad == c.good {
                    bad[0] ^= 1;
                }
                (
                    "finished file on the box",
                    c.rotten_file_is_replaced(&bad, d),
                )
            }
            42..=48 => {
                // The served descriptor changes under the listed one: its hash is wrong.
                let mut bytes = fine_bytes.clone();
                flip_truncate_or_extend(&mut bytes, 16, &mut rng);
                std::fs::write(&c.served_descriptor, &bytes).unwrap();
                ("descriptor bytes", c.descriptor_refused(&meta))
            }
            _ => {
                let edited = serde_json::to_vec(&edit_descriptor(fine, &mut rng)).unwrap();
                c.list_descriptor(&edited);
                let ok = c.descriptor_refused(&c.metadata());
                ("edit listed by the online key", ok)
            }
        };
        *seconds.entry(kind).or_default() += started.elapsed().as_secs_f64();
        if ok {
            refused += 1;
        } else {
            failures.push(format!("case {case}: {kind}"));
        }
    }
    eprintln!("corruption campaign: seconds by kind {seconds:.1?}");
    eprintln!("corruption campaign: {cases} mutations, {refused} refused");
    assert!(failures.is_empty(), "accepted: {failures:?}");
    assert_eq!(refused, cases);
}

//! Host tests of delivery: the real server and the real client over 127.0.0.1 with real HTTP
//! (see `server_fixture` for the stand-in for ZFS).

mod server_fixture;

use std::time::Duration;

use server_fixture::{limits, noise, start, v};
use upgradectl::appliance::prepare::fetch;
use upgradectl::error::Error;

#[test]
fn missing_diff_says_come_back_later_and_is_built_once_for_many_boxes() {
    let f = start(Duration::from_millis(500), u64::MAX);
    let url = f.url("/v1/artifacts/1.0-to-2.0.descriptor");
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let client = fetch::client(&limits()).unwrap();
                let resp = client.get(&url).send().unwrap();
                (
                    resp.status().as_u16(),
                    resp.headers().get("retry-after").cloned(),
                    resp.headers().get("cache-control").cloned(),
                )
            })
        })
        .collect();
    for h in handles {
        let (status, retry, cache) = h.join().unwrap();
        assert_eq!(status, 503);
        assert_eq!(retry.unwrap(), "1");
        assert_eq!(cache.unwrap(), "no-store");
    }
    let d = f.descriptor("1.0-to-2.0");
    assert_eq!(f.server.builds_started(), 1, "sixteen boxes, one build");
    assert_eq!(d.from, Some(v("1.0")));
    assert_eq!(d.chunks.len() as u64, d.size.div_ceil(d.chunk_size));
    // Built artifacts are immutable and cacheable anywhere.
    let client = fetch::client(&limits()).unwrap();
    let resp = client
        .get(f.url("/v1/artifacts/1.0-to-2.0"))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));
    // Unknown versions and names that are not artifacts are 404, never built.
    for bad in [
        "/v1/artifacts/1.0-to-9.0",
        "/v1/artifacts/..%2Fstore.xz",
        "/v1/artifacts/2.0-to-1.0",
    ] {
        assert_eq!(
            client.get(f.url(bad)).send().unwrap().status().as_u16(),
            404,
            "{bad}"
        );
    }
}

#[test]
fn download_verifies_resumes_and_decompresses_to_the_stream() {
    let f = start(Duration::ZERO, u64::MAX);
    let d = f.descriptor("1.0-to-2.0");
    let dest = f.root.join("dl/1.0-to-2.0");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    // An earlier run got a bit more than one chunk before it was cut.
    let served = std::fs::read(f.root.join("store/artifacts/1.0-to-2.0")).unwrap();
    let cut = d.chunk_size as usize + 1000;
    std::fs::write(f.root.join("dl/1.0-to-2.0.partial"), &served[..cut]).unwrap();
    let got = f.download("1.0-to-2.0", &dest, &d).unwrap();
    assert_eq!(
        got.resumed, d.chunk_size,
        "resumes from the last verified chunk"
    );
    assert_eq!(got.downloaded, d.size - d.chunk_size);
    assert_eq!(std::fs::read(&dest).unwrap(), served);
    // A rerun downloads nothing.
    assert_eq!(f.download("1.0-to-2.0", &dest, &d).unwrap().downloaded, 0);
    // What was verified decompresses to the exact stream.
    let mut stream = Vec::new();
    std::io::copy(&mut liblzma::read::XzDecoder::new(&served[..]), &mut stream).unwrap();
    assert_eq!(stream, noise(9 << 20, 3));
}

#[test]
fn corrupted_truncated_and_oversized_artifacts_are_refused() {
    let f = start(Duration::ZERO, u64::MAX);
    let d = f.descriptor("full-2.0");
    let path = f.root.join("store/artifacts/full-2.0");
    let good = std::fs::read(&path).unwrap();
    let dest = f.root.join("full-2.0");

    let mut bad = good.clone();
    bad[10] ^= 0xff;
    std::fs::write(&path, &bad).unwrap();
    let err = f.download("full-2.0", &dest, &d).unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<Error>(),
            Some(Error::ChecksumMismatch { .. })
        ),
        "{err:#}"
    );
    assert!(!dest.exists());

    std::fs::write(&path, &good[..good.len() - 100]).unwrap();
    let err = f.download("full-2.0", &dest, &d).unwrap_err();
    assert!(format!("{err:#}").contains("ended after"), "{err:#}");
    assert!(!dest.exists());

    let mut long = good.clone();
    long.extend_from_slice(b"trailing junk");
    std::fs::write(&path, &long).unwrap();
    let err = f.download("full-2.0", &dest, &d).unwrap_err();
    assert!(format!("{err:#}").contains("longer than"), "{err:#}");
    assert!(!dest.exists());

    // With the right bytes back, the same partial state completes.
    std::fs::write(&path, &good).unwrap();
    f.download("full-2.0", &dest, &d).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), good);
}

#[test]
fn cache_cap_evicts_least_recently_used() {
    let f = start(Duration::ZERO, 4 << 20);
    f.descriptor("full-1.0");
    f.descriptor("full-2.0");
    let artifacts = f.root.join("store/artifacts");
    assert!(
        !artifacts.join("full-1.0").exists(),
        "the older artifact was evicted"
    );
    assert!(artifacts.join("full-2.0").exists());
}

#[test]
fn complete_but_corrupt_download_is_verified_and_fetched_again() {
    let f = start(Duration::ZERO, u64::MAX);
    let d = f.descriptor("full-2.0");
    let good = std::fs::read(f.root.join("store/artifacts/full-2.0")).unwrap();
    let dest = f.root.join("full-2.0");
    f.download("full-2.0", &dest, &d).unwrap();
    // The finished file rots on disk: right size, wrong bytes.
    let mut rotten = good.clone();
    rotten[good.len() / 2] ^= 0x01;
    std::fs::write(&dest, &rotten).unwrap();
    let got = f.download("full-2.0", &dest, &d).unwrap();
    assert_eq!(got.downloaded, d.size, "the bad file was fetched again");
    assert_eq!(std::fs::read(&dest).unwrap(), good);
}

#[test]
fn descriptor_with_absurd_chunk_sizes_fails_without_panicking() {
    let f = start(Duration::ZERO, u64::MAX);
    let good = f.descriptor("full-2.0");
    let dest = f.root.join("full-2.0");
    for chunk_size in [0, 1 << 62, u64::MAX] {
        let mut d = good.clone();
        d.chunk_size = chunk_size;
        let err = f.download("full-2.0", &dest, &d).unwrap_err();
        assert!(
            format!("{err:#}").contains("chunk_size"),
            "chunk_size {chunk_size}: {err:#}"
        );
        assert!(!dest.exists());
    }
}

/// A store whose diff `1.0-to-2.0` is the full stream of 1.0 (the base image, as the source
/// gives it for the reference) with `edits` scattered runs of new bytes: what an update that
/// rewrites files in place looks like to ZFS.
fn edited_diff_setup(edits: usize) -> server_fixture::shared::Fixture {
    edited_diff_with(edits, server_fixture::shared::Setup::default().tuning)
}

/// [`edited_diff_setup`] on a server tuned so.
fn edited_diff_with(
    edits: usize,
    tuning: upgradectl::server::Tuning,
) -> server_fixture::shared::Fixture {
    use server_fixture::shared::{start_with, Setup};
    let f = start_with(Setup {
        full_size: 8 << 20,
        diff_size: 1,
        tuning,
        ..Setup::default()
    });
    let streams = f.root.join("streams");
    let mut diff = std::fs::read(streams.join("full-1.0")).unwrap();
    for i in 0..edits {
        let at = (i * 7919 * 64) % (diff.len() - 64);
        diff[at..at + 64].copy_from_slice(&noise(64, i as u64 + 100));
    }
    std::fs::write(streams.join("1.0-to-2.0"), diff).unwrap();
    f
}

#[test]
fn a_diff_that_matches_its_base_is_compressed_against_it_and_decodes_to_the_stream() {
    use upgradectl::appliance::prepare::receive;
    use upgradectl::core::manifest::Encoding;
    let f = edited_diff_setup(50);
    let d = f.descriptor("1.0-to-2.0");
    let stream = std::fs::read(f.root.join("streams/1.0-to-2.0")).unwrap();
    assert_eq!(d.encoding, Encoding::ZstdRef);
    // 8 MiB of noise, 3.2 KB of it new: xz cannot shrink it, the base gives all but the news.
    assert!(d.size < 64 << 10, "{} bytes", d.size);
    // The frame states the stream's length: that is the window, 2^23, the decoder allocates.
    assert_eq!(d.window_log, Some(23));
    let dest = f.root.join("dl/1.0-to-2.0");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    f.download("1.0-to-2.0", &dest, &d).unwrap();
    let reference = f.root.join("streams/full-1.0");
    let mut out = Vec::new();
    let file = std::fs::File::open(&dest).unwrap();
    receive::decompress(file, Some(reference.clone()), &mut out, 8 << 20, None).unwrap();
    assert!(out == stream, "decodes to the stream");
    // Without room on disk, a box whose memory is below the frame's window refuses it before
    // decoding (exit 2).
    let file = std::fs::File::open(&dest).unwrap();
    let err = receive::decompress(
        file,
        Some(reference.clone()),
        &mut Vec::new(),
        4 << 20,
        None,
    )
    .unwrap_err();
    assert_eq!(
        upgradectl::error::classify(&err).0,
        upgradectl::error::Exit::Refused,
        "{err:#}"
    );
    // As `prepare` runs it: the descriptor states the frame's length, the box sets that much
    // aside on disk and decodes the frame through a file there, which is gone after.
    assert_eq!(d.frame_bytes, Some(stream.len() as u64));
    let scratch = f.root.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let on_disk = receive::on_disk(&d, 4 << 20, &scratch).expect("a frame above memory");
    assert_eq!(on_disk.max_bytes, stream.len() as u64);
    let file = std::fs::File::open(&dest).unwrap();
    let mut out = Vec::new();
    receive::decompress(file, Some(reference), &mut out, 4 << 20, Some(on_disk)).unwrap();
    assert!(out == stream, "decodes to the stream on disk");
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
}

/// A kernel update's stream (546 MB on bench/diff-size's real one) is longer than a box may
/// give its decoder (`download.max_decoder_mib`, default 256 MiB): as one frame, whose buffer
/// is the stream's length, every box with the default limit took the full stream instead (285
/// MB instead of 78). The server cuts the stream into frames of at most `zstd_ref_frame` bytes,
/// each against the whole base: the box's buffer is one frame, whatever the stream's length.
#[test]
fn a_diff_longer_than_the_boxs_decoder_limit_is_cut_into_frames_it_can_decode() {
    use upgradectl::appliance::prepare::receive;
    use upgradectl::core::manifest::Encoding;
    use upgradectl::server::Tuning;
    let f = edited_diff_with(
        50,
        Tuning {
            retry_after: 1,
            zstd_ref_level: 3,
            zstd_ref_frame: 1 << 20,
            ..Tuning::default()
        },
    );
    let streams = f.root.join("streams");
    let diff = std::fs::read(streams.join("1.0-to-2.0")).unwrap();
    let d = f.descriptor("1.0-to-2.0");
    assert_eq!(d.encoding, Encoding::ZstdRef);
    // Eight frames of 1 MiB, each still matched against the whole base: as small as one frame.
    assert!(d.size < 96 << 10, "{} bytes", d.size);
    assert_eq!(
        d.window_log,
        Some(20),
        "the buffer is a frame's, not the stream's"
    );
    let dest = f.root.join("dl/1.0-to-2.0");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    f.download("1.0-to-2.0", &dest, &d).unwrap();
    let reference = streams.join("full-1.0");
    let decode = |max_memory: u64| {
        let mut out = Vec::new();
        let file = std::fs::File::open(&dest).unwrap();
        receive::decompress(file, Some(reference.clone()), &mut out, max_memory, None).map(|()| out)
    };
    // 2 MiB of decoder memory decodes an 8 MiB stream.
    assert!(decode(2 << 20).unwrap() == diff, "decodes to the stream");
    // Below one frame: refused before decoding (exit 2).
    let err = decode(512 << 10).unwrap_err();
    assert_eq!(
        upgradectl::error::classify(&err).0,
        upgradectl::error::Exit::Refused,
        "{err:#}"
    );
}

/// A server that cannot read the base's snapshot device (its unit gives it no access, or the
/// snapshot is gone) still serves the diff, as xz: zstd-ref is an optimisation, never a
/// condition of delivery.
#[test]
fn a_server_that_cannot_read_the_base_serves_the_diff_as_xz() {
    use server_fixture::shared::{start_with, Setup};
    use upgradectl::core::manifest::Encoding;
    let f = start_with(Setup::default());
    f.source
        .reference_unreadable
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let d = f.descriptor("1.0-to-2.0");
    assert_eq!(d.encoding, Encoding::Xz);
    assert_eq!(d.window_log, None);
    let dest = f.root.join("dl/1.0-to-2.0");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    f.download("1.0-to-2.0", &dest, &d).unwrap();
    let mut out = Vec::new();
    upgradectl::appliance::prepare::receive::decompress(
        std::fs::File::open(&dest).unwrap(),
        None,
        &mut out,
        256 << 20,
        None,
    )
    .unwrap();
    assert!(out == std::fs::read(f.root.join("streams/1.0-to-2.0")).unwrap());
}

#[test]
fn a_diff_no_smaller_than_the_full_stream_is_not_served_and_boxes_are_sent_to_the_full_stream() {
    use server_fixture::shared::{start_with, Setup};
    // A 9 MiB diff of noise against a 10 MiB full stream: served (the full one estimated).
    let f = start_with(Setup::default());
    f.descriptor("1.0-to-2.0");
    // A 9 MiB diff against a 3 MiB full stream: a major upgrade. Estimated, then as built.
    for build_full_first in [false, true] {
        let f = start_with(Setup {
            full_size: 3 << 20,
            ..Setup::default()
        });
        if build_full_first {
            f.descriptor("full-2.0");
        }
        let path = "/v1/artifacts/1.0-to-2.0.descriptor";
        let mut answer = f.get(path);
        for _ in 0..1200 {
            if answer.0 != 503 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            answer = f.get(path);
        }
        let (status, _, body) = answer;
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("take full-2.0"), "{body}");
        let store = f.root.join("store/artifacts");
        assert!(!store.join("1.0-to-2.0").exists());
        let record = std::fs::read_to_string(store.join("1.0-to-2.0.not-smaller")).unwrap();
        let expected = if build_full_first {
            "built"
        } else {
            "estimated"
        };
        assert!(record.contains(expected), "{record}");
        // Asked again: the same answer at once, never built again.
        let builds = f.server.builds_started();
        assert_eq!(f.get(path).0, 404);
        assert_eq!(f.get("/v1/artifacts/1.0-to-2.0").0, 404);
        assert_eq!(f.server.builds_started(), builds);
    }
}

/// A proxy in front of the server for one connection: it passes the request, the response's
/// head and its body's first `pass` bytes, then holds the rest until `go` says so (or forever
/// when `go` is dropped unsent): a download that stalls after a chunk for as long as the test
/// wants. With `flip`, it flips that byte of the body on the way (a corrupt cache, a bad link).
fn stalling_proxy(
    server: std::net::SocketAddr,
    pass: usize,
    go: std::sync::mpsc::Receiver<()>,
    flip: Option<usize>,
) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut upstream = std::net::TcpStream::connect(server).unwrap();
        let (mut up, mut down) = (upstream.try_clone().unwrap(), client.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut down, &mut up));
        let (mut head, mut body_start, mut sent) = (Vec::new(), None, 0usize);
        let mut buf = vec![0u8; 64 << 10];
        let mut held = false;
        loop {
            let n = upstream.read(&mut buf).unwrap();
            if n == 0 {
                return;
            }
            if body_start.is_none() {
                head.extend_from_slice(&buf[..n]);
                body_start = head
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|p| p + 4);
            }
            let mut data = buf[..n].to_vec();
            if let (Some(start), Some(at)) = (body_start, flip) {
                if (sent..sent + n).contains(&(start + at)) {
                    data[start + at - sent] ^= 0xff;
                }
            }
            let limit = body_start.map_or(usize::MAX, |s| s + pass);
            let now = data.len().min(limit.saturating_sub(sent));
            client.write_all(&data[..now]).unwrap();
            sent += now;
            if now < data.len() {
                if !held && go.recv().is_err() {
                    return;
                }
                held = true;
                client.write_all(&data[now..]).unwrap();
                sent += data.len() - now;
            }
        }
    });
    addr
}

type VerifiedReader<'a> = upgradectl::appliance::prepare::stream::VerifiedReader<'a>;

/// What the two sides of a streamed download said, in the order they said it.
#[derive(Debug)]
enum Said {
    /// The decoder wrote its first bytes: these.
    Decoded(Vec<u8>),
    /// The download returned.
    Downloaded,
}

/// The decoder's output, telling `tx` of its first write.
struct Tell {
    tx: std::sync::mpsc::Sender<Said>,
    out: Vec<u8>,
}

impl std::io::Write for Tell {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.is_empty() && !buf.is_empty() {
            let _ = self.tx.send(Said::Decoded(buf.to_vec()));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Downloads `d` through the proxy at `proxy` while `decode` reads it through a
/// `VerifiedReader`, side by side as `prepare` runs them (`stream::overlap`), while `between`
/// runs here: the download's result, the decoder's, and what the decoder wrote.
fn download_while_decoding(
    proxy: std::net::SocketAddr,
    d: &upgradectl::core::manifest::Descriptor,
    dest: &std::path::Path,
    tx: std::sync::mpsc::Sender<Said>,
    decode: impl FnOnce(VerifiedReader, &mut Tell) -> anyhow::Result<()> + Send,
    between: impl FnOnce(),
) -> (anyhow::Result<fetch::Fetched>, anyhow::Result<()>, Vec<u8>) {
    use upgradectl::appliance::prepare::stream;
    std::thread::scope(|s| {
        let decoder_tx = tx.clone();
        let running = s.spawn(move || {
            let mut out = Tell {
                tx: decoder_tx,
                out: Vec::new(),
            };
            let download = |verified: &stream::Verified| {
                // Patient: a held download must wait for the test, however loaded the host.
                let patient = fetch::Limits {
                    stall: Duration::from_secs(600),
                    min_speed: 1,
                };
                let client = fetch::client(&patient).unwrap();
                let url = format!("http://{proxy}/v1/artifacts/{}", d.name);
                let r = fetch::download_watched(
                    &client,
                    &url,
                    dest,
                    d,
                    &patient,
                    &mut |_, _| {},
                    Some(verified),
                );
                tx.send(Said::Downloaded).unwrap();
                match &r {
                    Ok(_) => verified.complete(d.size),
                    Err(e) => verified.fail(&format!("{e:#}")),
                }
                r
            };
            let (fetched, decoded) = stream::overlap(download, |input| decode(input, &mut out));
            (fetched, decoded, out.out)
        });
        between();
        running.join().unwrap()
    })
}

/// Downloads `1.0-to-2.0` after an earlier run left its first `resumed` bytes, through a proxy
/// that passes `pass` bytes of the body and holds the rest until the decoder wrote its first
/// bytes; then checks the download and the decoded stream. A decoder that waited for the end
/// of the download would wait forever (the hang guard fails the test).
fn decodes_before_the_held_rest_arrives(resumed: usize, pass: usize) -> fetch::Fetched {
    use std::sync::mpsc;
    let f = start(Duration::ZERO, u64::MAX);
    let d = f.descriptor("1.0-to-2.0");
    assert!(d.chunks.len() >= 3, "{} chunks", d.chunks.len());
    assert_eq!(d.chunk_size as usize, CHUNK);
    let served = std::fs::read(f.root.join("store/artifacts/1.0-to-2.0")).unwrap();
    let stream = noise(9 << 20, 3);
    let dest = f.root.join("dl/1.0-to-2.0");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    if resumed > 0 {
        std::fs::write(fetch::partial_path(&dest), &served[..resumed]).unwrap();
    }
    let (go, hold) = mpsc::channel();
    let proxy = stalling_proxy(f.addr, pass, hold, None);
    let (tx, said) = mpsc::channel();
    // The single-threaded decoder: it hands out what each input it takes decodes to. The
    // threaded one (`receive::decompress`) may keep the last decoded bytes until it is given
    // more input, which this proxy holds until the decoder spoke: a wait on each other.
    let decode = |input: VerifiedReader, out: &mut Tell| -> anyhow::Result<()> {
        std::io::copy(&mut liblzma::read::XzDecoder::new(input), out)?;
        Ok(())
    };
    let (fetched, decoded, out) = download_while_decoding(proxy, &d, &dest, tx, decode, || {
        // Only a guard against a hang: the order of events is what is asserted.
        match said.recv_timeout(Duration::from_secs(300)) {
            Ok(Said::Decoded(first)) => {
                assert!(stream.starts_with(&first), "the stream's first bytes")
            }
            other => panic!("the decoder said nothing before the download ended: {other:?}"),
        }
        go.send(()).unwrap();
        assert!(matches!(said.recv().unwrap(), Said::Downloaded));
    });
    let fetched = fetched.unwrap();
    assert_eq!(fetched.downloaded + fetched.resumed, d.size);
    decoded.unwrap();
    assert!(out == stream, "decodes to the exact stream");
    assert!(std::fs::read(&dest).unwrap() == served);
    fetched
}

/// The chunk size the server uses.
const CHUNK: usize = upgradectl::core::hashing::CHUNK_SIZE as usize;

#[test]
fn the_decoder_gets_verified_chunks_while_the_rest_of_the_download_is_held() {
    // The first chunk and one byte more arrive; then nothing, until the decoder spoke.
    let fetched = decodes_before_the_held_rest_arrives(0, CHUNK + 1);
    assert_eq!(fetched.resumed, 0);
}

#[test]
fn a_resumed_download_s_verified_prefix_is_decoded_before_any_byte_arrives() {
    // An earlier run got a chunk and a bit; this run gets no byte until the decoder spoke.
    let fetched = decodes_before_the_held_rest_arrives(CHUNK + 1000, 0);
    assert_eq!(
        fetched.resumed, CHUNK as u64,
        "resumed from the verified chunk"
    );
}

#[test]
fn a_bad_chunk_stops_the_decoder_with_the_download_error_before_it_sees_the_chunk() {
    use std::sync::mpsc;
    use upgradectl::appliance::prepare::stream;
    let f = start(Duration::ZERO, u64::MAX);
    let d = f.descriptor("1.0-to-2.0");
    let dest = f.root.join("dl/1.0-to-2.0");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    // The second chunk arrives with one byte flipped; nothing is held.
    let (go, hold) = mpsc::channel();
    go.send(()).unwrap();
    let flip = d.chunk_size as usize + 100;
    let proxy = stalling_proxy(f.addr, usize::MAX >> 1, hold, Some(flip));
    let (tx, _said) = mpsc::channel();
    let decode = |input: VerifiedReader, out: &mut Tell| {
        upgradectl::appliance::prepare::receive::decompress(input, None, out, 256 << 20, None)
    };
    let (fetched, decoded, out) = download_while_decoding(proxy, &d, &dest, tx, decode, || {});
    let err = fetched.unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<Error>(),
            Some(Error::ChecksumMismatch { .. })
        ),
        "{err:#}"
    );
    let err = decoded.unwrap_err();
    assert!(stream::is_download_stopped(&err), "{err:#}");
    assert!(format!("{err:#}").contains("chunk 1"), "{err:#}");
    // Noise is stored in xz as it is: a flipped input byte would be a flipped output byte.
    // What came out is the stream's own start, and no more than the verified chunk holds.
    assert!(
        noise(9 << 20, 3).starts_with(&out),
        "{} bytes decoded",
        out.len()
    );
    assert!(
        out.len() as u64 <= d.chunk_size,
        "{} bytes decoded",
        out.len()
    );
    // The bad chunk was cut off; the good one is kept for the next run.
    let partial = fetch::partial_path(&dest);
    assert_eq!(std::fs::metadata(partial).unwrap().len(), d.chunk_size);
}

/// A failure after the download is whole (prepare's `prepare::downloaded`; a full disk at the
/// rename) stops the receive: the decoder gets the last chunk only once the download is durable
/// and its caller said so. Releasing it inside the download let such a failure leave the
/// receive complete (found by `vm-tests/run prepfaults`).
#[test]
fn a_failure_after_the_download_stops_the_receive_before_its_end() {
    use upgradectl::appliance::prepare::{receive, stream};
    let f = start(Duration::ZERO, u64::MAX);
    let d = f.descriptor("full-2.0");
    let dest = f.root.join("dl/full-2.0");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    let client = fetch::client(&limits()).unwrap();
    let url = f.url("/v1/artifacts/full-2.0");
    let (fetched, received) = stream::overlap(
        |verified| {
            let downloaded = fetch::download_watched(
                &client,
                &url,
                &dest,
                &d,
                &limits(),
                &mut |_, _| {},
                Some(verified),
            );
            let failed = downloaded.and_then(|_| -> anyhow::Result<fetch::Fetched> {
                anyhow::bail!("a failure after the download")
            });
            verified.end(failed, d.size)
        },
        |input| receive::decompress(input, None, &mut std::io::sink(), 256 << 20, None),
    );
    assert!(fetched.is_err());
    let err = received.unwrap_err();
    assert!(stream::is_download_stopped(&err), "{err:#}");
    // The download itself is whole and in place for the next run.
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), d.size);
}

#[test]
fn a_receive_that_fails_stops_the_download_at_its_next_chunk() {
    use std::sync::mpsc;
    use upgradectl::appliance::prepare::stream;
    let f = start(Duration::ZERO, u64::MAX);
    let d = f.descriptor("1.0-to-2.0");
    assert!(d.chunks.len() >= 3, "{} chunks", d.chunks.len());
    let dest = f.root.join("dl/1.0-to-2.0");
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    // The first chunk and a byte arrive, then nothing until the receive has failed.
    let (go, hold) = mpsc::channel();
    let proxy = stalling_proxy(f.addr, CHUNK + 1, hold, None);
    let (tx, said) = mpsc::channel();
    let (failing, failed) = mpsc::channel();
    // A receive that fails on its first input (`zfs receive` refusing the stream).
    let decode = move |mut input: VerifiedReader, _: &mut Tell| -> anyhow::Result<()> {
        let mut first = [0u8; 1];
        std::io::Read::read_exact(&mut input, &mut first)?;
        failing.send(()).unwrap();
        anyhow::bail!("cannot receive new filesystem stream: destination exists")
    };
    let (fetched, decoded, _) = download_while_decoding(proxy, &d, &dest, tx, decode, || {
        // Only a guard against a hang: the receive read the verified first chunk and fails.
        failed.recv_timeout(Duration::from_secs(300)).unwrap();
        go.send(()).unwrap();
        assert!(matches!(
            said.recv_timeout(Duration::from_secs(300)),
            Ok(Said::Downloaded)
        ));
    });
    let err = decoded.unwrap_err();
    assert!(format!("{err:#}").contains("destination exists"), "{err:#}");
    let err = fetched.unwrap_err();
    assert!(
        err.downcast_ref::<stream::ReceiveStopped>().is_some(),
        "the download went on after the receive failed: {err:#}"
    );
    // It stopped at a chunk before the end and kept what it verified, for a later run.
    let partial = std::fs::metadata(fetch::partial_path(&dest)).unwrap().len();
    assert_eq!(partial % d.chunk_size, 0, "{partial}");
    assert!(partial < d.size, "{partial} of {} bytes", d.size);
    assert!(!dest.exists());
}

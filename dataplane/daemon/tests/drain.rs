//! Issue #14: a clean drain. On shutdown (SIGTERM) the proxy stops accepting, lets in-flight
//! requests and their response bodies finish, and exits as soon as they are done; requests
//! abandoned by their clients neither leak memory nor hold the drain.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::*;
use wasmfilter_dataplane::Dataplane;

const HUNDRED_MB: usize = 100_000_000;

#[test]
fn a_100_mb_download_finishes_during_drain() {
    let up = raw_upstream(|path, _, s| {
        if path != "/big" {
            return answer(s, 200, b"ok");
        }
        let _ = s.write_all(
            format!("HTTP/1.1 200 OK\r\ncontent-length: {HUNDRED_MB}\r\n\r\n").as_bytes(),
        );
        let chunk = vec![b'd'; 100_000];
        for _ in 0..HUNDRED_MB / chunk.len() {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let dir = temp_dir("download");
    let config = write_config(
        &dir,
        "127.0.0.1:0",
        "127.0.0.1:0",
        "drainTimeout: 60s\n",
        &up.to_string(),
        "",
    );
    let dp = Dataplane::start(&config).unwrap();
    let addr = dp.proxy_addr;
    let probe = Probe::start(addr);
    let (started_tx, started_rx) = mpsc::channel();
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n")
            .unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = Vec::new();
        // The head and the first mebibyte, then tell the test to begin the drain.
        while got.len() < 1 << 20 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the download ended early");
            got.extend_from_slice(&buf[..n]);
        }
        let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
        let mut body = got.len() - head_end;
        started_tx.send(()).unwrap();
        // A slow reader: the rest takes seconds, far longer than the old 0.2 s cut.
        let mut reads = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => body += n,
                Err(e) => panic!("the download failed after {body} bytes: {e}"),
            }
            reads += 1;
            if reads.is_multiple_of(8) {
                std::thread::sleep(Duration::from_millis(5));
            }
            if body >= HUNDRED_MB {
                break;
            }
        }
        (head, body, Instant::now())
    });
    started_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    let (ok, failed) = probe.stop();
    let drain_started = Instant::now();
    let shutdown = std::thread::spawn(move || {
        dp.shutdown();
        Instant::now()
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        TcpStream::connect(addr).is_err(),
        "draining: no new connection is accepted"
    );
    let (head, body, done) = client.join().unwrap();
    let returned = shutdown.join().unwrap();
    println!(
        "100 MB download: finished {:?} after the drain began; shutdown returned {:?} after it finished",
        done - drain_started,
        returned.saturating_duration_since(done)
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, HUNDRED_MB, "the whole body arrived during the drain");
    assert!(
        returned.saturating_duration_since(done) < Duration::from_secs(20),
        "shutdown returned once the download was done, not at drainTimeout (60s)"
    );
    assert_eq!(failed, 0);
    assert!(ok > 0);
}

#[test]
fn ten_thousand_abandoned_requests_leave_rss_flat_and_sigterm_exits_at_once() {
    // The slow upstream never answers; it holds each request until the proxy lets go.
    let up = raw_upstream(|path, _, s| {
        if path != "/slow" {
            return answer(s, 200, b"ok");
        }
        let mut buf = [0u8; 1024];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
    let dir = temp_dir("abandoned");
    let (proxy, admin) = (free_addr(), free_addr());
    let config = write_config(
        &dir,
        &proxy.to_string(),
        &admin.to_string(),
        "drainTimeout: 60s\n",
        &up.to_string(),
        "",
    );
    let mut child = Child::spawn_with(&config, admin, &[]);
    let probe = Probe::start(proxy);
    let abandon = |n: usize| {
        for _ in 0..n / 250 {
            let batch: Vec<TcpStream> = (0..250)
                .filter_map(|_| {
                    let mut s = TcpStream::connect(proxy).ok()?;
                    s.write_all(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n").ok()?;
                    Some(s)
                })
                .collect();
            assert_eq!(batch.len(), 250);
            std::thread::sleep(Duration::from_millis(50));
            drop(batch);
        }
    };
    abandon(1000);
    std::thread::sleep(Duration::from_millis(500));
    let rss_warm = child.rss_kib();
    abandon(9000);
    std::thread::sleep(Duration::from_millis(1000));
    let rss_after = child.rss_kib();
    let (ok, failed) = probe.stop();
    // The cluster's circuit breakers got every slot back: it still serves.
    let after = get(proxy, "/after");
    let metrics = get(admin, "/metrics").1;
    let open = metric(&metrics, "wasmfilter_downstream_connections");
    let took = child.terminate();
    println!(
        "10,000 abandoned requests: RSS {rss_warm} KiB after the first 1,000, {rss_after} KiB after all ({:+} KiB); open client connections then {open}; SIGTERM -> exit in {took:?} (drainTimeout 60s); probe {ok} answers, {failed} failures",
        rss_after as i64 - rss_warm as i64
    );
    assert_eq!(after.0, 200, "{after:?}");
    assert!(
        rss_after < rss_warm + 16 * 1024,
        "RSS kept growing: {rss_warm} -> {rss_after} KiB"
    );
    assert!(
        took < Duration::from_secs(20),
        "nothing was in flight, yet the exit took {took:?}"
    );
    assert_eq!(failed, 0);
    assert!(ok > 0);
}

//! Issue #14: no client can pin the proxy. Slow and silent clients are cut by their timeouts,
//! a stalled upstream by `timeouts.upstreamIdle`, a full cluster by its circuit breakers, an
//! upstream that refuses early reaches a client still uploading, descriptor exhaustion is
//! survived with `/live` answering, and a zero-window HTTP/2 client holds no more than the
//! buffer budget. Each test runs a probe client that must keep getting answers meanwhile.
//!
//! Clients and upstreams are raw sockets or hyper over loopback; the process-level tests
//! (descriptors, memory) run the `wasmfilter-dataplane` binary.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;
use wasmfilter_dataplane::Dataplane;

/// Reads whatever the server sends until it closes, or `limit` passes. `Ok(bytes)` when the
/// server closed (EOF or reset), `Err(bytes)` when the connection was still open at `limit`.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(got);
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(got);
            }
            Err(_) => return Ok(got),
        }
    }
}

/// Whether the server has closed `s` (a read sees EOF or a reset; data is drained).
fn closed(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let out = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    out
}

#[test]
fn slowloris_and_idle_connections_are_closed_by_their_timeouts() {
    let up = raw_upstream(|_, _, s| answer(s, 200, b"ok"));
    let dir = temp_dir("slowloris");
    let config = write_config(
        &dir,
        "127.0.0.1:0",
        "127.0.0.1:0",
        "timeouts: {headerRead: 500ms, idle: 1s}\n",
        &up.to_string(),
        "",
    );
    let dp = Dataplane::start(&config).unwrap();
    let addr = dp.proxy_addr;
    let probe = Probe::start(addr);
    // 200 slowloris clients (one header line every 100 ms, never the blank line), 200 that
    // send nothing, 50 keep-alive clients idle after one answer.
    let mut slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /slow HTTP/1.1\r\nhost: t\r\n").unwrap();
            s
        })
        .collect();
    let mut silent: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let mut kept: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /one HTTP/1.1\r\nhost: t\r\n\r\n")
                .unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            assert!(
                buf[..n].starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&buf[..n])
            );
            s
        })
        .collect();
    let started = Instant::now();
    let mut all_closed_after = None;
    while started.elapsed() < Duration::from_secs(8) {
        for s in &mut slow {
            let _ = s.write_all(b"x-slow: 1\r\n");
        }
        let open = slow
            .iter_mut()
            .chain(silent.iter_mut())
            .chain(kept.iter_mut())
            .map(|s| !closed(s))
            .filter(|open| *open)
            .count();
        if open == 0 {
            all_closed_after = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, failed) = probe.stop();
    println!(
        "450 slow/silent/idle connections all closed after {all_closed_after:?}; probe: {ok} answers, {failed} failures"
    );
    assert!(
        all_closed_after.is_some(),
        "connections still open after 8 s with a 500 ms header timeout"
    );
    assert_eq!(failed, 0, "the probe kept getting answers");
    assert!(ok > 0);

    // HTTP/2: a connection left idle after one answer is closed (GOAWAY) by `timeouts.idle`.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let idle_closed_after = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let req = http::Request::get(format!("http://{addr}/h2"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        drop(resp);
        let idle_from = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the idle HTTP/2 connection was closed")
            .unwrap()
            .ok();
        idle_from.elapsed()
    });
    println!("an idle HTTP/2 connection was closed after {idle_closed_after:?} (timeouts.idle 1s)");
    assert!(idle_closed_after >= Duration::from_millis(900));
    dp.shutdown();
}

#[test]
fn an_upstream_that_stalls_mid_body_is_cut_by_the_idle_timeout() {
    let up = raw_upstream(|path, _, s| {
        if path != "/stall" {
            return answer(s, 200, b"ok");
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n");
        let _ = s.write_all(&[b'a'; 1000]);
        // ... and nothing more for a minute.
        std::thread::sleep(Duration::from_secs(60));
    });
    let dir = temp_dir("stall");
    let config = write_config(
        &dir,
        "127.0.0.1:0",
        "127.0.0.1:0",
        "timeouts: {upstreamIdle: 300ms}\n",
        &up.to_string(),
        "",
    );
    let dp = Dataplane::start(&config).unwrap();
    let probe = Probe::start(dp.proxy_addr);
    let mut s = TcpStream::connect(dp.proxy_addr).unwrap();
    s.write_all(b"GET /stall HTTP/1.1\r\nhost: t\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let got = read_until_closed(&mut s, Duration::from_secs(10));
    let took = started.elapsed();
    let (ok, failed) = probe.stop();
    println!(
        "stalled upstream: client connection ended after {took:?}; probe {ok} answers, {failed} failures"
    );
    let got = got.expect("the client's response was cut, not left hanging");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(got.len() < 100_000, "the body is cut short");
    assert_eq!(failed, 0);
    assert!(ok > 0);
    dp.shutdown();
}

#[test]
fn circuit_breakers_trip_with_503_and_a_metric() {
    let up = raw_upstream(|path, _, s| {
        if path.starts_with("/slow") {
            std::thread::sleep(Duration::from_millis(1500));
        }
        answer(s, 200, b"ok")
    });
    for (breakers, label) in [
        ("{maxRequests: 2}", "max_requests"),
        ("{maxPendingRequests: 2}", "max_pending_requests"),
        ("{maxConnections: 2}", "max_connections"),
    ] {
        let dir = temp_dir(&format!("breaker-{label}"));
        let config = write_config(
            &dir,
            "127.0.0.1:0",
            "127.0.0.1:0",
            "",
            &up.to_string(),
            &format!("    circuitBreakers: {breakers}\n"),
        );
        let dp = Dataplane::start(&config).unwrap();
        let probe = Probe::start(dp.proxy_addr);
        let addr = dp.proxy_addr;
        let clients: Vec<_> = (0..6)
            .map(|i| std::thread::spawn(move || get(addr, &format!("/slow/{i}"))))
            .collect();
        let answers: Vec<(u16, String)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        let ok = answers.iter().filter(|(s, _)| *s == 200).count();
        let refused: Vec<_> = answers.iter().filter(|(s, _)| *s == 503).collect();
        let (probe_ok, probe_failed) = probe.stop();
        println!(
            "{label}=2: 6 concurrent slow requests: {ok} answered 200, {} refused 503",
            refused.len()
        );
        assert_eq!(ok, 2, "{answers:?}");
        assert_eq!(refused.len(), 4, "{answers:?}");
        assert!(
            refused.iter().all(|(_, body)| body.contains(label)),
            "{refused:?}"
        );
        let metrics = get(dp.admin_addr, "/metrics").1;
        let line = format!(
            "wasmfilter_upstream_circuit_open_total{{cluster=\"main\",breaker=\"{label}\"}} 4"
        );
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
        assert_eq!(probe_failed, 0);
        assert!(probe_ok > 0);
        // Once the slow requests are done, the cluster serves again.
        assert_eq!(get(addr, "/slow/after").0, 200);
        dp.shutdown();
    }
}

#[test]
fn an_early_413_reaches_a_client_still_uploading_through_a_body_filter() {
    // The upstream refuses on the head alone and never reads the body.
    let up = raw_upstream(|path, _, s| {
        if path != "/upload" {
            return answer(s, 200, b"ok");
        }
        let _ =
            s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large");
        std::thread::sleep(Duration::from_secs(30));
    });
    let dir = temp_dir("early413");
    let config = write_config(&dir, "127.0.0.1:0", "127.0.0.1:0", "", &up.to_string(), "");
    let filters = format!(
        "filters:\n  - name: rewrite\n    module: {}\n    config: {{from: hello, to: HELLO}}\n    match: {{pathPrefixes: [/upload]}}\n    limits: {{callbackTimeout: 2s}}\n",
        rust_filter("body_rewrite").display()
    );
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap() + &filters,
    )
    .unwrap();
    let dp = Dataplane::start(&config).unwrap();
    let probe = Probe::start(dp.proxy_addr);
    let mut s = TcpStream::connect(dp.proxy_addr).unwrap();
    // 100 MB announced; 4 MiB sent, far more than any buffer on the way; the rest never.
    s.write_all(b"POST /upload HTTP/1.1\r\nhost: t\r\ncontent-length: 100000000\r\n\r\n")
        .unwrap();
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = [b'x'; 64 * 1024];
            for _ in 0..64 {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    let got = read_until_closed(&mut s, Duration::from_secs(10));
    let (ok, failed) = probe.stop();
    let got = match got {
        Ok(b) | Err(b) => b,
    };
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 413"),
        "the client got the upstream's 413 while still uploading: {text:?}"
    );
    assert!(text.ends_with("too large"), "{text}");
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    assert_eq!(failed, 0);
    assert!(ok > 0);
    dp.shutdown();
}

#[test]
fn descriptor_exhaustion_is_survived_and_live_keeps_answering() {
    let up = raw_upstream(|_, _, s| answer(s, 200, b"ok"));
    let dir = temp_dir("emfile");
    let (proxy, admin) = (free_addr(), free_addr());
    let config = write_config(
        &dir,
        &proxy.to_string(),
        &admin.to_string(),
        "timeouts: {headerRead: 60s, idle: 60s}\n",
        &up.to_string(),
        "",
    );
    // The process gets 256 descriptors (prlimit, util-linux) so a few hundred clients exhaust them.
    let mut child = Child::spawn_with(&config, admin, &["prlimit", "--nofile=256:256", "--"]);
    let probe_live = Probe::start_path(admin, "/live");
    let before_cpu = child.cpu_ticks();
    // Clients each holding an open connection with a request head half sent: the proxy runs
    // out of descriptors long before they are all accepted.
    // Clients until connecting fails three times running (the kernel's backlog is full too),
    // or 600.
    let mut flood = Vec::new();
    let mut refused = 0;
    while flood.len() < 600 && refused < 3 {
        match TcpStream::connect_timeout(&proxy, Duration::from_secs(1)) {
            Ok(mut s) => {
                let _ = s.write_all(b"GET / HTTP/1.1\r\n");
                flood.push(s);
                refused = 0;
            }
            Err(_) => refused += 1,
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let measured = Instant::now();
    let cpu0 = child.cpu_ticks();
    std::thread::sleep(Duration::from_secs(2));
    let cpu =
        (child.cpu_ticks() - cpu0) as f64 / ticks_per_second() / measured.elapsed().as_secs_f64();
    let live = get(admin, "/live");
    let metrics = get(admin, "/metrics").1;
    let errors = metric(&metrics, "wasmfilter_downstream_accept_errors_total");
    let (live_ok, live_failed) = probe_live.stop();
    println!(
        "clients against 256 descriptors: {} connected, accept errors {errors}, CPU while exhausted {:.1}% of a core (from {before_cpu} ticks), /live probe {live_ok} answers, {live_failed} failures",
        flood.len(),
        cpu * 100.0
    );
    assert_eq!(live.0, 200, "/live answers while descriptors are exhausted");
    assert!(errors > 0.0, "the proxy did run out of descriptors");
    assert_eq!(live_failed, 0, "/live kept answering");
    drop(flood);
    // The flood gone, the proxy serves again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = 0;
    while Instant::now() < deadline {
        status = get(proxy, "/after").0;
        if status == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        status, 200,
        "the proxy serves again once descriptors are back"
    );
    child.terminate();
}

#[test]
fn a_zero_window_http2_client_on_many_streams_stays_within_the_buffer_budget() {
    // Every answer is 4 MiB: far more than a stream's share of the buffer.
    let up = raw_upstream(|path, _, s| {
        if path == "/probe" {
            return answer(s, 200, b"ok");
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4194304\r\n\r\n");
        let chunk = [b'z'; 64 * 1024];
        for _ in 0..64 {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let dir = temp_dir("zerowindow");
    let (proxy, admin) = (free_addr(), free_addr());
    let config = write_config(
        &dir,
        &proxy.to_string(),
        &admin.to_string(),
        "limits: {perConnectionBufferBytes: 1Mi, maxConcurrentStreams: 100}\n",
        &up.to_string(),
        "",
    );
    let mut child = Child::spawn_with(&config, admin, &[]);
    let probe = Probe::start(proxy);
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = child.rss_kib();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (streams, held, senders) = rt.block_on(async {
        let mut held = Vec::new();
        let mut senders = Vec::new();
        let mut streams = 0;
        for _ in 0..3 {
            let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
            let (send, conn) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .initial_stream_window_size(0)
                    .initial_connection_window_size(65535)
                    .adaptive_window(false)
                    .handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            for i in 0..100 {
                let mut send = send.clone();
                let req = http::Request::get(format!("http://{proxy}/big/{i}"))
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                if let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(10), send.send_request(req)).await
                {
                    streams += 1;
                    // Held, never read: the window stays 0.
                    held.push(resp);
                }
            }
            senders.push(send);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        (streams, held, senders)
    });
    let rss_after = child.rss_kib();
    let (ok, failed) = probe.stop();
    let grown = rss_after.saturating_sub(rss_before);
    println!(
        "3 zero-window HTTP/2 connections, {streams} streams of 4 MiB answers held: RSS {rss_before} -> {rss_after} KiB (+{grown} KiB, {} KiB per stream); probe {ok} answers, {failed} failures",
        grown / streams.max(1) as u64
    );
    drop(held);
    drop(senders);
    // The budget: 1 MiB per connection of HTTP/2 buffers, plus what each stream's task and
    // upstream connection cost (well under 64 KiB each). Before the limits: ~265 KiB a stream.
    assert!(streams >= 250, "the streams were opened: {streams}");
    assert!(
        grown < 3 * 1024 + streams as u64 * 64,
        "RSS grew by {grown} KiB for {streams} zero-window streams"
    );
    assert_eq!(failed, 0);
    assert!(ok > 0);
    child.terminate();
    drop(rt);
}

#[test]
fn limits_and_timeouts_out_of_range_are_refused_naming_the_field() {
    use wasmfilter_dataplane::config::Config;
    let base = "listen: 127.0.0.1:0\nroutes: [{name: r, cluster: c}]\n";
    let echo = "clusters: [{name: c, builtin: echo}]\n";
    let cases = [
        (format!("{base}{echo}timeouts: {{headerRead: 0s}}\n"), "timeouts.headerRead"),
        (format!("{base}{echo}timeouts: {{idle: 1500m}}\n"), "timeouts.idle"),
        (format!("{base}{echo}timeouts: {{upstreamIdle: 1ms}}\n"), "timeouts.upstreamIdle"),
        (format!("{base}{echo}timeouts: {{tlsHandshake: 10m}}\n"), "timeouts.tlsHandshake"),
        (format!("{base}{echo}timeouts: {{headerRaed: 1s}}\n"), "unknown field `headerRaed`"),
        (format!("{base}{echo}limits: {{maxConnections: 0}}\n"), "limits.maxConnections"),
        (format!("{base}{echo}limits: {{perConnectionBufferBytes: 1Ki}}\n"), "limits.perConnectionBufferBytes"),
        (format!("{base}{echo}limits: {{perConnectionBufferBytes: lots}}\n"), "lots"),
        (format!("{base}{echo}limits: {{maxConcurrentStreams: 0}}\n"), "limits.maxConcurrentStreams"),
        (format!("{base}{echo}limits: {{maxRequestHeadersBytes: 2Mi}}\n"), "limits.maxRequestHeadersBytes"),
        (format!("{base}clusters: [{{name: c, builtin: echo, circuitBreakers: {{maxRequests: 0}}}}]\n"), "clusters[0].circuitBreakers.maxRequests"),
        ("listen: 127.0.0.1:0\nroutes: [{name: r, cluster: c, timeout: 0s}]\nclusters: [{name: c, builtin: echo}]\n".to_string(), "routes[0].timeout"),
    ];
    for (yaml, field) in &cases {
        let err = Config::parse(yaml, "dp.yaml").expect_err(yaml).to_string();
        assert!(err.contains(field), "{field} in: {err}");
    }
    // Defaults (Envoy's and nginx's values), and what a valid file sets.
    let c = Config::parse(&format!("{base}{echo}"), "dp.yaml").unwrap();
    assert_eq!(c.timeouts.header_read, Duration::from_secs(10));
    assert_eq!(c.timeouts.idle, Duration::from_secs(75));
    assert_eq!(c.timeouts.upstream_idle, Duration::from_secs(60));
    assert_eq!(c.limits.max_connections, 10_000);
    assert_eq!(c.limits.per_connection_buffer_bytes, 1 << 20);
    assert_eq!(c.limits.max_concurrent_streams, 100);
    assert_eq!(c.limits.max_request_headers_bytes, 60 << 10);
    assert_eq!(c.clusters[0].circuit_breakers.max_requests, 1024);
    let c = Config::parse(
        &format!(
            "{base}{echo}limits: {{perConnectionBufferBytes: 2Mi, maxConcurrentStreams: 64}}\n"
        ),
        "dp.yaml",
    )
    .unwrap();
    assert_eq!(c.limits.per_stream_buffer_bytes(), 32 << 10);
}

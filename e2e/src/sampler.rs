//! Watching what the dataplanes run while things fail (tests/restart_safety.rs): a
//! [`Sampler`] polls each dataplane's `/config_dump` and records its chain; a [`Forwarder`]
//! stands between two processes as a Service or a slow network would.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::local::{config_dump, filter_names};

/// One poll of a dataplane: when (since the sampler started) and the names of its active
/// filters, or why `/config_dump` did not answer.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Duration,
    pub filters: Result<Arc<Vec<String>>, String>,
}

/// Polls the `/config_dump` of dataplanes (one thread each) until stopped.
pub struct Sampler {
    started: Instant,
    stop: Arc<AtomicBool>,
    threads: Vec<(String, JoinHandle<Vec<Sample>>)>,
    marks: Arc<Mutex<Vec<(Duration, String)>>>,
}

/// The longest a sampler runs, whatever the test does.
const SAMPLE_AT_MOST: Duration = Duration::from_secs(300);

impl Sampler {
    /// Starts one thread per `(id, admin address)`, each polling every `every`.
    pub fn start(dataplanes: &[(String, String)], every: Duration) -> Sampler {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = dataplanes
            .iter()
            .map(|(id, admin)| {
                let (stop, admin) = (stop.clone(), admin.clone());
                let thread = std::thread::spawn(move || {
                    let mut samples: Vec<Sample> = Vec::new();
                    let mut last: Option<Arc<Vec<String>>> = None;
                    while !stop.load(Ordering::SeqCst) && started.elapsed() < SAMPLE_AT_MOST {
                        let polled = Instant::now();
                        let filters =
                            config_dump(&admin)
                                .and_then(|d| filter_names(&d))
                                .map(|names| match &last {
                                    // The same chain shares one allocation.
                                    Some(prev) if **prev == names => prev.clone(),
                                    _ => Arc::new(names),
                                });
                        if let Ok(names) = &filters {
                            last = Some(names.clone());
                        }
                        samples.push(Sample {
                            at: polled.duration_since(started),
                            filters,
                        });
                        std::thread::sleep(every.saturating_sub(polled.elapsed()));
                    }
                    samples
                });
                (id.clone(), thread)
            })
            .collect();
        Sampler {
            started,
            stop,
            threads,
            marks: Arc::default(),
        }
    }

    /// Time since the sampler started (the clock of the samples).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Records an event (e.g. "operator killed") on the samples' clock, for the report.
    pub fn mark(&self, what: &str) {
        self.marks
            .lock()
            .unwrap()
            .push((self.started.elapsed(), what.to_string()));
    }

    /// Stops the threads and returns every dataplane's samples.
    pub fn stop(self) -> Samples {
        self.stop.store(true, Ordering::SeqCst);
        let chains = self
            .threads
            .into_iter()
            .map(|(id, thread)| ChainLog {
                id,
                samples: thread.join().expect("a sampler thread panicked"),
            })
            .collect();
        let marks = self.marks.lock().unwrap().clone();
        Samples { chains, marks }
    }
}

/// What a [`Sampler`] saw.
#[derive(Debug)]
pub struct Samples {
    pub chains: Vec<ChainLog>,
    /// Events the test marked, on the samples' clock.
    pub marks: Vec<(Duration, String)>,
}

/// The samples of one dataplane.
#[derive(Debug)]
pub struct ChainLog {
    pub id: String,
    pub samples: Vec<Sample>,
}

/// A stretch of consecutive samples in which some expected filter was not running.
#[derive(Debug, Clone)]
pub struct Dip {
    /// The first and last sample of the stretch.
    pub from: Duration,
    pub to: Duration,
    /// The fewest filters seen in it.
    pub smallest: usize,
    /// Expected filters missing at some point of it.
    pub missing: BTreeSet<String>,
    /// The chain sizes seen in it, in order of first sight.
    pub sizes: Vec<usize>,
}

impl ChainLog {
    /// The fewest and most filters sampled (polls that failed aside).
    pub fn min_max(&self) -> Option<(usize, usize)> {
        let sizes = self.samples.iter().filter_map(|s| s.filters.as_ref().ok());
        let min = sizes.clone().map(|f| f.len()).min()?;
        let max = sizes.map(|f| f.len()).max()?;
        Some((min, max))
    }

    /// The polls that failed: (when, why).
    pub fn errors(&self) -> Vec<(Duration, &str)> {
        self.samples
            .iter()
            .filter_map(|s| s.filters.as_ref().err().map(|e| (s.at, e.as_str())))
            .collect()
    }

    /// The longest time between two consecutive samples (how long a dip could go unseen).
    pub fn max_gap(&self) -> Duration {
        self.samples
            .windows(2)
            .map(|w| w[1].at.saturating_sub(w[0].at))
            .max()
            .unwrap_or_default()
    }

    /// The stretches in which a filter of `expected` was not running.
    pub fn dips(&self, expected: &BTreeSet<String>) -> Vec<Dip> {
        let mut dips: Vec<Dip> = Vec::new();
        let mut open = false;
        for s in &self.samples {
            let Ok(names) = &s.filters else { continue };
            let running: BTreeSet<&String> = names.iter().collect();
            let missing: Vec<&String> = expected.iter().filter(|e| !running.contains(e)).collect();
            if missing.is_empty() {
                open = false;
                continue;
            }
            if !open {
                dips.push(Dip {
                    from: s.at,
                    to: s.at,
                    smallest: names.len(),
                    missing: BTreeSet::new(),
                    sizes: Vec::new(),
                });
                open = true;
            }
            let dip = dips.last_mut().expect("just pushed");
            dip.to = s.at;
            dip.smallest = dip.smallest.min(names.len());
            dip.missing.extend(missing.into_iter().cloned());
            if !dip.sizes.contains(&names.len()) {
                dip.sizes.push(names.len());
            }
        }
        dips
    }

    /// The chain size over time: (time, size) each time it changed.
    pub fn size_changes(&self) -> Vec<(Duration, usize)> {
        let mut changes: Vec<(Duration, usize)> = Vec::new();
        for s in &self.samples {
            if let Ok(names) = &s.filters
                && changes.last().is_none_or(|(_, n)| *n != names.len())
            {
                changes.push((s.at, names.len()));
            }
        }
        changes
    }
}

impl Samples {
    /// A report for humans: per dataplane the number of samples, the sizes seen, how the size
    /// changed and every dip below `expected`, with the marked events.
    pub fn report(&self, expected: &BTreeSet<String>) -> String {
        let mut out = String::new();
        let span = |d: &Duration| format!("+{:.2}s", d.as_secs_f64());
        let _ = writeln!(
            out,
            "events: {}",
            self.marks
                .iter()
                .map(|(at, what)| format!("{} {what}", span(at)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for chain in &self.chains {
            let (min, max) = chain.min_max().unwrap_or_default();
            let last = chain.samples.last().map(|s| s.at).unwrap_or_default();
            let _ = writeln!(
                out,
                "{}: {} samples over {:.1}s (longest gap {} ms), chain size min {min} max {max} (expected {}), {} failed polls",
                chain.id,
                chain.samples.len(),
                last.as_secs_f64(),
                chain.max_gap().as_millis(),
                expected.len(),
                chain.errors().len()
            );
            let changes: Vec<String> = chain
                .size_changes()
                .iter()
                .map(|(at, n)| format!("{} {n}", span(at)))
                .collect();
            let _ = writeln!(out, "  size over time: {}", changes.join(", "));
            let dips = chain.dips(expected);
            if dips.is_empty() {
                let _ = writeln!(out, "  no dip: every expected filter ran in every sample");
            }
            for dip in dips {
                let shown: Vec<&String> = dip.missing.iter().take(5).collect();
                let _ = writeln!(
                    out,
                    "  DIP {}..{} ({} ms): down to {} filters (sizes {:?}); missing {} of {}: {shown:?}{}",
                    span(&dip.from),
                    span(&dip.to),
                    dip.to.saturating_sub(dip.from).as_millis(),
                    dip.smallest,
                    dip.sizes,
                    dip.missing.len(),
                    expected.len(),
                    if dip.missing.len() > 5 { " …" } else { "" }
                );
            }
            for (at, e) in chain.errors().iter().take(3) {
                let _ = writeln!(out, "  failed poll at {}: {e}", span(at));
            }
        }
        out
    }

    /// What is wrong with the samples: a dataplane with a dip below `expected`, failed polls,
    /// a gap longer than `max_gap` (a dip could hide in it), or no samples. Empty: the chain
    /// never shrank.
    pub fn problems(&self, expected: &BTreeSet<String>, max_gap: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        for chain in &self.chains {
            if chain.samples.is_empty() {
                problems.push(format!("{}: no samples", chain.id));
                continue;
            }
            let dips = chain.dips(expected);
            if let Some(first) = dips.first() {
                problems.push(format!(
                    "{}: the chain shrank {} time(s), first at +{:.2}s down to {} filters (expected all {} in every sample)",
                    chain.id,
                    dips.len(),
                    first.from.as_secs_f64(),
                    dips.iter().map(|d| d.smallest).min().unwrap_or(0),
                    expected.len()
                ));
            }
            let errors = chain.errors();
            if let Some((at, e)) = errors.first() {
                problems.push(format!(
                    "{}: {} polls of /config_dump failed, first at +{:.2}s: {e}",
                    chain.id,
                    errors.len(),
                    at.as_secs_f64()
                ));
            }
            if chain.max_gap() > max_gap {
                problems.push(format!(
                    "{}: {} ms between two samples (at most {} ms expected): a dip could hide there",
                    chain.id,
                    chain.max_gap().as_millis(),
                    max_gap.as_millis()
                ));
            }
        }
        problems
    }
}

// ---- a TCP forwarder --------------------------------------------------------------------------

/// A loopback TCP forwarder: each accepted connection goes to the address `target` names at
/// that moment (none: the connection is closed at once, as a Service without ready endpoints
/// refuses). Bytes are forwarded as they are (TLS stays end to end), each held for the delay
/// in force when it was read ([`Forwarder::set_delay`]), in order.
pub struct Forwarder {
    addr: String,
    stop: Arc<AtomicBool>,
    delay: Arc<Mutex<Duration>>,
    stats: Arc<ForwardStats>,
    accept: Option<JoinHandle<()>>,
}

/// What a [`Forwarder`] did.
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Connections forwarded.
    pub forwarded: AtomicU64,
    /// Connections closed at once: no target, or it did not answer.
    pub refused: AtomicU64,
    /// Chunks of bytes held back by a delay.
    pub delayed_chunks: AtomicU64,
    pub delayed_bytes: AtomicU64,
}

impl Forwarder {
    /// Listens on a free loopback port.
    pub fn start(target: impl Fn() -> Option<String> + Send + 'static) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("a bound address").to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let stats = Arc::new(ForwardStats::default());
        let accept = {
            let (stop, delay, stats) = (stop.clone(), delay.clone(), stats.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let _ = client.set_nonblocking(false);
                            let upstream = target().and_then(|t| {
                                let addr = t.parse().ok()?;
                                TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()
                            });
                            match upstream {
                                Some(upstream) => {
                                    stats.forwarded.fetch_add(1, Ordering::SeqCst);
                                    forward(client, upstream, &delay, &stats);
                                }
                                None => {
                                    stats.refused.fetch_add(1, Ordering::SeqCst);
                                    let _ = client.shutdown(Shutdown::Both);
                                }
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Forwarder {
            addr,
            stop,
            delay,
            stats,
            accept: Some(accept),
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Bytes read from now on are held this long before they are passed on.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap() = delay;
    }

    pub fn stats(&self) -> &ForwardStats {
        &self.stats
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Pumps both directions of a connection, two threads each (a reader that stamps each chunk
/// with its delivery time, a writer that waits for it), until either side closes.
fn forward(
    client: TcpStream,
    upstream: TcpStream,
    delay: &Arc<Mutex<Duration>>,
    stats: &Arc<ForwardStats>,
) {
    let pairs = [
        (client.try_clone(), upstream.try_clone()),
        (upstream.try_clone(), client.try_clone()),
    ];
    for (from, to) in pairs {
        let (Ok(mut from), Ok(mut to)) = (from, to) else {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
            return;
        };
        let (tx, rx) = mpsc::channel::<Option<(Instant, Vec<u8>)>>();
        let (delay, stats) = (delay.clone(), stats.clone());
        let reader_from = from.try_clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(None);
                        return;
                    }
                    Ok(n) => {
                        let held = *delay.lock().unwrap();
                        if !held.is_zero() {
                            stats.delayed_chunks.fetch_add(1, Ordering::SeqCst);
                            stats.delayed_bytes.fetch_add(n as u64, Ordering::SeqCst);
                        }
                        if tx
                            .send(Some((Instant::now() + held, buf[..n].to_vec())))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        std::thread::spawn(move || {
            while let Ok(Some((at, bytes))) = rx.recv() {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                if to.write_all(&bytes).is_err() {
                    break;
                }
            }
            // One side is done: end the whole connection, both ways.
            let _ = to.shutdown(Shutdown::Both);
            if let Ok(from) = reader_from {
                let _ = from.shutdown(Shutdown::Both);
            }
        });
    }
}

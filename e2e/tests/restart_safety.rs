//! Issue #21: a restart, an outage, a relist or a bad object never strips filters from the
//! dataplanes.
//!
//! Every scenario runs the chart's operator and two managed dataplanes as local processes
//! against the harness's API server (as tests/flow.rs does), rolls out 21 WasmFilters (three
//! namespaces, all selecting both dataplanes, FailClosed and FailOpen alternating, all the
//! `header_rewrite` module from a real registry, each setting its own response header), then
//! samples each dataplane's chain (`/config_dump`, every 10 ms) while something goes wrong:
//!
//! 1. `restart`: the operator is killed (SIGKILL) and started again with the same flags;
//! 2. `leader_failover`: two replicas with leader election behind a forwarder that sends each
//!    new connection to the replica whose `/ready` answers 200 (what the chart's Service does
//!    with its readiness probe); the leader is killed and the follower takes the Lease over;
//! 3. `registry_down`: the registry stops, the operator is killed and started again; after
//!    20 s the registry comes back;
//! 4. `slow_api_server`: the operator is killed and started again behind a forwarder to the
//!    API server (TLS end to end) that holds every byte for 2 s until 5 s after the restarted
//!    operator leads, so its first list of WasmFilters is slow while dataplanes can connect.
//!
//! Each asserts that every sample of both dataplanes runs all 21 filters, and that a change
//! made afterwards reaches both dataplanes (a response header through each proxy). A scenario
//! reports everything it saw (sample counts, every dip with its time, the times a change took)
//! before it fails. The scenarios share one API server and run one after the other.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use wasmfilter_e2e::local::{
    Dataplane, OPERATOR_SA, Operator, SOON, SYSTEM, condition, dataplane_from_chart,
    expect_condition, get_json, install_chart, operator_from_chart, push_module,
};
use wasmfilter_e2e::sampler::{Forwarder, Sampler, Samples};
use wasmfilter_e2e::{Binaries, Cluster, http_get, poll, workspace_binaries};
use wasmfilter_testkit::registry::TestRegistry;

/// The WasmFilters' namespaces.
const NAMESPACES: [&str; 3] = ["rs-a", "rs-b", "rs-c"];
/// How many WasmFilters run.
const FILTERS: usize = 21;
/// How often the sampler polls each dataplane.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// The longest pause between two samples of a dataplane for a scenario to count: a shorter
/// dip could hide in a longer one.
const MAX_GAP: Duration = Duration::from_secs(1);
/// How long a restart, a failover or a change may take to show.
const PATIENCE: Duration = Duration::from_secs(60);
/// How long the registry stays down in `registry_down`.
const OUTAGE: Duration = Duration::from_secs(20);
/// Every byte through the slow API server's forwarder is held this long...
const SLOW_BY: Duration = Duration::from_secs(2);
/// ...until this long after the restarted operator leads, and at least...
const SLOW_AFTER_LEAD: Duration = Duration::from_secs(5);
/// ...this long after both dataplanes connected to it (they reconnect with backoff, so
/// several seconds after it leads): its first reconciles are slow while they are connected.
const SLOW_AFTER_CONNECT: Duration = Duration::from_secs(3);

/// What the scenarios share: the API server with the chart installed, the registry holding
/// the module, the operator's ServiceAccount kubeconfig.
struct Fixture {
    cluster: &'static Cluster,
    bins: Binaries,
    registry: TestRegistry,
    reference: String,
    digest: String,
    kubeconfig: PathBuf,
    lease: String,
}

static FIXTURE: Mutex<Option<Fixture>> = Mutex::new(None);

/// The fixture, locked for one scenario at a time (`None`: skipped, tools missing).
fn fixture() -> Option<MutexGuard<'static, Option<Fixture>>> {
    if std::env::var_os(wasmfilter_e2e::KUBECONFIG_ENV).is_some() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: the restart tests run their own operator against the harness's API server, not against {}",
            wasmfilter_e2e::KUBECONFIG_ENV
        );
        return None;
    }
    let cluster = Cluster::shared()?;
    // A scenario that failed poisons the lock; the next one starts afresh anyway.
    let mut guard = FIXTURE.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        let t = Instant::now();
        let bins = workspace_binaries().unwrap();
        let module = wasmfilter_testkit::rust_filter("header_rewrite").unwrap();
        let registry = TestRegistry::start(None);
        // A failed resolution is retried with backoff up to the refresh interval: 10 s here,
        // so a registry that comes back is seen within seconds (the default is 5 minutes).
        install_chart(
            cluster,
            &[registry.host()],
            &["operator.extraArgs={--refresh-interval,10s}"],
        );
        for ns in NAMESPACES {
            cluster
                .apply_yaml(&format!(
                    "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
                ))
                .ok();
        }
        let reference = registry.reference("filters/header-rewrite:v1");
        let digest = push_module(&bins, &module, &reference).unwrap();
        let kubeconfig = cluster
            .service_account_kubeconfig(SYSTEM, OPERATOR_SA)
            .unwrap();
        let deployment = get_json(
            cluster,
            &["get", "deployment", "wasmfilter-operator", "-n", SYSTEM],
        );
        let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("the operator has args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let lease = args
            .iter()
            .skip_while(|a| **a != "--lease-name")
            .nth(1)
            .expect("the chart names the Lease")
            .to_string();
        eprintln!(
            "restart_safety: fixture (binaries, filter, registry, chart, push) ready after {:.1}s",
            t.elapsed().as_secs_f64()
        );
        *guard = Some(Fixture {
            cluster,
            bins,
            registry,
            reference,
            digest,
            kubeconfig,
            lease,
        });
    }
    Some(guard)
}

/// The filters: (namespace, name), 7 per namespace.
fn filters() -> Vec<(&'static str, String)> {
    (0..FILTERS)
        .map(|i| (NAMESPACES[i % NAMESPACES.len()], format!("f{i:02}")))
        .collect()
}

/// The response header filter `name` sets.
fn header_of(name: &str) -> String {
    format!("x-rs-{name}")
}

/// WasmFilter `ns/name` (the i-th), setting its header to `value`.
fn filter_yaml(i: usize, ns: &str, name: &str, image: &str, value: &str) -> String {
    let policy = if i.is_multiple_of(2) {
        "FailClosed"
    } else {
        "FailOpen"
    };
    format!(
        "apiVersion: wasmfilter.dev/v1alpha1\nkind: WasmFilter\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  module: {{image: \"{image}\"}}\n  config: {{response: {{set: {{{}: {value}}}}}}}\n  \
         selector: {{matchLabels: {{gateway: public}}}}\n  failurePolicy: {policy}\n",
        header_of(name)
    )
}

/// One scenario: its processes, what it found wrong, and its report.
struct Run<'a> {
    name: &'static str,
    fx: &'a mut Fixture,
    dir: PathBuf,
    operators: Vec<Operator>,
    dataplanes: Vec<Dataplane>,
    problems: Vec<String>,
    notes: Vec<String>,
    /// Every filter's `namespace/name`, as the dataplanes list them.
    expected: BTreeSet<String>,
}

impl<'a> Run<'a> {
    fn new(fx: &'a mut Fixture, name: &'static str) -> Run<'a> {
        let dir = fx.cluster.dir().join("restart-safety").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut run = Run {
            name,
            fx,
            dir,
            operators: Vec::new(),
            dataplanes: Vec::new(),
            problems: Vec::new(),
            notes: Vec::new(),
            expected: filters()
                .iter()
                .map(|(ns, name)| format!("{ns}/{name}"))
                .collect(),
        };
        run.clean();
        run
    }

    /// No WasmFilter and no Lease left from an earlier scenario.
    fn clean(&mut self) {
        let cluster = self.fx.cluster;
        cluster
            .kubectl(&["delete", "wasmfilters", "--all", "--all-namespaces"])
            .ok();
        cluster
            .kubectl(&[
                "delete",
                "lease",
                &self.fx.lease,
                "-n",
                SYSTEM,
                "--ignore-not-found",
            ])
            .ok();
    }

    fn note(&mut self, note: String) {
        eprintln!("restart_safety {}: {note}", self.name);
        self.notes.push(note);
    }

    fn problem(&mut self, problem: String) {
        eprintln!("restart_safety {}: PROBLEM: {problem}", self.name);
        self.problems.push(problem);
    }

    /// A replica with identity `identity`, not started.
    fn operator(&mut self, identity: &str) -> usize {
        let op = operator_from_chart(
            self.fx.cluster,
            &self.fx.bins,
            &self.dir,
            &self.fx.kubeconfig,
            identity,
        );
        self.operators.push(op);
        self.operators.len() - 1
    }

    /// Starts replica `i` and waits until it is ready (panics if it is not: nothing to test).
    fn start_operator(&mut self, i: usize) {
        let step = format!("{}: starting {}", self.name, self.operators[i].name);
        self.operators[i].start(&step);
    }

    /// Starts `dp-1` and `dp-2` dialing `grpc`, and waits until both are ready.
    fn start_dataplanes(&mut self, grpc: &str) {
        let step = format!("{}: dataplanes", self.name);
        for (id, zone) in [("dp-1", "a"), ("dp-2", "b")] {
            let mut dp =
                dataplane_from_chart(self.fx.cluster, &self.fx.bins, &self.dir, grpc, id, zone);
            dp.start(&step);
            wasmfilter_e2e::eventually(&format!("{step}: {id} ready"), SOON, || {
                let r = http_get(&dp.admin, "/ready").map_err(|e| format!("{e:#}"))?;
                (r.status == 200)
                    .then_some(())
                    .ok_or(format!("{r:?}\n{}", dp.log_tail()))
            });
            self.dataplanes.push(dp);
        }
    }

    /// `kubectl apply` of every filter with its header set to `value`; waits until both
    /// dataplanes run them all and every status says Ready with the pushed digest.
    fn roll_out(&mut self, value: &str) {
        let step = format!("{}: roll out {FILTERS} filters", self.name);
        let docs: Vec<String> = filters()
            .iter()
            .enumerate()
            .map(|(i, (ns, name))| filter_yaml(i, ns, name, &self.fx.reference, value))
            .collect();
        let applied = Instant::now();
        self.fx.cluster.apply_yaml(&docs.join("---\n")).ok();
        for dp in &self.dataplanes {
            wasmfilter_e2e::eventually(&format!("{step}: {}", dp.id), PATIENCE, || {
                let names: BTreeSet<String> = dp.filter_names()?.into_iter().collect();
                (names == self.expected)
                    .then_some(())
                    .ok_or_else(|| format!("runs {} filters: {names:?}", names.len()))
            });
        }
        let on_dataplanes = applied.elapsed();
        let digest = self.fx.digest.clone();
        wasmfilter_e2e::eventually(&format!("{step}: status"), PATIENCE, || {
            for wf in self.wasmfilters() {
                let key = key_of(&wf);
                expect_condition(&wf, "Ready", "True", "RolledOut")
                    .map_err(|e| format!("{key}: {e}"))?;
                if wf["status"]["module"]["digest"] != digest.as_str() {
                    return Err(format!("{key}: module {}", wf["status"]["module"]));
                }
            }
            Ok(())
        });
        self.note(format!(
            "{FILTERS} filters on both dataplanes {:.2}s after kubectl apply, all Ready after {:.2}s",
            on_dataplanes.as_secs_f64(),
            applied.elapsed().as_secs_f64()
        ));
    }

    /// Every WasmFilter of the scenario.
    fn wasmfilters(&self) -> Vec<Value> {
        get_json(self.fx.cluster, &["get", "wasmfilters", "--all-namespaces"])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn sampler(&self) -> Sampler {
        let targets: Vec<(String, String)> = self
            .dataplanes
            .iter()
            .map(|d| (d.id.clone(), d.admin.clone()))
            .collect();
        Sampler::start(&targets, SAMPLE_EVERY)
    }

    /// Changes f00's header value to `value` and waits until a response through each
    /// dataplane carries it; a problem if it does not within [`PATIENCE`].
    fn change_arrives(&mut self, sampler: &Sampler, value: &str) {
        let (ns, name) = filters().remove(0);
        let header = header_of(&name);
        let yaml = filter_yaml(0, ns, &name, &self.fx.reference, value);
        self.fx.cluster.apply_yaml(&yaml).ok();
        sampler.mark(&format!("{ns}/{name} changed to {value}"));
        let applied = Instant::now();
        let mut times = Vec::new();
        for i in 0..self.dataplanes.len() {
            let dp = &self.dataplanes[i];
            let what = format!("the change of {ns}/{name} on {}", dp.id);
            let seen = poll(&what, PATIENCE, || {
                let r = dp.get()?;
                (r.status == 200 && r.header(&header) == Some(value))
                    .then_some(())
                    .ok_or_else(|| format!("{header}: {:?} ({r:?})", r.header(&header)))
            });
            match seen {
                Ok(_) => times.push(format!(
                    "{} after {:.2}s",
                    self.dataplanes[i].id,
                    applied.elapsed().as_secs_f64()
                )),
                Err(e) => {
                    let tail = self.dataplanes[i].log_tail();
                    self.problem(format!("{e}\n{tail}"));
                }
            }
        }
        sampler.mark("the change is on both dataplanes");
        self.note(format!(
            "a change of {ns}/{name} reached {}",
            times.join(", ")
        ));
    }

    /// Records what the samples show, prints the report and fails the test with every
    /// problem found.
    fn finish(mut self, samples: Samples) {
        let report = samples.report(&self.expected);
        for p in samples.problems(&self.expected, MAX_GAP) {
            self.problem(p);
        }
        eprintln!(
            "restart_safety {}: chains sampled every {} ms\n{report}",
            self.name,
            SAMPLE_EVERY.as_millis()
        );
        if self.problems.is_empty() {
            eprintln!("restart_safety {}: passed", self.name);
            return;
        }
        let mut logs = String::new();
        for op in &self.operators {
            logs.push_str(&format!("--- {} log\n{}\n", op.name, op.log_tail(25)));
        }
        for dp in &self.dataplanes {
            logs.push_str(&format!("--- {} log\n{}\n", dp.id, dp.log_tail()));
        }
        panic!(
            "{}: expected every dataplane to run all {FILTERS} filters in every sample and a later change to arrive; seen:\n- {}\n\nnotes:\n- {}\n\nsamples:\n{report}\n{logs}",
            self.name,
            self.problems.join("\n- "),
            self.notes.join("\n- ")
        );
    }
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        for op in &mut self.operators {
            op.kill();
        }
        for dp in &mut self.dataplanes {
            dp.kill();
        }
        // A registry a failed scenario left stopped comes back for the next one.
        if std::net::TcpStream::connect(self.fx.registry.host()).is_err() {
            self.fx.registry.restart();
        }
        // Best effort: the next scenario cleans up again, and fails loudly if it cannot.
        let cluster = self.fx.cluster;
        let _ = cluster.kubectl(&["delete", "wasmfilters", "--all", "--all-namespaces"]);
        let _ = cluster.kubectl(&[
            "delete",
            "lease",
            &self.fx.lease,
            "-n",
            SYSTEM,
            "--ignore-not-found",
        ]);
    }
}

fn key_of(wf: &Value) -> String {
    format!(
        "{}/{}",
        wf["metadata"]["namespace"].as_str().unwrap_or_default(),
        wf["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// Kills the only operator and starts it again with the same flags; a problem if it is not
/// ready within [`PATIENCE`].
fn restart_operator(run: &mut Run, sampler: &Sampler) {
    let op = &mut run.operators[0];
    sampler.mark(&format!("kill -9 {}", op.name));
    op.kill();
    let spawned = op.spawn();
    sampler.mark(&format!("{} started again", op.name));
    let ready = spawned.and_then(|()| op.wait_ready(PATIENCE));
    match ready {
        Ok(after) => {
            let name = op.name.clone();
            sampler.mark(&format!("{name} ready"));
            run.note(format!(
                "{name} ready {:.2}s after its restart",
                after.as_secs_f64()
            ));
        }
        Err(e) => run.problem(format!("the restarted operator: {e}")),
    }
}

// ---- the scenarios ----------------------------------------------------------------------------

#[test]
fn restart_never_shrinks_the_chain() {
    let Some(mut guard) = fixture() else { return };
    let fx = guard.as_mut().expect("the fixture is set");
    let mut run = Run::new(fx, "restart");
    let op = run.operator("op-1");
    run.start_operator(op);
    let grpc = run.operators[op].grpc();
    run.start_dataplanes(&grpc);
    run.roll_out("v1");

    let sampler = run.sampler();
    std::thread::sleep(Duration::from_millis(500));
    restart_operator(&mut run, &sampler);
    // The controller works through its queue in the seconds after a restart.
    std::thread::sleep(Duration::from_secs(3));
    run.change_arrives(&sampler, "v2");
    std::thread::sleep(Duration::from_secs(2));
    let samples = sampler.stop();
    run.finish(samples);
}

#[test]
fn leader_failover_never_shrinks_the_chain() {
    let Some(mut guard) = fixture() else { return };
    let fx = guard.as_mut().expect("the fixture is set");
    let mut run = Run::new(fx, "leader_failover");
    let a = run.operator("op-a");
    let b = run.operator("op-b");
    run.start_operator(a);
    run.operators[b]
        .spawn()
        .unwrap_or_else(|e| panic!("leader_failover: starting op-b: {e}"));
    // op-b runs as a follower: /ready 503 while op-a leads.
    wasmfilter_e2e::eventually("leader_failover: op-b answers /ready 503", SOON, || {
        let op = &run.operators[b];
        op.not_ready().then_some(()).ok_or_else(|| op.log_tail(20))
    });
    // The dataplanes dial one address, as they dial the chart's Service: each new connection
    // goes to the replica whose /ready answers 200.
    let replicas: Vec<(String, String)> = [a, b]
        .iter()
        .map(|&i| (run.operators[i].admin.clone(), run.operators[i].grpc()))
        .collect();
    let service = Forwarder::start(move || {
        replicas
            .iter()
            .find(|(admin, _)| http_get(admin, "/ready").is_ok_and(|r| r.status == 200))
            .map(|(_, grpc)| grpc.clone())
    });
    run.start_dataplanes(service.addr());
    run.roll_out("v1");

    let sampler = run.sampler();
    std::thread::sleep(Duration::from_millis(500));
    sampler.mark("kill -9 op-a (the leader)");
    run.operators[a].kill();
    let killed = Instant::now();
    let took_over = poll("op-b leads and is ready", PATIENCE, || {
        let op = &mut run.operators[b];
        if let Some(status) = op.process.as_mut().and_then(|p| p.exited()) {
            return Err(format!("op-b exited ({status})"));
        }
        op.ready().then_some(()).ok_or_else(|| op.log_tail(20))
    });
    match took_over {
        Ok(_) => {
            sampler.mark("op-b ready (leads)");
            run.note(format!(
                "op-b took over {:.2}s after op-a was killed (Lease of 15 s)",
                killed.elapsed().as_secs_f64()
            ));
        }
        Err(e) => run.problem(e),
    }
    std::thread::sleep(Duration::from_secs(3));
    run.change_arrives(&sampler, "v2");
    std::thread::sleep(Duration::from_secs(2));
    let samples = sampler.stop();
    let stats = service.stats();
    run.note(format!(
        "the Service forwarder passed {} connections and refused {} (no ready replica)",
        stats.forwarded.load(Ordering::SeqCst),
        stats.refused.load(Ordering::SeqCst)
    ));
    run.finish(samples);
}

#[test]
fn registry_down_restart_never_shrinks_the_chain() {
    let Some(mut guard) = fixture() else { return };
    let fx = guard.as_mut().expect("the fixture is set");
    let mut run = Run::new(fx, "registry_down");
    let op = run.operator("op-1");
    run.start_operator(op);
    let grpc = run.operators[op].grpc();
    run.start_dataplanes(&grpc);
    run.roll_out("v1");
    let digest = run.fx.digest.clone();

    let sampler = run.sampler();
    std::thread::sleep(Duration::from_millis(500));
    run.fx.registry.stop();
    sampler.mark("registry stopped");
    let outage = Instant::now();
    restart_operator(&mut run, &sampler);

    // While the registry is down every WasmFilter says its module could not be re-resolved,
    // and keeps its last digest (in status and on the dataplanes).
    let said = poll(
        "every WasmFilter reports RegistryUnavailable and keeps its digest",
        OUTAGE.saturating_sub(outage.elapsed()),
        || {
            let mut wrong = Vec::new();
            for wf in run.wasmfilters() {
                let reasons: Vec<&str> = wf["status"]["conditions"]
                    .as_array()
                    .map(|cs| cs.iter().filter_map(|c| c["reason"].as_str()).collect())
                    .unwrap_or_default();
                let kept = wf["status"]["module"]["digest"] == digest.as_str();
                if !reasons.contains(&"RegistryUnavailable") || !kept {
                    wrong.push(format!(
                        "{}: reasons {reasons:?}, module {}",
                        key_of(&wf),
                        wf["status"]["module"]
                    ));
                }
            }
            if wrong.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} of {FILTERS}:\n{}",
                    wrong.len(),
                    wrong.join("\n")
                ))
            }
        },
    );
    match said {
        Ok(_) => {
            sampler.mark("every status says RegistryUnavailable");
            let example = run.wasmfilters().into_iter().next().unwrap_or_default();
            let text = ["Resolved", "Ready", "Degraded"]
                .iter()
                .filter_map(|t| condition(&example, t).map(|c| format!("{t}={c:?}")))
                .collect::<Vec<_>>()
                .join(", ");
            run.note(format!(
                "statuses said RegistryUnavailable {:.2}s into the outage, e.g. {}: {text}",
                outage.elapsed().as_secs_f64(),
                key_of(&example)
            ));
        }
        Err(e) => run.problem(e),
    }
    std::thread::sleep(OUTAGE.saturating_sub(outage.elapsed()));
    let mut wrong_digests = Vec::new();
    for dp in &run.dataplanes {
        let digests: Vec<String> = dp
            .config_dump()
            .map(|d| {
                d["filters"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|f| f["digest"].as_str().unwrap_or("none").to_string())
                    .collect()
            })
            .unwrap_or_default();
        if digests.len() != FILTERS || digests.iter().any(|d| *d != digest) {
            wrong_digests.push(format!(
                "at the end of the outage {} runs digests {digests:?}, expected {FILTERS} times {digest}",
                dp.id
            ));
        }
    }
    for p in wrong_digests {
        run.problem(p);
    }
    run.fx.registry.restart();
    sampler.mark("registry back");
    let back = Instant::now();
    let cleared = poll(
        "every WasmFilter Resolved, Ready and not Degraded again",
        PATIENCE,
        || {
            for wf in run.wasmfilters() {
                let key = key_of(&wf);
                expect_condition(&wf, "Resolved", "True", "Resolved")
                    .and_then(|()| expect_condition(&wf, "Ready", "True", "RolledOut"))
                    .and_then(|()| expect_condition(&wf, "Degraded", "False", "AsExpected"))
                    .map_err(|e| format!("{key}: {e}"))?;
            }
            Ok(())
        },
    );
    match cleared {
        Ok(_) => {
            sampler.mark("every status clear");
            run.note(format!(
                "conditions cleared {:.2}s after the registry came back",
                back.elapsed().as_secs_f64()
            ));
        }
        Err(e) => run.problem(e),
    }
    run.change_arrives(&sampler, "v2");
    std::thread::sleep(Duration::from_secs(1));
    let samples = sampler.stop();
    run.finish(samples);
}

#[test]
fn slow_api_server_restart_never_shrinks_the_chain() {
    let Some(mut guard) = fixture() else { return };
    let fx = guard.as_mut().expect("the fixture is set");
    let mut run = Run::new(fx, "slow_api_server");
    let op = run.operator("op-1");
    run.start_operator(op);
    let grpc = run.operators[op].grpc();
    run.start_dataplanes(&grpc);
    run.roll_out("v1");

    // A forwarder to the API server; the operator's restart uses a copy of its kubeconfig
    // pointing there (the server certificate is for 127.0.0.1, whatever the port).
    let server = run
        .fx
        .cluster
        .server()
        .trim_start_matches("https://")
        .to_string();
    let slow = Forwarder::start(move || Some(server.clone()));
    let mut kubeconfig: Value =
        serde_json::from_str(&std::fs::read_to_string(&run.fx.kubeconfig).unwrap()).unwrap();
    kubeconfig["clusters"][0]["cluster"]["server"] = format!("https://{}", slow.addr()).into();
    let slow_kubeconfig = run.dir.join("kubeconfig-slow");
    std::fs::write(&slow_kubeconfig, kubeconfig.to_string()).unwrap();
    run.operators[op]
        .recipe
        .set_env("KUBECONFIG", &slow_kubeconfig.display().to_string());

    let sampler = run.sampler();
    std::thread::sleep(Duration::from_millis(500));
    slow.set_delay(SLOW_BY);
    sampler.mark(&format!(
        "API server slow (every byte held {}s)",
        SLOW_BY.as_secs()
    ));
    let log_before = run.operators[op].log().len();
    let dp_logs_before: Vec<usize> = run
        .dataplanes
        .iter()
        .map(|d| std::fs::metadata(&d.log).map_or(0, |m| m.len() as usize))
        .collect();
    sampler.mark("kill -9 op-1");
    run.operators[op].kill();
    let restarted = Instant::now();
    run.operators[op]
        .spawn()
        .unwrap_or_else(|e| panic!("slow_api_server: {e}"));
    sampler.mark("op-1 started again");
    let led = run.operators[op]
        .process
        .as_mut()
        .expect("just spawned")
        .wait_for_log(PATIENCE, |log| {
            log.get(log_before..)?
                .contains("acquired the Lease")
                .then_some(())
        });
    let delayed_before_lead = slow.stats().delayed_chunks.load(Ordering::SeqCst);
    match led {
        Ok(()) => {
            sampler.mark("op-1 leads (gRPC listener up)");
            run.note(format!(
                "op-1 led {:.2}s after its restart through the slow API server",
                restarted.elapsed().as_secs_f64()
            ));
        }
        Err(e) => run.problem(format!("the restarted operator never led: {e:#}")),
    }
    let lead_at = Instant::now();
    let connected = poll(
        "both dataplanes connected to the restarted op-1",
        PATIENCE,
        || {
            for (dp, before) in run.dataplanes.iter().zip(&dp_logs_before) {
                let log = std::fs::read_to_string(&dp.log).unwrap_or_default();
                if !log
                    .get(*before..)
                    .is_some_and(|l| l.contains("connected to the operator"))
                {
                    return Err(format!("{} not yet:\n{}", dp.id, dp.log_tail()));
                }
            }
            Ok(())
        },
    );
    let slow_until = match connected {
        Ok(_) => {
            sampler.mark("both dataplanes connected to op-1");
            run.note(format!(
                "both dataplanes connected to op-1 {:.2}s after it led",
                lead_at.elapsed().as_secs_f64()
            ));
            (lead_at + SLOW_AFTER_LEAD).max(Instant::now() + SLOW_AFTER_CONNECT)
        }
        Err(e) => {
            run.problem(e);
            lead_at + SLOW_AFTER_LEAD
        }
    };
    let delayed_at_connect = slow.stats().delayed_chunks.load(Ordering::SeqCst);
    std::thread::sleep(slow_until.saturating_duration_since(Instant::now()));
    slow.set_delay(Duration::ZERO);
    sampler.mark("API server fast again");
    let held = slow.stats().delayed_chunks.load(Ordering::SeqCst);
    run.note(format!(
        "the forwarder held {held} chunks in all: {} after op-1 led, {} after both dataplanes connected",
        held - delayed_before_lead,
        held - delayed_at_connect
    ));
    if held == delayed_before_lead {
        run.problem(
            "nothing went through the slow forwarder once op-1 led: its first list was not slowed, the scenario tested nothing".into(),
        );
    }
    match run.operators[op].wait_ready(PATIENCE) {
        Ok(_) => {
            sampler.mark("op-1 ready");
            run.note(format!(
                "op-1 ready {:.2}s after its restart",
                restarted.elapsed().as_secs_f64()
            ));
        }
        Err(e) => run.problem(format!("the restarted operator: {e}")),
    }
    std::thread::sleep(Duration::from_secs(2));
    run.change_arrives(&sampler, "v2");
    std::thread::sleep(Duration::from_secs(2));
    let samples = sampler.stop();
    run.finish(samples);
}

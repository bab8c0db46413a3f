//! Issue #21, "one bad object affects only itself", against the real API server.
//!
//! The chart's operator and two managed dataplanes run as local processes (as in
//! tests/flow.rs and tests/restart_safety.rs), `header_rewrite` is pushed to a real registry,
//! and three ordinary WasmFilters run on both dataplanes. Then four bad WasmFilters, selecting
//! the same dataplanes with the same module, are applied with `kubectl apply -f -`:
//!
//! - `deep-200` and `deep-1000`: `spec.config` nested 200 and 1,000 levels deep;
//! - `vm-deep-300`: `spec.vm.config` nested 300 levels deep (its `spec.config` is ordinary);
//! - `too-big`: `spec.config` a JSON string as large as the API server admits in an object,
//!   less 16 KiB left for its status (at the exact limit etcd refuses any status write). The
//!   test finds that size first, by bisection, creating and deleting objects (1.5–1.6 MB),
//!   before the operator runs. Client-side `kubectl apply` refuses it (the
//!   `last-applied-configuration` annotation is capped at 256 KiB), so it is applied with
//!   `kubectl apply --server-side`.
//!
//! Checked, on what a user sees:
//!
//! 1. each bad object is admitted (or the refusal is reported with kubectl's message);
//! 2. each gets `Resolved=False` with reason `InvalidSpec` for its generation, its message
//!    naming the field and the bound, and a Warning Event `InvalidSpec`; the ordinary filters
//!    stay Ready and run on both dataplanes (`/config_dump` sampled every 20 ms: never fewer
//!    than the ordinary filters, never a bad one), and a new ordinary filter reaches both;
//! 3. the operator is killed (SIGKILL) and started with the same flags: `/ready` answers 200
//!    (one bad object used to make every list fail), the bad objects are still refused and
//!    a change of one is refused afresh for its new generation, the ordinary filters never
//!    leave the dataplanes, and a change of an ordinary filter arrives.
//!
//! It prints a table of the bad objects (admitted?, condition, time to condition) and fails
//! with every problem found and the operator's log tail.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmfilter_api::crd::{MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH};
use wasmfilter_e2e::local::{
    Dataplane, OPERATOR_SA, SYSTEM, condition, dataplane_from_chart, expect_condition,
    install_chart, operator_from_chart, push_module,
};
use wasmfilter_e2e::sampler::Sampler;
use wasmfilter_e2e::{Cluster, Output, http_get, poll, workspace_binaries};
use wasmfilter_testkit::registry::TestRegistry;

/// The namespace of every WasmFilter of this test.
const NS: &str = "bad-objects";
/// The ordinary filters running before the bad objects come.
const ORDINARY: [&str; 3] = ["ok-1", "ok-2", "ok-3"];
/// The ordinary filter applied after the bad objects.
const LATE: &str = "ok-4";
/// How long a start, a rollout or a status may take to show.
const PATIENCE: Duration = Duration::from_secs(45);
/// How often the sampler polls each dataplane's `/config_dump`.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// The longest pause between two samples for the sampling to count.
const MAX_GAP: Duration = Duration::from_secs(1);
/// What the largest bad object leaves below the API server's limit, for the status the
/// operator writes (an object at the exact limit cannot take one).
const STATUS_ROOM: usize = 16 * 1024;

/// `{"a":{"a":…1…}}`, `levels` objects deep.
fn nested(levels: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(levels), "}".repeat(levels))
}

/// The response header ordinary filter `name` sets.
fn header_of(name: &str) -> String {
    format!("x-bo-{name}")
}

/// An ordinary WasmFilter setting its header to `value`.
fn ordinary_yaml(name: &str, image: &str, value: &str) -> String {
    format!(
        "apiVersion: wasmfilter.dev/v1alpha1\nkind: WasmFilter\nmetadata: {{name: {name}, namespace: {NS}}}\n\
         spec:\n  module: {{image: \"{image}\"}}\n  config: {{response: {{set: {{{}: {value}}}}}}}\n  \
         selector: {{matchLabels: {{gateway: public}}}}\n",
        header_of(name)
    )
}

/// A WasmFilter as JSON text (built as text: serde_json stops at 128 levels), selecting the
/// same dataplanes with the same module as the ordinary ones.
fn bad_json(name: &str, image: &str, config: &str, vm_config: Option<&str>) -> String {
    let vm = vm_config.map_or(String::new(), |c| format!(r#","vm":{{"config":{c}}}"#));
    format!(
        r#"{{"apiVersion":"wasmfilter.dev/v1alpha1","kind":"WasmFilter","metadata":{{"name":"{name}","namespace":"{NS}"}},"spec":{{"module":{{"image":"{image}"}},"selector":{{"matchLabels":{{"gateway":"public"}}}},"config":{config}{vm}}}}}"#
    )
}

/// `metadata.generation` and `status` of a WasmFilter, as `{"metadata":{"generation"},
/// "status"}`: read with a jsonpath, since a deep object's JSON is too deep for serde_json
/// (and `too-big` is 1.5 MB).
fn read(cluster: &Cluster, name: &str) -> Result<Value, String> {
    let out = cluster.kubectl(&[
        "get",
        "wasmfilter",
        name,
        "-n",
        NS,
        "-o",
        r#"jsonpath={.metadata.generation}{"\n"}{.status}"#,
    ]);
    if !out.success() {
        return Err(out.to_string());
    }
    let (generation, status) = out.stdout.split_once('\n').unwrap_or((&out.stdout, ""));
    let generation: i64 = generation
        .trim()
        .parse()
        .map_err(|e| format!("generation {generation:?}: {e}"))?;
    let status: Value = match status.trim() {
        "" => Value::Null,
        s => serde_json::from_str(s).map_err(|e| format!("status {s}: {e}"))?,
    };
    Ok(json!({"metadata": {"generation": generation}, "status": status}))
}

/// (status, reason, message) of a condition; (type, reason, message) of an Event.
type Triple = (String, String, String);

/// The Events about `name`: (type, reason, message).
fn events(cluster: &Cluster, name: &str) -> Vec<Triple> {
    let selector = format!("involvedObject.name={name}");
    let out = cluster.kubectl(&[
        "get",
        "events",
        "-n",
        NS,
        "--field-selector",
        &selector,
        "-o",
        "json",
    ]);
    let list: Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (s("type"), s("reason"), s("message"))
        })
        .collect()
}

/// kubectl's complaint, short enough for a table.
fn complaint(out: &Output) -> String {
    let text = format!("{}{}", out.stderr.trim(), out.stdout.trim());
    shorten(&text.split_whitespace().collect::<Vec<_>>().join(" "), 240)
}

/// A bad object, and what became of it.
struct Bad {
    name: &'static str,
    what: String,
    doc: String,
    /// Pieces the condition's message must hold.
    expect: Vec<String>,
    /// Client-side `kubectl apply -f -`: `None` admitted, or kubectl's message.
    refused: Option<String>,
    /// The `kubectl apply --server-side` a client-side refusal led to.
    server_side: Option<Result<(), String>>,
    applied: Option<Instant>,
    condition: Option<(String, String, String)>,
    condition_after: Option<Duration>,
    ready: Option<(String, String, String)>,
    event: Option<String>,
}

impl Bad {
    fn new(name: &'static str, what: String, doc: String, expect: Vec<String>) -> Bad {
        Bad {
            name,
            what,
            doc,
            expect,
            refused: None,
            server_side: None,
            applied: None,
            condition: None,
            condition_after: None,
            ready: None,
            event: None,
        }
    }

    fn admitted(&self) -> bool {
        self.applied.is_some()
    }

    /// Whether `wf` says InvalidSpec for its generation, with the expected message.
    fn refused_in(&self, wf: &Value) -> Result<(String, String, String), String> {
        expect_condition(wf, "Resolved", "False", "InvalidSpec")?;
        let c = condition(wf, "Resolved").expect("checked above");
        let missing: Vec<&String> = self.expect.iter().filter(|p| !c.2.contains(*p)).collect();
        if missing.is_empty() {
            Ok(c)
        } else {
            Err(format!("the Resolved message lacks {missing:?}: {:?}", c.2))
        }
    }
}

/// The largest `spec.config` string (bytes) the API server stores in WasmFilter `name`, to
/// `resolution` bytes, between `lo` (stored) and `hi` (refused); and the refusal above it.
fn largest_config(
    cluster: &Cluster,
    name: &str,
    image: &str,
    resolution: usize,
) -> (usize, String) {
    let fits = |n: usize| -> Result<(), String> {
        let doc = bad_json(name, image, &format!("\"{}\"", "x".repeat(n)), None);
        let out = cluster.kubectl_with_input(&["create", "-f", "-"], &doc);
        if !out.success() {
            return Err(complaint(&out));
        }
        cluster
            .kubectl(&["delete", "wasmfilter", name, "-n", NS, "--wait"])
            .ok();
        Ok(())
    };
    let (mut lo, mut hi) = (1_500_000, 1_600_000);
    if let Err(e) = fits(lo) {
        panic!("size probe: a config of {lo} bytes was expected to be stored, but: {e}");
    }
    let mut refusal = match fits(hi) {
        Ok(()) => panic!("size probe: a config of {hi} bytes was expected to be refused"),
        Err(e) => e,
    };
    while hi - lo > resolution {
        let mid = (lo + hi) / 2;
        match fits(mid) {
            Ok(()) => lo = mid,
            Err(e) => {
                hi = mid;
                refusal = e;
            }
        }
    }
    (lo, refusal)
}

/// Starts a dataplane and waits until it is ready (managed, the operator's snapshot applied).
fn start_dataplane(dp: &mut Dataplane) {
    dp.start("setup");
    poll(&format!("setup: {} ready", dp.id), PATIENCE, || {
        let r = http_get(&dp.admin, "/ready").map_err(|e| format!("{e:#}"))?;
        (r.status == 200)
            .then_some(())
            .ok_or(format!("{r:?}\n{}", dp.log_tail()))
    })
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Waits until a response through `dp` carries every (header, value); the time it took.
fn wait_headers(dp: &Dataplane, want: &[(String, String)]) -> Result<Duration, String> {
    poll(
        &format!("{} answers with {want:?}", dp.id),
        PATIENCE,
        || {
            let r = dp.get()?;
            let wrong: Vec<String> = want
                .iter()
                .filter(|(h, v)| r.header(h) != Some(v.as_str()))
                .map(|(h, v)| format!("{h}: {:?}, expected {v:?}", r.header(h)))
                .collect();
            if r.status == 200 && wrong.is_empty() {
                Ok(())
            } else {
                Err(format!("status {}, {}", r.status, wrong.join(", ")))
            }
        },
    )
    .map(|((), took)| took)
}

struct Report {
    problems: Vec<String>,
    notes: Vec<String>,
}

impl Report {
    fn note(&mut self, note: String) {
        eprintln!("bad_objects: {note}");
        self.notes.push(note);
    }

    fn problem(&mut self, problem: String) {
        eprintln!("bad_objects: PROBLEM: {problem}");
        self.problems.push(problem);
    }
}

#[test]
fn one_bad_object_affects_only_itself() {
    if std::env::var_os(wasmfilter_e2e::KUBECONFIG_ENV).is_some() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: the bad-object test runs its own operator against the harness's API server, not against {}",
            wasmfilter_e2e::KUBECONFIG_ENV
        );
        return;
    }
    let Some(cluster) = Cluster::shared() else {
        return;
    };
    let total = Instant::now();

    // ---- setup: registry, chart, module, the size the API server admits, processes ---------
    let t = Instant::now();
    let bins = workspace_binaries().unwrap();
    let module = wasmfilter_testkit::rust_filter("header_rewrite").unwrap();
    let dir = cluster.dir().join("bad-objects");
    std::fs::create_dir_all(&dir).unwrap();
    let registry = TestRegistry::start(None);
    install_chart(cluster, &[registry.host()], &[]);
    cluster
        .apply_yaml(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"
        ))
        .ok();
    let image = registry.reference("filters/header-rewrite:v1");
    let digest = push_module(&bins, &module, &image).unwrap();
    let kubeconfig = cluster
        .service_account_kubeconfig(SYSTEM, OPERATOR_SA)
        .unwrap();
    eprintln!(
        "bad_objects: binaries, filter, registry, chart, push: {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // Before the operator runs, so it never sees the probes.
    let t = Instant::now();
    let (largest, refusal) = largest_config(cluster, "too-big", &image, 512);
    let probe_note = format!(
        "the API server stores a WasmFilter whose spec.config is a string of at most {largest} bytes \
         (found to 512 B in {:.1}s); one of {} bytes more is refused: {refusal}",
        t.elapsed().as_secs_f64(),
        512,
    );

    let t = Instant::now();
    let mut operator = operator_from_chart(cluster, &bins, &dir, &kubeconfig, "op-1");
    operator.start("setup");
    let mut dataplanes: Vec<Dataplane> = [("dp-1", "a"), ("dp-2", "b")]
        .iter()
        .map(|(id, zone)| dataplane_from_chart(cluster, &bins, &dir, &operator.grpc(), id, zone))
        .collect();
    for dp in &mut dataplanes {
        start_dataplane(dp);
    }
    eprintln!(
        "bad_objects: operator and dataplanes ready: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let mut report = Report {
        problems: Vec::new(),
        notes: vec![probe_note.clone()],
    };
    eprintln!("bad_objects: {probe_note}");

    // ---- the ordinary filters -----------------------------------------------------------------
    let t = Instant::now();
    let docs: Vec<String> = ORDINARY
        .iter()
        .map(|name| ordinary_yaml(name, &image, "v1"))
        .collect();
    cluster.apply_yaml(&docs.join("---\n")).ok();
    let mut want: Vec<(String, String)> = ORDINARY
        .iter()
        .map(|n| (header_of(n), "v1".to_string()))
        .collect();
    for dp in &dataplanes {
        wait_headers(dp, &want)
            .unwrap_or_else(|e| panic!("rollout of {ORDINARY:?}: {e}\n{}", dp.log_tail()));
    }
    let ordinary_ready = |names: &[&str]| -> Result<(), String> {
        for name in names {
            let wf = read(cluster, name)?;
            expect_condition(&wf, "Ready", "True", "RolledOut")
                .and_then(|()| expect_condition(&wf, "Resolved", "True", "Resolved"))
                .map_err(|e| format!("{NS}/{name}: {e}"))?;
            if wf["status"]["module"]["digest"] != digest.as_str() {
                return Err(format!("{NS}/{name}: module {}", wf["status"]["module"]));
            }
        }
        Ok(())
    };
    poll("the ordinary filters Ready", PATIENCE, || {
        ordinary_ready(&ORDINARY)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", log_tail(&operator.log(), 40)));
    report.note(format!(
        "{} ordinary filters on both dataplanes and Ready {:.2}s after kubectl apply",
        ORDINARY.len(),
        t.elapsed().as_secs_f64()
    ));

    let expected: BTreeSet<String> = ORDINARY.iter().map(|n| format!("{NS}/{n}")).collect();
    let targets: Vec<(String, String)> = dataplanes
        .iter()
        .map(|d| (d.id.clone(), d.admin.clone()))
        .collect();
    let sampler = Sampler::start(&targets, SAMPLE_EVERY);

    // ---- 1. the bad objects, applied as a user would ----------------------------------------
    let big = largest - STATUS_ROOM;
    let mut bad = vec![
        Bad::new(
            "deep-200",
            "spec.config 200 deep".into(),
            bad_json("deep-200", &image, &nested(200), None),
            vec![
                "spec.config is nested 200 levels deep".into(),
                format!("at most {MAX_CONFIG_DEPTH}"),
            ],
        ),
        Bad::new(
            "deep-1000",
            "spec.config 1000 deep".into(),
            bad_json("deep-1000", &image, &nested(1000), None),
            vec![
                "spec.config is nested 1000 levels deep".into(),
                format!("at most {MAX_CONFIG_DEPTH}"),
            ],
        ),
        Bad::new(
            "vm-deep-300",
            "spec.vm.config 300 deep".into(),
            bad_json(
                "vm-deep-300",
                &image,
                r#"{"response":{"set":{"x-bo-vm-deep-300":"v1"}}}"#,
                Some(&nested(300)),
            ),
            vec![
                "spec.vm.config is nested 300 levels deep".into(),
                format!("at most {MAX_CONFIG_DEPTH}"),
            ],
        ),
        Bad::new(
            "too-big",
            format!("spec.config string {big} B"),
            bad_json("too-big", &image, &format!("\"{}\"", "x".repeat(big)), None),
            vec![
                "spec.config".into(),
                format!("is {big} bytes serialized"),
                format!("at most {MAX_CONFIG_BYTES}"),
            ],
        ),
    ];
    sampler.mark("applying the bad objects");
    for b in &mut bad {
        let out = cluster.kubectl_with_input(&["apply", "-f", "-"], &b.doc);
        if out.success() {
            b.applied = Some(Instant::now());
            continue;
        }
        b.refused = Some(complaint(&out));
        let out = cluster.apply_yaml(&b.doc);
        if out.success() {
            b.applied = Some(Instant::now());
            b.server_side = Some(Ok(()));
        } else {
            b.server_side = Some(Err(complaint(&out)));
        }
    }
    sampler.mark("bad objects applied");
    for b in &bad {
        match (&b.refused, &b.server_side) {
            (None, _) => report.note(format!(
                "{}: kubectl apply admitted it ({} bytes of JSON)",
                b.name,
                b.doc.len()
            )),
            (Some(r), Some(Ok(()))) => report.note(format!(
                "{}: kubectl apply refused it ({r}); kubectl apply --server-side admitted it ({} bytes of JSON)",
                b.name,
                b.doc.len()
            )),
            (Some(r), s) => report.problem(format!(
                "{}: the API server refused it, expected it to be admitted: kubectl apply: {r}; --server-side: {s:?}",
                b.name
            )),
        }
    }

    // ---- 2. each admitted one is refused alone ------------------------------------------------
    let deadline = Instant::now() + PATIENCE;
    let mut last: Vec<String> = Vec::new();
    while Instant::now() < deadline && bad.iter().any(|b| b.admitted() && b.condition.is_none()) {
        last.clear();
        for b in bad
            .iter_mut()
            .filter(|b| b.admitted() && b.condition.is_none())
        {
            match read(cluster, b.name).and_then(|wf| {
                let c = b.refused_in(&wf)?;
                Ok((c, condition(&wf, "Ready")))
            }) {
                Ok((c, ready)) => {
                    b.condition_after = b.applied.map(|a| a.elapsed());
                    b.condition = Some(c);
                    b.ready = ready;
                }
                Err(e) => last.push(format!("{}: {e}", b.name)),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for e in &last {
        report.problem(format!(
            "expected Resolved=False InvalidSpec naming the field and the bound within {PATIENCE:?}; last seen: {e}"
        ));
    }
    sampler.mark("bad objects refused");
    // One deadline for all: a missing Event costs PATIENCE once.
    let deadline = Instant::now() + PATIENCE;
    let mut seen: Vec<(String, Vec<Triple>)> = Vec::new();
    while Instant::now() < deadline && bad.iter().any(|b| b.admitted() && b.event.is_none()) {
        seen.clear();
        for b in bad.iter_mut().filter(|b| b.admitted() && b.event.is_none()) {
            let all = events(cluster, b.name);
            match all
                .iter()
                .find(|(t, r, _)| t == "Warning" && r == "InvalidSpec")
            {
                Some((_, _, m)) => b.event = Some(m.clone()),
                None => seen.push((b.name.to_string(), all)),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for (name, all) in &seen {
        report.problem(format!(
            "expected a Warning Event InvalidSpec about {NS}/{name} within {PATIENCE:?}; its Events: {all:?}"
        ));
    }
    if let Err(e) = ordinary_ready(&ORDINARY) {
        report.problem(format!(
            "after the bad objects, expected the ordinary filters Ready: {e}"
        ));
    }
    for dp in &dataplanes {
        if let Err(e) = wait_headers(dp, &want) {
            report.problem(format!("after the bad objects: {e}"));
        }
    }

    // A new ordinary filter still reaches the dataplanes.
    cluster.apply_yaml(&ordinary_yaml(LATE, &image, "v1")).ok();
    sampler.mark("ok-4 applied");
    want.push((header_of(LATE), "v1".into()));
    for dp in &dataplanes {
        match wait_headers(dp, &want) {
            Ok(took) => report.note(format!(
                "{LATE}, applied after the bad objects, ran on {} {:.2}s later",
                dp.id,
                took.as_secs_f64()
            )),
            Err(e) => report.problem(format!("the filter applied after the bad objects: {e}")),
        }
    }

    // ---- 3. the operator restarted with the bad objects in place ------------------------------
    let op = &mut operator;
    sampler.mark("kill -9 op-1");
    op.kill();
    let restarted = Instant::now();
    let ready = op.spawn().and_then(|()| op.wait_ready(PATIENCE));
    sampler.mark("op-1 started again");
    match ready {
        Ok(after) => {
            sampler.mark("op-1 ready");
            report.note(format!(
                "the restarted operator answered /ready 200 {:.2}s after its start",
                after.as_secs_f64()
            ));
        }
        Err(e) => report.problem(format!(
            "expected the restarted operator's /ready to answer 200: {e}"
        )),
    }
    for b in bad.iter().filter(|b| b.admitted()) {
        if let Err(e) = read(cluster, b.name).and_then(|wf| b.refused_in(&wf)) {
            report.problem(format!(
                "after the restart, expected {} still InvalidSpec: {e}",
                b.name
            ));
        }
    }
    // A change of a bad object: the restarted operator refuses its new generation itself.
    let changed = Bad::new(
        "deep-200",
        "spec.config 201 deep".into(),
        bad_json("deep-200", &image, &nested(201), None),
        vec!["spec.config is nested 201 levels deep".into()],
    );
    let out = cluster.kubectl_with_input(&["apply", "-f", "-"], &changed.doc);
    if out.success() {
        let t = Instant::now();
        match poll(
            "deep-200, nested 201 deep after the restart, refused for its generation",
            PATIENCE,
            || read(cluster, "deep-200").and_then(|wf| changed.refused_in(&wf)),
        ) {
            Ok(_) => report.note(format!(
                "deep-200 changed to 201 levels after the restart: InvalidSpec for its new generation after {:.2}s",
                t.elapsed().as_secs_f64()
            )),
            Err(e) => report.problem(e),
        }
    } else {
        report.problem(format!(
            "kubectl apply of deep-200 201 deep: {}",
            complaint(&out)
        ));
    }
    // A change of an ordinary filter arrives.
    cluster
        .apply_yaml(&ordinary_yaml("ok-1", &image, "v2"))
        .ok();
    sampler.mark("ok-1 changed to v2");
    want[0].1 = "v2".into();
    for dp in &dataplanes {
        match wait_headers(dp, &want) {
            Ok(took) => report.note(format!(
                "a change of ok-1 after the restart ran on {} {:.2}s later ({:.2}s after the restart)",
                dp.id,
                took.as_secs_f64(),
                restarted.elapsed().as_secs_f64()
            )),
            Err(e) => report.problem(format!("the change after the restart: {e}")),
        }
    }
    let all_ordinary: Vec<&str> = ORDINARY.iter().copied().chain([LATE]).collect();
    if let Err(e) = poll("every ordinary filter Ready", PATIENCE, || {
        ordinary_ready(&all_ordinary)
    }) {
        report.problem(e);
    }
    std::thread::sleep(Duration::from_millis(500));
    let samples = sampler.stop();

    // ---- what the dataplanes ran all along -----------------------------------------------------
    eprintln!(
        "bad_objects: chains sampled every {} ms\n{}",
        SAMPLE_EVERY.as_millis(),
        samples.report(&expected)
    );
    for p in samples.problems(&expected, MAX_GAP) {
        report.problem(p);
    }
    let bad_names: BTreeSet<String> = bad.iter().map(|b| format!("{NS}/{}", b.name)).collect();
    for chain in &samples.chains {
        let leaked: BTreeSet<&String> = chain
            .samples
            .iter()
            .filter_map(|s| s.filters.as_ref().ok())
            .flat_map(|names| names.iter())
            .filter(|n| bad_names.contains(*n))
            .collect();
        if !leaked.is_empty() {
            report.problem(format!(
                "{} ran bad objects at some point: {leaked:?} (expected none of {bad_names:?})",
                chain.id
            ));
        }
    }
    for dp in &dataplanes {
        match dp.filter_names() {
            Ok(names) => {
                let names: BTreeSet<String> = names.into_iter().collect();
                let want: BTreeSet<String> =
                    all_ordinary.iter().map(|n| format!("{NS}/{n}")).collect();
                if names != want {
                    report.problem(format!(
                        "at the end {} runs {names:?}, expected {want:?}",
                        dp.id
                    ));
                }
            }
            Err(e) => report.problem(format!("{}: {e}", dp.id)),
        }
    }
    let log = operator.log();
    // A status write the operator takes for failed is retried forever, and the Event that
    // follows it is never published.
    for b in &bad {
        let failed = format!("writing the status of {NS}/{}: ", b.name);
        let writes = log.lines().filter(|l| l.contains(&failed)).count();
        if let Some(line) = log.lines().find(|l| l.contains(&failed)) {
            let why = &line[line.find(&failed).unwrap_or(0)..];
            report.problem(format!(
                "expected the operator to write the status of {} once and go on; it failed {writes} time(s): {}",
                b.name,
                shorten(why, 300)
            ));
        }
    }
    for (text, why) in [
        (
            "cannot be read",
            "a bad object was skipped unread instead of refused",
        ),
        ("forbidden", "the operator was denied something"),
    ] {
        if log.to_lowercase().contains(text) {
            report.problem(format!("the operator's log mentions {text:?}: {why}"));
        }
    }

    // ---- the report ----------------------------------------------------------------------------
    let table = table(&bad);
    let listing = cluster.kubectl(&["get", "wasmfilters", "-n", NS, "-o", "wide"]);
    eprintln!(
        "bad_objects: the bad objects\n{table}\n$ kubectl get wasmfilters -n {NS} -o wide\n{}",
        listing.stdout
    );
    eprintln!("bad_objects: done in {:.1}s", total.elapsed().as_secs_f64());
    let operator_tail = log_tail(&operator.log(), 40);
    assert!(
        report.problems.is_empty(),
        "one bad object must affect only itself; problems:\n- {}\n\nnotes:\n- {}\n\n{table}\nthe operator's log tail:\n{operator_tail}",
        report.problems.join("\n- "),
        report.notes.join("\n- ")
    );
    for dp in &mut dataplanes {
        dp.kill();
    }
    operator.kill();
}

/// `text` cut to `max` characters.
fn shorten(text: &str, max: usize) -> String {
    let mut short: String = text.chars().take(max).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

/// The last `lines` lines of a log, each cut to 400 characters (the operator logs whole
/// objects, and a deep one is tens of kilobytes).
fn log_tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| shorten(l, 400))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The table of the bad objects.
fn table(bad: &[Bad]) -> String {
    let mut rows = vec![[
        "object".to_string(),
        "config".into(),
        "JSON bytes".into(),
        "admitted".into(),
        "Resolved".into(),
        "Ready".into(),
        "condition after".into(),
        "Warning Event".into(),
    ]];
    for b in bad {
        let admitted = match (&b.refused, &b.server_side) {
            (None, _) => "yes (kubectl apply)".to_string(),
            (Some(_), Some(Ok(()))) => "yes (--server-side only)".into(),
            _ => "no".into(),
        };
        let cond = |c: &Option<(String, String, String)>| {
            c.as_ref()
                .map_or("-".to_string(), |(s, r, _)| format!("{s} {r}"))
        };
        rows.push([
            b.name.to_string(),
            b.what.clone(),
            b.doc.len().to_string(),
            admitted,
            cond(&b.condition),
            cond(&b.ready),
            b.condition_after
                .map_or("-".into(), |d| format!("{:.2}s", d.as_secs_f64())),
            b.event
                .as_ref()
                .map_or("-".into(), |_| "InvalidSpec".into()),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join(" | ").trim_end());
        out.push('\n');
    }
    for b in bad {
        if let Some((_, _, m)) = &b.condition {
            out.push_str(&format!("{}: {m}\n", b.name));
        }
        if let Some(e) = &b.event {
            out.push_str(&format!("{} Event: {e}\n", b.name));
        }
    }
    out
}

//! The chart's components run as local processes (tests/flow.rs, tests/restart_safety.rs):
//! `wasmfilter-operator run` with the Deployment's args and `wasmfilter-dataplane` with the
//! ConfigMap's `dataplane.yaml`, with only what a pod gets from its surroundings replaced
//! (loopback addresses, temporary directories, the echo upstream, POD_NAME/POD_NAMESPACE).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Binaries, Cluster, HttpResponse, Process, free_port, http_get, repo_root};

/// The Helm release the tests install.
pub const RELEASE: &str = "wasmfilter";
/// Its namespace (the operator's Lease lives there).
pub const SYSTEM: &str = "wasmfilter-system";
/// The operator's ServiceAccount.
pub const OPERATOR_SA: &str = "wasmfilter-operator";
/// How long a process may take to start, or a rollout or a status update to show.
pub const SOON: Duration = Duration::from_secs(30);

/// `helm install` of `charts/wasmfilter` into [`SYSTEM`] without TLS, with the given
/// registries allowed over plain HTTP and extra `--set` values.
pub fn install_chart(cluster: &Cluster, insecure_registries: &[String], sets: &[&str]) {
    let chart = repo_root().join("charts/wasmfilter");
    let insecure = format!(
        "operator.insecureRegistries={{{}}}",
        insecure_registries.join(",")
    );
    let mut args = vec![
        "install",
        RELEASE,
        chart.to_str().expect("a UTF-8 path"),
        "--namespace",
        SYSTEM,
        "--create-namespace",
        "--set",
        "tls.mode=disabled",
        "--set",
        &insecure,
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    cluster.helm(&args).ok();
}

/// `wasmfilter-operator push FILE REFERENCE --insecure`; the module digest it printed.
pub fn push_module(bins: &Binaries, module: &Path, reference: &str) -> Result<String, String> {
    let pushed = Command::new(&bins.operator)
        .arg("push")
        .arg(module)
        .arg(reference)
        .arg("--insecure")
        .output()
        .map_err(|e| format!("running {}: {e}", bins.operator.display()))?;
    let stdout = String::from_utf8_lossy(&pushed.stdout).into_owned();
    if !pushed.status.success() {
        return Err(format!(
            "push: {stdout}{}",
            String::from_utf8_lossy(&pushed.stderr)
        ));
    }
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("module "))
        .map(str::to_string)
        .ok_or_else(|| format!("push printed no module digest: {stdout}"))
}

/// How to (re)start a process: program, arguments, environment.
#[derive(Clone, Debug)]
pub struct Recipe {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Recipe {
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// The value following `flag` in the arguments.
    pub fn arg(&self, flag: &str) -> Option<&str> {
        self.args
            .iter()
            .skip_while(|a| *a != flag)
            .nth(1)
            .map(String::as_str)
    }

    /// Sets environment variable `name` (replacing it if present).
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_string(), value.to_string()));
    }
}

/// `wasmfilter-operator run`, as the chart's Deployment runs it.
pub struct Operator {
    /// Its identity (POD_NAME), also the name of its log.
    pub name: String,
    pub recipe: Recipe,
    /// The admin listener (`/ready`), `127.0.0.1:PORT`.
    pub admin: String,
    pub log: PathBuf,
    pub process: Option<Process>,
}

impl Operator {
    /// The gRPC listener the dataplanes dial, `127.0.0.1:PORT`.
    pub fn grpc(&self) -> String {
        self.recipe
            .arg("--grpc-listen")
            .expect("the operator has --grpc-listen")
            .to_string()
    }

    /// Starts the process without waiting for anything (a follower never becomes ready).
    pub fn spawn(&mut self) -> Result<(), String> {
        if self.process.is_some() {
            return Err(format!("{} already runs", self.name));
        }
        let process = Process::spawn(&self.name, self.recipe.command(), &self.log)
            .map_err(|e| format!("{e:#}"))?;
        self.process = Some(process);
        Ok(())
    }

    /// Whether its `/ready` answers 200 (it leads and has listed the WasmFilters).
    pub fn ready(&self) -> bool {
        http_get(&self.admin, "/ready").is_ok_and(|r| r.status == 200)
    }

    /// Whether its `/ready` answers 503: it runs, but does not lead (or has not listed yet).
    pub fn not_ready(&self) -> bool {
        http_get(&self.admin, "/ready").is_ok_and(|r| r.status == 503)
    }

    /// Waits up to `timeout` until `/ready` answers 200; an error (with the log's tail) if it
    /// does not, or if the process exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            if self.ready() {
                return Ok(started.elapsed());
            }
            if let Some(status) = self.process.as_mut().and_then(Process::exited) {
                return Err(format!(
                    "{} exited ({status}):\n{}",
                    self.name,
                    self.log_tail(60)
                ));
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "http://{}/ready did not answer 200 within {timeout:?}:\n{}",
                    self.admin,
                    self.log_tail(60)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts it and waits until it leads and has listed the WasmFilters (`/ready` 200, what
    /// the chart's readiness probe waits for); panics naming `step` otherwise.
    pub fn start(&mut self, step: &str) {
        self.spawn().unwrap_or_else(|e| panic!("{step}: {e}"));
        self.wait_ready(SOON)
            .unwrap_or_else(|e| panic!("{step}: {e}"));
    }

    /// SIGKILL: no goodbye on the streams, no Lease release.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Everything it (and its earlier runs) printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }
}

/// `wasmfilter-dataplane --config FILE`, as the chart's DaemonSet runs it.
pub struct Dataplane {
    pub id: String,
    pub recipe: Recipe,
    pub log: PathBuf,
    pub state_dir: PathBuf,
    pub process: Option<Process>,
    /// The proxy listener, `127.0.0.1:PORT` (once started).
    pub proxy: String,
    /// The admin listener, `127.0.0.1:PORT` (once started).
    pub admin: String,
}

impl Dataplane {
    /// Starts it and waits until its listeners are open (it prints their addresses).
    pub fn start(&mut self, step: &str) {
        assert!(self.process.is_none(), "{step}: {} already runs", self.id);
        let before = std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let mut process = Process::spawn(&self.id, self.recipe.command(), &self.log)
            .unwrap_or_else(|e| panic!("{step}: {e:#}"));
        let (proxy, admin) = process
            .wait_for_log(SOON, |log| {
                let line = log
                    .get(before..)?
                    .lines()
                    .find(|l| l.starts_with("wasmfilter dataplane listening on "))?;
                // "… listening on http://A (admin http://B)"
                let mut urls = line.split("http://").skip(1);
                let proxy = urls.next()?.split_whitespace().next()?.to_string();
                let admin = urls.next()?.trim_end_matches(')').to_string();
                Some((proxy, admin))
            })
            .unwrap_or_else(|e| panic!("{step}: {e:#}"));
        self.proxy = proxy;
        self.admin = admin;
        self.process = Some(process);
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// `GET /` through the proxy.
    pub fn get(&self) -> Result<HttpResponse, String> {
        http_get(&self.proxy, "/").map_err(|e| format!("{}: {e:#}", self.id))
    }

    /// `/config_dump` of the admin listener.
    pub fn config_dump(&self) -> Result<Value, String> {
        config_dump(&self.admin)
    }

    /// The names of the filters `/config_dump` lists, in chain order.
    pub fn filter_names(&self) -> Result<Vec<String>, String> {
        filter_names(&self.config_dump()?)
    }

    pub fn log_tail(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 40)
    }
}

/// `/config_dump` of a dataplane's admin listener at `admin`, parsed.
pub fn config_dump(admin: &str) -> Result<Value, String> {
    let r = http_get(admin, "/config_dump").map_err(|e| format!("{e:#}"))?;
    if r.status != 200 {
        return Err(format!("/config_dump answered {}: {}", r.status, r.body));
    }
    serde_json::from_str(&r.body).map_err(|e| format!("{e}: {}", r.body))
}

/// The `name`s of a `/config_dump`'s filters.
pub fn filter_names(dump: &Value) -> Result<Vec<String>, String> {
    dump["filters"]
        .as_array()
        .ok_or_else(|| format!("no filters list in {dump}"))?
        .iter()
        .map(|f| {
            f["name"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("a filter without a name: {f}"))
        })
        .collect()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `kubectl get ARGS -o json`, parsed (panics if kubectl fails).
pub fn get_json(cluster: &Cluster, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = cluster.kubectl(&all).ok();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// (status, reason, message) of a condition.
pub fn condition(wf: &Value, type_: &str) -> Option<(String, String, String)> {
    wf["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("status"), s("reason"), s("message"))
        })
}

/// Checks that condition `type_` is (status, reason) for the current generation.
pub fn expect_condition(wf: &Value, type_: &str, status: &str, reason: &str) -> Result<(), String> {
    let generation = &wf["metadata"]["generation"];
    let c = wf["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .ok_or_else(|| format!("no {type_} condition"))?;
    if c["status"] == status && c["reason"] == reason && &c["observedGeneration"] == generation {
        Ok(())
    } else {
        Err(format!(
            "{type_} is {} {} (generation {}), expected {status} {reason} (generation {generation})",
            c["status"], c["reason"], c["observedGeneration"]
        ))
    }
}

/// The operator as the installed chart's Deployment runs it: its args, with the pod's
/// surroundings replaced (loopback ports, a cache directory, POD_NAME = `identity`,
/// POD_NAMESPACE), and `kubeconfig` (the ServiceAccount's). Its log is `dir/IDENTITY.log`.
pub fn operator_from_chart(
    cluster: &Cluster,
    bins: &Binaries,
    dir: &Path,
    kubeconfig: &Path,
    identity: &str,
) -> Operator {
    let deployment = get_json(
        cluster,
        &["get", "deployment", "wasmfilter-operator", "-n", SYSTEM],
    );
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let grpc = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let cache = dir.join(format!("{identity}-cache"));
    let mut args: Vec<String> = Vec::new();
    let mut chart_args = container["args"]
        .as_array()
        .expect("the operator container has args")
        .iter()
        .map(|a| a.as_str().unwrap().to_string());
    while let Some(arg) = chart_args.next() {
        let value = match arg.as_str() {
            "--grpc-listen" => Some(grpc.clone()),
            "--admin-listen" => Some(admin.clone()),
            "--cache-dir" => Some(cache.display().to_string()),
            _ => None,
        };
        args.push(arg);
        if let Some(value) = value {
            chart_args.next();
            args.push(value);
        }
    }
    let args = args
        .into_iter()
        .map(|a| {
            a.replace("$(POD_NAMESPACE)", SYSTEM)
                .replace("$(POD_NAME)", identity)
        })
        .collect::<Vec<_>>();
    assert!(
        args.contains(&"--insecure-plaintext".to_string()),
        "tls.mode=disabled: {args:?}"
    );
    let mut env = vec![("KUBECONFIG".to_string(), kubeconfig.display().to_string())];
    for e in container["env"].as_array().unwrap() {
        if let Some(value) = e["value"].as_str() {
            env.push((e["name"].as_str().unwrap().to_string(), value.to_string()));
        }
    }
    Operator {
        name: identity.to_string(),
        recipe: Recipe {
            program: bins.operator.clone(),
            args,
            env,
        },
        admin,
        log: dir.join(format!("{identity}.log")),
        process: None,
    }
}

/// A dataplane as the installed chart's DaemonSet runs it: the ConfigMap's `dataplane.yaml`
/// with loopback listeners, `operator_grpc` (`127.0.0.1:PORT`) as the operator's address, the
/// echo upstream for the chart's `backend` cluster, a state directory of its own, one more
/// label (`zone`), and its id from WASMFILTER_DATAPLANE_ID (the node's name in the DaemonSet).
pub fn dataplane_from_chart(
    cluster: &Cluster,
    bins: &Binaries,
    dir: &Path,
    operator_grpc: &str,
    id: &str,
    zone: &str,
) -> Dataplane {
    let cm = get_json(
        cluster,
        &["get", "configmap", "wasmfilter-dataplane", "-n", SYSTEM],
    );
    let mut config: Value =
        serde_yaml_ng::from_str(cm["data"]["dataplane.yaml"].as_str().unwrap()).unwrap();
    config["listen"] = "127.0.0.1:0".into();
    config["admin"] = "127.0.0.1:0".into();
    let backend = config["routes"][0]["cluster"].clone();
    config["clusters"] = serde_json::json!([{"name": backend, "builtin": "echo"}]);
    let link = &mut config["operator"];
    assert_eq!(link["insecure"], true, "tls.mode=disabled: {link}");
    assert_eq!(link["id"], "", "{link}");
    link["address"] = format!("http://{operator_grpc}").into();
    link["stateDir"] = format!("{id}-state").into();
    link["labels"]["zone"] = zone.into();
    let file = dir.join(format!("{id}.yaml"));
    std::fs::write(&file, serde_yaml_ng::to_string(&config).unwrap()).unwrap();
    Dataplane {
        id: id.to_string(),
        recipe: Recipe {
            program: bins.dataplane.clone(),
            args: vec!["--config".into(), file.display().to_string()],
            env: vec![("WASMFILTER_DATAPLANE_ID".into(), id.into())],
        },
        log: dir.join(format!("{id}.log")),
        state_dir: dir.join(format!("{id}-state")),
        process: None,
        proxy: String::new(),
        admin: String::new(),
    }
}

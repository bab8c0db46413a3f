//! The Helm chart charts/wasmfilter: lint, template in every TLS mode, values the schema
//! refuses, the CRD taken from crds/, and `helm install` into a real API server with the
//! operator's permissions checked by the API server's own authorizer.
//!
//! Pods never run here (no container runtime): what is checked is what the API server stores
//! and authorizes.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde_json::{Value, json};
use wasmfilter_e2e::{Cluster, Output, Tools, repo_root, yaml_documents};

const RELEASE: &str = "wasmfilter";
const NAMESPACE: &str = "wasmfilter-system";
const OPERATOR_SA: &str = "system:serviceaccount:wasmfilter-system:wasmfilter-operator";
const DATAPLANE_SA: &str = "system:serviceaccount:wasmfilter-system:wasmfilter-dataplane";

fn chart() -> String {
    repo_root()
        .join("charts/wasmfilter")
        .to_string_lossy()
        .into_owned()
}

/// Helm without a cluster, with its homes in a directory of its own.
fn helm(tools: &Tools, args: &[&str]) -> Output {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    let home = HOME.get_or_init(|| tempfile::tempdir().unwrap());
    tools.helm(home.path(), args)
}

/// `helm template` of the chart as release `wasmfilter` in `wasmfilter-system`, with extra
/// arguments, parsed.
fn template(tools: &Tools, extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        RELEASE,
        chart.as_str(),
        "--namespace",
        NAMESPACE,
    ];
    args.extend_from_slice(extra);
    let out = helm(tools, &args).ok();
    yaml_documents(&out.stdout).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| {
            let have: Vec<String> = docs
                .iter()
                .map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"]))
                .collect();
            panic!("no {kind}/{name} among {have:?}")
        })
}

fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

fn env_names(container: &Value) -> Vec<&str> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect()
}

/// The dataplane configuration the chart's ConfigMap holds.
fn dataplane_config(docs: &[Value]) -> Value {
    let cm = find(docs, "ConfigMap", "wasmfilter-dataplane");
    serde_yaml_ng::from_str(cm["data"]["dataplane.yaml"].as_str().unwrap()).unwrap()
}

const EVERY_OBJECT: &[&str] = &[
    "ClusterRole/wasmfilter-operator",
    "ClusterRoleBinding/wasmfilter-operator",
    "ConfigMap/wasmfilter-dataplane",
    "DaemonSet/wasmfilter-dataplane",
    "Deployment/wasmfilter-operator",
    "PodDisruptionBudget/wasmfilter-operator",
    "Role/wasmfilter-operator-leader-election",
    "RoleBinding/wasmfilter-operator-leader-election",
    "Secret/wasmfilter-dataplane-tls",
    "Secret/wasmfilter-operator-tls",
    "Service/wasmfilter-dataplane",
    "Service/wasmfilter-operator",
    "Service/wasmfilter-operator-metrics",
    "ServiceAccount/wasmfilter-dataplane",
    "ServiceAccount/wasmfilter-operator",
];

#[test]
fn lint_is_clean_in_every_tls_mode() {
    let Some(tools) = Tools::or_skip() else {
        return;
    };
    let chart = chart();
    for values in [
        vec![],
        vec!["--set", "tls.mode=disabled"],
        vec!["--set", "tls.mode=certManager"],
        vec![
            "--set",
            "tls.mode=existingSecret",
            "--set",
            "tls.existingSecret.operator=mine",
        ],
        vec![
            "--set",
            "dataplane.hostPort.enabled=true,dataplane.stateDir.type=hostPath",
        ],
    ] {
        let mut args = vec!["lint", "--strict", chart.as_str()];
        args.extend(values);
        let out = helm(&tools, &args).ok();
        assert!(out.stdout.contains("0 chart(s) failed"), "{out}");
    }
}

#[test]
fn template_renders_the_operator_contract() {
    let Some(tools) = Tools::or_skip() else {
        return;
    };
    let docs = template(&tools, &[]);
    let expected: BTreeSet<String> = EVERY_OBJECT.iter().map(|s| s.to_string()).collect();
    assert_eq!(kinds(&docs), expected);

    let deployment = find(&docs, "Deployment", "wasmfilter-operator");
    assert_eq!(deployment["spec"]["replicas"], 2);
    // Only the leader is ready: a rollout that waits for ready new replicas would never end.
    assert_eq!(
        deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        "100%"
    );
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "wasmfilter-operator");
    let operator = &pod["containers"][0];
    assert_eq!(
        strings(&operator["args"]),
        [
            "run",
            "--grpc-listen",
            "0.0.0.0:7070",
            "--admin-listen",
            "0.0.0.0:8080",
            "--cache-dir",
            "/var/cache/wasmfilter",
            "--tls-cert",
            "/etc/wasmfilter/tls/tls.crt",
            "--tls-key",
            "/etc/wasmfilter/tls/tls.key",
            "--tls-client-ca",
            "/etc/wasmfilter/tls/ca.crt",
            "--lease-namespace",
            "$(POD_NAMESPACE)",
            "--lease-name",
            "wasmfilter-operator",
            "--identity",
            "$(POD_NAME)",
            "--snapshot-budget",
            "32Mi",
            "--status-stats-interval",
            "60s",
        ]
    );
    // $(VAR) in args expands only from variables the container defines.
    let env = env_names(operator);
    assert!(
        env.contains(&"POD_NAME") && env.contains(&"POD_NAMESPACE"),
        "{env:?}"
    );
    assert_eq!(
        operator["livenessProbe"]["httpGet"],
        json!({"path": "/live", "port": "admin"})
    );
    assert_eq!(
        operator["readinessProbe"]["httpGet"],
        json!({"path": "/ready", "port": "admin"})
    );
    let ports: Vec<(&str, i64)> = operator["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports, [("grpc", 7070), ("admin", 8080)]);
    assert!(operator["resources"]["requests"]["memory"].is_string());
    assert_eq!(operator["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    let pdb = find(&docs, "PodDisruptionBudget", "wasmfilter-operator");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );

    let grpc = find(&docs, "Service", "wasmfilter-operator");
    assert_eq!(grpc["spec"]["ports"][0]["port"], 7070);
    assert_eq!(grpc["spec"]["ports"][0]["targetPort"], "grpc");
    assert_eq!(
        grpc["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let metrics = find(&docs, "Service", "wasmfilter-operator-metrics");
    assert_eq!(metrics["spec"]["ports"][0]["port"], 8080);

    // Kubernetes recommended labels on every object.
    for doc in &docs {
        let labels = &doc["metadata"]["labels"];
        for key in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/component",
            "app.kubernetes.io/part-of",
            "app.kubernetes.io/managed-by",
            "helm.sh/chart",
        ] {
            assert!(
                labels[key].is_string(),
                "{} {} lacks {key}",
                doc["kind"],
                doc["metadata"]["name"]
            );
        }
    }
}

#[test]
fn template_renders_the_dataplane_contract() {
    let Some(tools) = Tools::or_skip() else {
        return;
    };
    let docs = template(&tools, &[]);
    let daemonset = find(&docs, "DaemonSet", "wasmfilter-dataplane");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["serviceAccountName"], "wasmfilter-dataplane");
    let dataplane = &pod["containers"][0];
    assert_eq!(
        strings(&dataplane["args"]),
        ["--config", "/etc/wasmfilter/config/dataplane.yaml"]
    );
    let env = env_names(dataplane);
    for name in [
        "POD_NAME",
        "NODE_NAME",
        "WASMFILTER_DATAPLANE_ID",
        "WASMFILTER_MODULE_CACHE",
    ] {
        assert!(env.contains(&name), "{name} missing from {env:?}");
    }
    assert_eq!(
        dataplane["readinessProbe"]["httpGet"],
        json!({"path": "/ready", "port": "admin"})
    );
    assert_eq!(
        dataplane["livenessProbe"]["httpGet"],
        json!({"path": "/live", "port": "admin"})
    );
    assert_eq!(
        dataplane["ports"][1],
        json!({"name": "admin", "containerPort": 9901, "protocol": "TCP"})
    );
    assert!(dataplane["ports"][0].get("hostPort").is_none());

    let config = dataplane_config(&docs);
    assert_eq!(config["listen"], "0.0.0.0:8080");
    assert_eq!(config["admin"], "0.0.0.0:9901");
    assert_eq!(config["drainTimeout"], "10s");
    assert_eq!(
        config["operator"],
        json!({
            "address": "https://wasmfilter-operator.wasmfilter-system.svc:7070",
            "id": "",
            "labels": {"gateway": "public"},
            "stateDir": "/var/lib/wasmfilter",
            "tls": {
                "caFile": "/etc/wasmfilter/tls/ca.crt",
                "certFile": "/etc/wasmfilter/tls/tls.crt",
                "keyFile": "/etc/wasmfilter/tls/tls.key",
            },
        })
    );
    // The grace period outlasts the preStop sleep and the drain.
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    let sleep = dataplane["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .unwrap();
    assert!(
        grace > sleep + 10,
        "grace {grace}s, preStop {sleep}s, drain 10s"
    );
    // The mounts hold what the configuration names.
    let mounts: Vec<&str> = dataplane["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert_eq!(
        mounts,
        [
            "/etc/wasmfilter/config",
            "/var/lib/wasmfilter",
            "/tmp",
            "/etc/wasmfilter/tls"
        ]
    );
    // With a read-only root filesystem, the compiled-module cache must be on a volume.
    assert_eq!(dataplane["securityContext"]["readOnlyRootFilesystem"], true);
    let cache = dataplane["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "WASMFILTER_MODULE_CACHE")
        .unwrap()["value"]
        .as_str()
        .unwrap();
    assert!(cache.starts_with("/var/lib/wasmfilter/"), "{cache}");

    // hostPort on request, and the configuration follows the values.
    let docs = template(
        &tools,
        &[
            "--set",
            "dataplane.hostPort.enabled=true,dataplane.drainTimeoutSeconds=30,dataplane.terminationGracePeriodSeconds=40",
            "--set-json",
            r#"dataplane.labels={"zone":"a"}"#,
            "--set-json",
            r#"dataplane.extraConfig={"workers":2}"#,
        ],
    );
    let pod = &find(&docs, "DaemonSet", "wasmfilter-dataplane")["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["ports"][0]["hostPort"], 8080);
    assert_eq!(pod["terminationGracePeriodSeconds"], 40);
    let config = dataplane_config(&docs);
    assert_eq!(config["drainTimeout"], "30s");
    assert_eq!(config["workers"], 2);
    // Helm merges maps with the defaults (`gateway: null` removes that label).
    assert_eq!(
        config["operator"]["labels"],
        json!({"gateway": "public", "zone": "a"})
    );
}

#[test]
fn template_renders_each_tls_mode() {
    let Some(tools) = Tools::or_skip() else {
        return;
    };

    // disabled: plaintext on both sides, said explicitly, and no Secret mounted.
    let docs = template(&tools, &["--set", "tls.mode=disabled"]);
    let operator = &find(&docs, "Deployment", "wasmfilter-operator")["spec"]["template"]["spec"];
    let args = strings(&operator["containers"][0]["args"]);
    assert!(args.contains(&"--insecure-plaintext"), "{args:?}");
    assert!(!args.iter().any(|a| a.starts_with("--tls")), "{args:?}");
    assert!(!kinds(&docs).iter().any(|k| k.starts_with("Secret/")));
    let config = dataplane_config(&docs);
    assert_eq!(config["operator"]["insecure"], true);
    assert!(config["operator"].get("tls").is_none());
    assert_eq!(
        config["operator"]["address"],
        "http://wasmfilter-operator.wasmfilter-system.svc:7070"
    );

    // existingSecret: the given Secrets are mounted, none is made.
    let docs = template(
        &tools,
        &[
            "--set",
            "tls.mode=existingSecret,tls.existingSecret.operator=op-certs,tls.existingSecret.dataplane=dp-certs",
        ],
    );
    assert!(!kinds(&docs).iter().any(|k| k.starts_with("Secret/")));
    let secret_of = |kind: &str, name: &str| -> String {
        let pod = &find(&docs, kind, name)["spec"]["template"]["spec"];
        let tls = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "tls")
            .unwrap();
        tls["secret"]["secretName"].as_str().unwrap().to_string()
    };
    assert_eq!(secret_of("Deployment", "wasmfilter-operator"), "op-certs");
    assert_eq!(secret_of("DaemonSet", "wasmfilter-dataplane"), "dp-certs");

    // certManager: a CA chain of its own unless an issuer is given, and a Certificate per side
    // writing the Secrets the pods mount.
    let docs = template(&tools, &["--set", "tls.mode=certManager"]);
    let made = kinds(&docs);
    for object in [
        "Issuer/wasmfilter-selfsigned",
        "Certificate/wasmfilter-ca",
        "Issuer/wasmfilter-ca",
        "Certificate/wasmfilter-operator-tls",
        "Certificate/wasmfilter-dataplane-tls",
    ] {
        assert!(made.contains(object), "{object} missing from {made:?}");
    }
    let server = find(&docs, "Certificate", "wasmfilter-operator-tls");
    assert_eq!(server["spec"]["secretName"], "wasmfilter-operator-tls");
    assert!(
        strings(&server["spec"]["dnsNames"]).contains(&"wasmfilter-operator.wasmfilter-system.svc")
    );
    assert!(strings(&server["spec"]["usages"]).contains(&"server auth"));
    let client = find(&docs, "Certificate", "wasmfilter-dataplane-tls");
    assert!(strings(&client["spec"]["usages"]).contains(&"client auth"));
    let docs = template(
        &tools,
        &[
            "--set",
            "tls.mode=certManager,tls.certManager.issuerRef.name=corp-ca,tls.certManager.issuerRef.kind=ClusterIssuer",
        ],
    );
    assert!(!kinds(&docs).iter().any(|k| k.starts_with("Issuer/")));
    let server = find(&docs, "Certificate", "wasmfilter-operator-tls");
    assert_eq!(server["spec"]["issuerRef"]["name"], "corp-ca");
    assert_eq!(server["spec"]["issuerRef"]["kind"], "ClusterIssuer");
}

#[test]
fn tcp_listeners_reach_the_config_the_pod_and_the_service() {
    let Some(tools) = Tools::or_skip() else {
        return;
    };
    let docs = template(
        &tools,
        &[
            "--set",
            "dataplane.tcpListeners[0].name=postgres",
            "--set",
            "dataplane.tcpListeners[0].port=15432",
            "--set",
            "dataplane.tcpListeners[0].cluster=backend",
            "--set",
            "dataplane.tcpListeners[0].idleTimeout=10m",
        ],
    );
    let config = dataplane_config(&docs);
    assert_eq!(
        config["listeners"],
        json!([{"name": "postgres", "address": "0.0.0.0:15432", "protocol": "TCP", "cluster": "backend", "idleTimeout": "10m"}])
    );
    let daemonset = find(&docs, "DaemonSet", "wasmfilter-dataplane");
    let ports = &daemonset["spec"]["template"]["spec"]["containers"][0]["ports"];
    assert_eq!(
        ports[2],
        json!({"name": "postgres", "containerPort": 15432, "protocol": "TCP"})
    );
    let service = find(&docs, "Service", "wasmfilter-dataplane");
    assert_eq!(
        service["spec"]["ports"][1],
        json!({"name": "postgres", "port": 15432, "targetPort": "postgres", "protocol": "TCP"})
    );
}

#[test]
fn bad_values_are_refused_with_a_reason() {
    let Some(tools) = Tools::or_skip() else {
        return;
    };
    let chart = chart();
    for (values, reason) in [
        // values.schema.json: no unknown keys, enums, ranges, required names.
        (
            vec!["--set", "operator.replicsa=3"],
            "additional properties 'replicsa' not allowed",
        ),
        (vec!["--set", "tls.mode=spiffe"], "/tls/mode"),
        (
            vec!["--set", "operator.grpcPort=70000"],
            "/operator/grpcPort",
        ),
        (
            vec!["--set", "tls.mode=existingSecret"],
            "/tls/existingSecret/operator",
        ),
        (
            vec![
                "--set",
                "operator.insecureRegistries={http://registry.local:5000}",
            ],
            "/operator/insecureRegistries/0",
        ),
        (
            vec![
                "--set",
                "dataplane.tcpListeners[0].name=a-name-past-fifteen",
                "--set",
                "dataplane.tcpListeners[0].port=15432",
                "--set",
                "dataplane.tcpListeners[0].cluster=backend",
            ],
            "/dataplane/tcpListeners/0/name",
        ),
        // The template's own check: the kubelet must not kill a draining dataplane.
        (
            vec!["--set", "dataplane.drainTimeoutSeconds=30"],
            "terminationGracePeriodSeconds (20) must be greater than preStopSleepSeconds + drainTimeoutSeconds (35)",
        ),
    ] {
        let mut args = vec!["template", RELEASE, chart.as_str()];
        args.extend(values);
        let out = helm(&tools, &args).failed();
        assert!(out.stderr.contains(reason), "expected `{reason}` in\n{out}");
    }
}

#[test]
fn the_crd_is_the_repository_one() {
    let Some(tools) = Tools::or_skip() else {
        return;
    };
    // A symlink, so there is no second copy to drift.
    let link = repo_root().join("charts/wasmfilter/crds/wasmfilter.yaml");
    assert_eq!(
        std::fs::read_link(&link).unwrap_or_else(|e| panic!("{}: {e}", link.display())),
        PathBuf::from("../../../crds/wasmfilter.yaml"),
        "charts/wasmfilter/crds/wasmfilter.yaml must be a symlink; restore it with\n  ln -sf ../../../crds/wasmfilter.yaml charts/wasmfilter/crds/wasmfilter.yaml"
    );
    let repository: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo_root().join("crds/wasmfilter.yaml")).unwrap(),
    )
    .unwrap();

    // Helm follows it from the chart directory, and a packaged chart carries the file itself.
    let chart = chart();
    let shown = helm(&tools, &["show", "crds", chart.as_str()]).ok();
    assert_eq!(
        yaml_documents(&shown.stdout).unwrap(),
        std::slice::from_ref(&repository)
    );
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().to_str().unwrap();
    helm(&tools, &["package", chart.as_str(), "--destination", dest]).ok();
    let package = dir.path().join("wasmfilter-0.1.0.tgz");
    let shown = helm(&tools, &["show", "crds", package.to_str().unwrap()]).ok();
    assert_eq!(
        yaml_documents(&shown.stdout).unwrap(),
        std::slice::from_ref(&repository)
    );
    let rendered = template(&tools, &["--include-crds"]);
    assert!(rendered.contains(&repository));
}

// ---- installed into the API server --------------------------------------------------------

/// The shared API server with the chart installed once (as release `wasmfilter`).
fn installed() -> Option<&'static Cluster> {
    let cluster = Cluster::shared()?;
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let chart = chart();
        let out = cluster
            .helm(&[
                "install",
                RELEASE,
                chart.as_str(),
                "--namespace",
                NAMESPACE,
                "--create-namespace",
            ])
            .ok();
        assert!(out.stdout.contains("STATUS: deployed"), "{out}");
        // NOTES.txt tells the user where things are.
        assert!(
            out.stdout
                .contains("https://wasmfilter-operator.wasmfilter-system.svc:7070"),
            "{out}"
        );
    });
    Some(cluster)
}

#[test]
fn install_creates_every_object() {
    let Some(cluster) = installed() else { return };
    for object in EVERY_OBJECT {
        let (kind, name) = object.split_once('/').unwrap();
        let kind = kind.to_lowercase();
        let mut args = vec!["get", kind.as_str(), name, "-o", "name"];
        if !kind.starts_with("cluster") {
            args.extend(["--namespace", NAMESPACE]);
        }
        cluster.kubectl(&args).ok();
    }
    let crd = cluster
        .kubectl(&["get", "crd", "wasmfilters.wasmfilter.dev", "-o", "json"])
        .ok();
    let crd: Value = serde_json::from_str(&crd.stdout).unwrap();
    let established = crd["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "Established" && c["status"] == "True");
    assert!(established, "{crd:#}");

    // The stored objects are the ones rendered (a few fields that matter).
    let deployment = cluster
        .kubectl(&[
            "get",
            "deployment",
            "wasmfilter-operator",
            "-n",
            NAMESPACE,
            "-o",
            "json",
        ])
        .ok();
    let deployment: Value = serde_json::from_str(&deployment.stdout).unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    let daemonset = cluster
        .kubectl(&[
            "get",
            "daemonset",
            "wasmfilter-dataplane",
            "-n",
            NAMESPACE,
            "-o",
            "json",
        ])
        .ok();
    let daemonset: Value = serde_json::from_str(&daemonset.stdout).unwrap();
    assert_eq!(
        daemonset["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );

    let status = cluster
        .helm(&["status", RELEASE, "--namespace", NAMESPACE])
        .ok();
    assert!(status.stdout.contains("STATUS: deployed"), "{status}");
}

#[test]
fn operator_rbac_is_least_privilege() {
    let Some(cluster) = installed() else { return };
    let wf = "wasmfilters.wasmfilter.dev";
    let lease = "leases.coordination.k8s.io/wasmfilter-operator";
    let anywhere = Some("team-a");
    let home = Some(NAMESPACE);
    // (verb, resource, subresource, namespace)
    let allowed: &[(&str, &str, Option<&str>, Option<&str>)] = &[
        ("get", wf, None, anywhere),
        ("list", wf, None, None),
        ("watch", wf, None, None),
        ("get", wf, Some("status"), anywhere),
        ("patch", wf, Some("status"), anywhere),
        ("update", wf, Some("status"), anywhere),
        ("get", "secrets", None, anywhere),
        ("create", "events", None, anywhere),
        ("patch", "events", None, anywhere),
        ("create", "events.events.k8s.io", None, anywhere),
        ("patch", "events.events.k8s.io", None, anywhere),
        ("create", "leases.coordination.k8s.io", None, home),
        ("get", lease, None, home),
        ("update", lease, None, home),
    ];
    let denied: &[(&str, &str, Option<&str>, Option<&str>)] = &[
        ("create", wf, None, anywhere),
        ("update", wf, None, anywhere),
        ("patch", wf, None, anywhere),
        ("delete", wf, None, anywhere),
        ("deletecollection", wf, None, anywhere),
        ("list", "secrets", None, anywhere),
        ("watch", "secrets", None, None),
        ("create", "secrets", None, anywhere),
        ("update", "secrets", None, anywhere),
        ("get", "pods", None, anywhere),
        ("create", "pods", None, anywhere),
        ("list", "configmaps", None, None),
        ("delete", "events", None, anywhere),
        ("list", "leases.coordination.k8s.io", None, home),
        ("delete", lease, None, home),
        ("get", "leases.coordination.k8s.io/someone-else", None, home),
        (
            "update",
            "leases.coordination.k8s.io/kube-scheduler",
            None,
            Some("kube-system"),
        ),
        (
            "create",
            "leases.coordination.k8s.io",
            None,
            Some("kube-system"),
        ),
        (
            "update",
            "customresourcedefinitions.apiextensions.k8s.io",
            None,
            None,
        ),
        (
            "create",
            "clusterrolebindings.rbac.authorization.k8s.io",
            None,
            None,
        ),
        ("impersonate", "serviceaccounts", None, anywhere),
        ("*", "*", None, None),
    ];
    let mut wrong = Vec::new();
    for (expect, checks) in [(true, allowed), (false, denied)] {
        for &(verb, resource, sub, ns) in checks {
            if cluster.can_i(OPERATOR_SA, verb, resource, sub, ns) != expect {
                wrong.push(format!(
                    "{verb} {resource}{} in {}: expected {}",
                    sub.map(|s| format!(" (subresource {s})"))
                        .unwrap_or_default(),
                    ns.unwrap_or("all namespaces"),
                    if expect { "yes" } else { "no" }
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the operator's permissions are off:\n{}",
        wrong.join("\n")
    );

    // The same, as the operator would be: with its ServiceAccount's own token.
    cluster
        .apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: team-a}\n")
        .ok();
    cluster
        .apply_yaml("apiVersion: v1\nkind: Secret\nmetadata: {name: regcred, namespace: team-a}\ntype: kubernetes.io/dockerconfigjson\nstringData: {.dockerconfigjson: '{\"auths\":{}}'}\n")
        .ok();
    let kubeconfig = cluster
        .service_account_kubeconfig(NAMESPACE, "wasmfilter-operator")
        .unwrap();
    let as_operator = |args: &[&str]| {
        let mut cmd = cluster.kubectl_command();
        cmd.env("KUBECONFIG", &kubeconfig).args(args);
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = as_operator(&["get", "wasmfilters", "--all-namespaces"]);
    assert!(ok, "{err}");
    let (ok, err) = as_operator(&["get", "secret", "regcred", "-n", "team-a"]);
    assert!(ok, "{err}");
    for args in [
        &["get", "secrets", "-n", "team-a"][..],
        &["get", "pods", "-n", "team-a"],
        &["delete", "wasmfilter", "header-rewrite", "-n", "team-a"],
    ] {
        let (ok, err) = as_operator(args);
        assert!(
            !ok && err.contains("Forbidden"),
            "kubectl {args:?} as the operator: {err}"
        );
        assert!(
            err.contains("system:serviceaccount:wasmfilter-system:wasmfilter-operator"),
            "{err}"
        );
    }
}

#[test]
fn dataplane_service_account_can_do_nothing() {
    let Some(cluster) = installed() else { return };
    for (verb, resource, ns) in [
        ("get", "wasmfilters.wasmfilter.dev", Some(NAMESPACE)),
        ("list", "wasmfilters.wasmfilter.dev", None),
        ("get", "secrets", Some(NAMESPACE)),
        ("get", "configmaps", Some(NAMESPACE)),
        ("list", "pods", Some(NAMESPACE)),
        ("get", "leases.coordination.k8s.io", Some(NAMESPACE)),
        ("create", "events", Some(NAMESPACE)),
        ("get", "nodes", None),
        ("*", "*", None),
    ] {
        assert!(
            !cluster.can_i(DATAPLANE_SA, verb, resource, None, ns),
            "the dataplane may {verb} {resource}"
        );
    }
    let sa = cluster
        .kubectl(&[
            "get",
            "serviceaccount",
            "wasmfilter-dataplane",
            "-n",
            NAMESPACE,
            "-o",
            "json",
        ])
        .ok();
    let sa: Value = serde_json::from_str(&sa.stdout).unwrap();
    assert_eq!(sa["automountServiceAccountToken"], false);
}

// ---- the generated certificates -----------------------------------------------------------

struct Identity {
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    ca: rustls::pki_types::CertificateDer<'static>,
}

fn secret_data(cluster: &Cluster, name: &str) -> Value {
    let out = cluster
        .kubectl(&["get", "secret", name, "-n", NAMESPACE, "-o", "json"])
        .ok();
    serde_json::from_str::<Value>(&out.stdout).unwrap()["data"].clone()
}

fn identity(cluster: &Cluster, secret: &str) -> Identity {
    use base64::Engine;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let data = secret_data(cluster, secret);
    let field = |key: &str| -> Vec<u8> {
        let text = data[key]
            .as_str()
            .unwrap_or_else(|| panic!("{secret} has no {key}"));
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap()
    };
    Identity {
        chain: CertificateDer::pem_slice_iter(&field("tls.crt"))
            .collect::<Result<_, _>>()
            .unwrap(),
        key: PrivateKeyDer::from_pem_slice(&field("tls.key")).unwrap(),
        ca: CertificateDer::from_pem_slice(&field("ca.crt")).unwrap(),
    }
}

/// A TLS handshake over loopback between a server with the operator's Secret, requiring a
/// client certificate signed by its ca.crt, and a client with the dataplane's Secret (or
/// without a certificate), dialling `server_name`. Ok when a byte made the round trip.
fn handshake(
    operator: &Identity,
    dataplane: &Identity,
    server_name: &str,
    present_client_cert: bool,
) -> Result<(), String> {
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConfig, RootCertStore, ServerConfig};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = |ca: &rustls::pki_types::CertificateDer<'static>| {
        let mut store = RootCertStore::empty();
        store.add(ca.clone()).unwrap();
        Arc::new(store)
    };
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(&operator.ca), provider.clone())
            .build()
            .unwrap();
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(operator.chain.clone(), operator.key.clone_key())
        .map_err(|e| format!("operator certificate: {e}"))?;
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(&dataplane.ca));
    let client = if present_client_cert {
        client
            .with_client_auth_cert(dataplane.chain.clone(), dataplane.key.clone_key())
            .map_err(|e| format!("dataplane certificate: {e}"))?
    } else {
        client.with_no_client_auth()
    };

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = std::thread::spawn(move || -> Result<(), String> {
        let (tcp, _) = listener.accept().unwrap();
        let conn = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut byte = [0u8];
        tls.read_exact(&mut byte)
            .map_err(|e| format!("server: {e}"))?;
        tls.write_all(&byte).map_err(|e| format!("server: {e}"))?;
        tls.flush().map_err(|e| format!("server: {e}"))
    });
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr).unwrap());
    let client_result = (|| {
        tls.write_all(b"x")?;
        let mut byte = [0u8];
        tls.read_exact(&mut byte)?;
        Ok::<_, std::io::Error>(())
    })()
    .map_err(|e| format!("client: {e}"));
    drop(tls);
    let server_result = server_side.join().unwrap();
    client_result.and(server_result)
}

#[test]
fn generated_certificates_do_mtls_and_survive_an_upgrade() {
    let Some(cluster) = installed() else { return };
    let operator = identity(cluster, "wasmfilter-operator-tls");
    let dataplane = identity(cluster, "wasmfilter-dataplane-tls");
    assert_eq!(operator.ca, dataplane.ca, "both sides trust one CA");

    // The name the dataplanes dial, from the installed ConfigMap.
    let cm = cluster
        .kubectl(&[
            "get",
            "configmap",
            "wasmfilter-dataplane",
            "-n",
            NAMESPACE,
            "-o",
            "json",
        ])
        .ok();
    let cm: Value = serde_json::from_str(&cm.stdout).unwrap();
    let config: Value =
        serde_yaml_ng::from_str(cm["data"]["dataplane.yaml"].as_str().unwrap()).unwrap();
    let address = config["operator"]["address"].as_str().unwrap();
    let host = address
        .strip_prefix("https://")
        .and_then(|rest| rest.rsplit_once(':'))
        .map(|(host, _)| host)
        .unwrap_or_else(|| panic!("address {address}"));
    assert_eq!(host, "wasmfilter-operator.wasmfilter-system.svc");

    handshake(&operator, &dataplane, host, true).expect("mTLS between dataplane and operator");
    handshake(
        &operator,
        &dataplane,
        "wasmfilter-operator.wasmfilter-system.svc.cluster.local",
        true,
    )
    .expect("the full cluster name works too");
    let err = handshake(&operator, &dataplane, "elsewhere.example.svc", true).unwrap_err();
    assert!(
        err.contains("NotValidForName") || err.contains("not valid for name"),
        "{err}"
    );
    let err = handshake(&operator, &dataplane, host, false).unwrap_err();
    assert!(
        err.to_lowercase().contains("certificate"),
        "a client without a certificate: {err}"
    );

    // An upgrade keeps them (the chart looks them up instead of generating new ones).
    let before = (
        secret_data(cluster, "wasmfilter-operator-tls"),
        secret_data(cluster, "wasmfilter-dataplane-tls"),
    );
    let chart = chart();
    cluster
        .helm(&[
            "upgrade",
            RELEASE,
            chart.as_str(),
            "--namespace",
            NAMESPACE,
            "--reuse-values",
        ])
        .ok();
    let after = (
        secret_data(cluster, "wasmfilter-operator-tls"),
        secret_data(cluster, "wasmfilter-dataplane-tls"),
    );
    assert_eq!(before, after, "helm upgrade replaced the certificates");
}

#[test]
fn uninstall_keeps_the_crd_and_the_wasmfilters() {
    let Some(cluster) = installed() else { return };
    // A second release of its own, so the shared one stays for the other tests.
    let chart = chart();
    cluster
        .helm(&[
            "install",
            "second",
            chart.as_str(),
            "--namespace",
            "second",
            "--create-namespace",
        ])
        .ok();
    cluster
        .kubectl(&[
            "get",
            "deployment",
            "second-wasmfilter-operator",
            "-n",
            "second",
        ])
        .ok();
    let example = repo_root().join("examples/wasmfilter.yaml");
    cluster
        .kubectl(&["apply", "--server-side", "-f", example.to_str().unwrap()])
        .ok();
    cluster
        .helm(&["uninstall", "second", "--namespace", "second"])
        .ok();
    let gone = cluster.kubectl(&[
        "get",
        "deployment",
        "second-wasmfilter-operator",
        "-n",
        "second",
    ]);
    assert!(gone.stderr.contains("NotFound"), "{gone}");
    let gone = cluster.kubectl(&["get", "clusterrole", "second-wasmfilter-operator"]);
    assert!(gone.stderr.contains("NotFound"), "{gone}");
    // Helm never deletes what crds/ installed, so users' WasmFilters outlive the release.
    cluster
        .kubectl(&["get", "crd", "wasmfilters.wasmfilter.dev"])
        .ok();
    cluster
        .kubectl(&["get", "wasmfilter", "header-rewrite", "-n", "default"])
        .ok();
}

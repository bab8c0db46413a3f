//! The WasmFilter CRD: the checked-in YAML matches the Rust types, `kubectl explain` has a
//! description for every field, the example is valid and converts into the domain types,
//! and every case of tests/data/wasmfilter-cases.yaml is accepted or rejected (with the field
//! and message it names) by a local emulation of the API server's admission: structural
//! schema checks as the API server words them, then the CEL rules evaluated by kube-cel.
//! The e2e suite runs the same cases against a real API server.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use kube::CustomResourceExt;
use serde::Deserialize;
use serde_json::{Value, json};
use wasmfilter_api::crd::{
    FilterFailurePolicy, FilterPhase, MAX_CONFIG_BYTES, WasmFilter, WasmFilterSpec, crd_yaml,
};
use wasmfilter_api::{
    FailurePolicy, FilterLimits, LabelSelector, ModuleLocation, Phase, RequestMatch, chain_order,
};

const REGENERATE: &str = "cargo run -p wasmfilter-api --bin crdgen -- --write";

fn workspace_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn read(path: &str) -> String {
    let path = workspace_file(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The openAPIV3Schema of the (only) version, as JSON.
fn schema() -> Value {
    let crd = WasmFilter::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the CRD has a schema");
    serde_json::to_value(schema).unwrap()
}

fn example() -> Value {
    serde_yaml_ng::from_str(&read("examples/wasmfilter.yaml")).unwrap()
}

// ---- (a) drift ------------------------------------------------------------------------

#[test]
fn checked_in_crd_matches_the_rust_types() {
    let generated = crd_yaml();
    let checked_in =
        std::fs::read_to_string(workspace_file("crds/wasmfilter.yaml")).unwrap_or_default();
    if generated != checked_in {
        let line = generated
            .lines()
            .zip(checked_in.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| "its end".to_string(), |n| format!("line {}", n + 1));
        panic!(
            "crds/wasmfilter.yaml is out of date with api/src/crd.rs (first difference at {line}).\n\
             Regenerate it with:\n\n    {REGENERATE}\n"
        );
    }
}

// ---- (b) descriptions -----------------------------------------------------------------

#[test]
fn every_field_has_a_description_for_kubectl_explain() {
    fn walk(schema: &Value, path: &str, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, prop) in props {
                let path = format!("{path}.{name}");
                let described = prop
                    .get("description")
                    .and_then(Value::as_str)
                    .is_some_and(|d| d.trim().len() >= 10);
                if !described {
                    missing.push(path.clone());
                }
                walk(prop, &path, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(items, &format!("{path}[]"), missing);
        }
        if let Some(values) = schema.get("additionalProperties") {
            walk(values, &format!("{path}{{}}"), missing);
        }
    }
    let schema = schema();
    assert!(schema["description"].as_str().is_some_and(|d| d.len() > 50));
    let mut missing = Vec::new();
    walk(&schema, "", &mut missing);
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:#?}"
    );

    // Descriptions are paragraphs: kubectl explain wraps them itself.
    let yaml = read("crds/wasmfilter.yaml");
    assert!(
        !yaml.contains("description: |"),
        "a description kept the line breaks of its doc comment"
    );
}

// ---- printer columns, subresources, names ------------------------------------------------

#[test]
fn printer_columns_point_at_fields_that_exist() {
    let crd = WasmFilter::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("wasmfilters.wasmfilter.dev")
    );
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["wf".to_string()]));
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(
        version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some(),
        "status is a subresource, so users cannot write it and the operator cannot write spec"
    );
    let columns = version.additional_printer_columns.as_ref().unwrap();
    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "Module", "Digest", "Ready", "Selected", "Failed", "Phase", "Priority", "Reason", "Age"
        ]
    );
    let schema = schema();
    for column in columns {
        if column.json_path == ".metadata.creationTimestamp" {
            continue;
        }
        // `.status.conditions[?(@.type=="Ready")].reason` walks status → conditions → items → reason.
        let mut node = &schema;
        // Drop filter expressions, whose `@.type` would read as a path segment.
        let mut path = String::new();
        let mut depth = 0;
        for c in column.json_path.chars() {
            match c {
                '[' => {
                    depth += 1;
                    if depth == 1 {
                        path.push_str("[]");
                    }
                }
                ']' => depth -= 1,
                _ if depth == 0 => path.push(c),
                _ => {}
            }
        }
        for segment in path.trim_start_matches('.').split('.') {
            let (name, indexed) = match segment.strip_suffix("[]") {
                Some(name) => (name, true),
                None => (segment, false),
            };
            node = node
                .get("properties")
                .and_then(|p| p.get(name))
                .unwrap_or_else(|| panic!("column {} names a missing field", column.name));
            if indexed {
                node = &node["items"];
            }
        }
        let ty = node["type"].as_str().unwrap();
        assert_eq!(
            ty, column.type_,
            "column {} has the wrong type",
            column.name
        );
    }
}

// ---- (c) admission: accepted and rejected WasmFilters ------------------------------------

/// One admission error, as the API server reports it: `field: message`.
#[derive(Debug, Clone, PartialEq)]
struct AdmissionError {
    field: String,
    message: String,
    /// `cel` or the schema keyword that produced it.
    by: String,
}

/// Errors of these kinds stop the API server from running the CEL rules (it adds "some
/// validation rules were not checked because the object was invalid").
const BLOCKING: &[&str] = &[
    "type",
    "enum",
    "maxLength",
    "maxItems",
    "maxProperties",
    "required",
];

/// The API server's admission of a WasmFilter, emulated: defaulting, the structural schema
/// (with the API server's wording), then the CEL rules (kube-cel) unless a blocking error
/// came first.
fn admit(object: &Value) -> Vec<AdmissionError> {
    let schema = schema();
    let object = kube::core::cel::apply_defaults(&schema, object);
    let mut errors = Vec::new();
    structural(&schema, &object, "", &mut errors);
    if errors.iter().any(|e| BLOCKING.contains(&e.by.as_str())) {
        return errors;
    }
    if let Err(cel) = kube::core::cel::Validator::new().validate(&schema, &object, None) {
        errors.extend(cel.iter().map(|e| AdmissionError {
            field: e.field_path.clone(),
            message: e.message.clone(),
            by: "cel".into(),
        }));
    }
    errors
}

fn structural(schema: &Value, value: &Value, path: &str, errors: &mut Vec<AdmissionError>) {
    let error = |by: &str, field: &str, message: String| AdmissionError {
        field: field.to_string(),
        message,
        by: by.into(),
    };
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == json!(true);
    let Some(ty) = schema["type"].as_str() else {
        assert!(
            preserve,
            "{path}: a schema node without a type must preserve unknown fields"
        );
        return;
    };
    let type_ok = match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64(),
        "boolean" => value.is_boolean(),
        other => panic!("{path}: unexpected type {other}"),
    };
    if !type_ok {
        errors.push(error(
            "type",
            path,
            format!("Invalid value: {value}: {path} in body must be of type {ty}"),
        ));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        errors.push(error(
            "enum",
            path,
            format!(
                "Unsupported value: {value}: supported values: {}",
                list.join(", ")
            ),
        ));
    }
    match value {
        Value::String(s) => {
            if let Some(max) = schema["maxLength"].as_u64()
                && s.chars().count() as u64 > max
            {
                errors.push(error(
                    "maxLength",
                    path,
                    format!("Too long: may not be more than {max} bytes"),
                ));
            }
        }
        Value::Number(n) => {
            let n = n.as_f64().unwrap();
            if let Some(max) = schema["maximum"].as_f64()
                && n > max
            {
                errors.push(error(
                    "maximum",
                    path,
                    format!(
                        "Invalid value: {n}: {path} in body should be less than or equal to {max}"
                    ),
                ));
            }
            if let Some(min) = schema["minimum"].as_f64()
                && n < min
            {
                errors.push(error(
                    "minimum",
                    path,
                    format!(
                        "Invalid value: {n}: {path} in body should be greater than or equal to {min}"
                    ),
                ));
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema["maxItems"].as_u64()
                && items.len() as u64 > max
            {
                errors.push(error(
                    "maxItems",
                    path,
                    format!("Too many: {}: must have at most {max} items", items.len()),
                ));
            }
            if schema["x-kubernetes-list-type"] == "set" {
                for (i, item) in items.iter().enumerate() {
                    if items[..i].contains(item) {
                        errors.push(error(
                            "x-kubernetes-list-type",
                            &format!("{path}[{i}]"),
                            format!("Duplicate value: {item}"),
                        ));
                    }
                }
            }
            for (i, item) in items.iter().enumerate() {
                structural(&schema["items"], item, &format!("{path}[{i}]"), errors);
            }
        }
        Value::Object(fields) => {
            if let Some(max) = schema["maxProperties"].as_u64()
                && fields.len() as u64 > max
            {
                errors.push(error(
                    "maxProperties",
                    path,
                    format!("Too many: {}: must have at most {max} items", fields.len()),
                ));
            }
            for required in schema["required"].as_array().into_iter().flatten() {
                let name = required.as_str().unwrap();
                if !fields.contains_key(name) {
                    errors.push(error(
                        "required",
                        &join(path, name),
                        "Required value".into(),
                    ));
                }
            }
            for (name, field) in fields {
                let child = join(path, name);
                if let Some(prop) = schema["properties"].get(name) {
                    structural(prop, field, &child, errors);
                } else if schema["additionalProperties"].is_object() {
                    structural(&schema["additionalProperties"], field, &child, errors);
                } else {
                    let root_field = path.is_empty() && ROOT_FIELDS.contains(&name.as_str());
                    if preserve || root_field {
                        continue;
                    }
                    // Pruned by the API server; rejected by kubectl's default strict field validation.
                    errors.push(error(
                        "unknown",
                        &child,
                        "field not declared in schema".into(),
                    ));
                }
            }
        }
        _ => {}
    }
}

/// Root fields every object has, outside the CRD's schema.
const ROOT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata"];

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

#[derive(Debug, Deserialize)]
struct Cases {
    valid: Vec<Case>,
    invalid: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    set: BTreeMap<String, Value>,
    field: Option<String>,
    message: Option<String>,
    by: Option<String>,
}

impl Case {
    fn object(&self) -> Value {
        let mut object = example();
        for pointer in &self.remove {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let removed = object
                .pointer_mut(parent)
                .and_then(Value::as_object_mut)
                .and_then(|o| o.remove(&key.replace("~1", "/")));
            assert!(
                removed.is_some(),
                "{}: nothing to remove at {pointer}",
                self.name
            );
        }
        for (pointer, value) in &self.set {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let parent = object
                .pointer_mut(parent)
                .and_then(Value::as_object_mut)
                .unwrap_or_else(|| panic!("{}: no object at {pointer}", self.name));
            parent.insert(key.replace("~1", "/"), value.clone());
        }
        object
    }
}

fn cases() -> Cases {
    serde_yaml_ng::from_str(&read("api/tests/data/wasmfilter-cases.yaml")).unwrap()
}

#[test]
fn every_rule_compiles() {
    let compiled = kube::core::cel::compile_schema(&schema());
    let errors: Vec<String> = compiled
        .compilation_errors()
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "CEL rules that do not compile: {errors:#?}"
    );
}

/// The API server checks every schema `default` against its node's schema and CEL rules
/// when the CRD is installed, and refuses the CRD if one fails.
#[test]
fn every_default_passes_its_own_rules() {
    fn walk(schema: &Value, path: &str, failures: &mut Vec<String>) {
        if let Some(default) = schema.get("default") {
            let mut errors = Vec::new();
            structural(schema, default, path, &mut errors);
            if let Err(cel) = kube::core::cel::Validator::new().validate(schema, default, None) {
                errors.extend(cel.iter().map(|e| AdmissionError {
                    field: e.field_path.clone(),
                    message: e.message.clone(),
                    by: "cel".into(),
                }));
            }
            if !errors.is_empty() {
                failures.push(format!("{path}: default {default}: {errors:?}"));
            }
        }
        for (name, prop) in schema["properties"].as_object().into_iter().flatten() {
            walk(prop, &join(path, name), failures);
        }
        if schema["items"].is_object() {
            walk(&schema["items"], &format!("{path}[]"), failures);
        }
    }
    let mut failures = Vec::new();
    walk(&schema(), "", &mut failures);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn valid_wasmfilters_are_admitted_and_convert() {
    let cases = cases();
    assert!(cases.valid.len() >= 10);
    for case in &cases.valid {
        let object = case.object();
        let errors = admit(&object);
        assert!(errors.is_empty(), "{}: rejected: {errors:#?}", case.name);
        let filter: WasmFilter = serde_json::from_value(object)
            .unwrap_or_else(|e| panic!("{}: does not deserialize: {e}", case.name));
        let spec = &filter.spec;
        ModuleLocation::try_from(&spec.module).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        FilterLimits::try_from(&spec.limits).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        spec.label_selector()
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        spec.configuration_bytes()
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        spec.vm_configuration_bytes()
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    }
}

#[test]
fn invalid_wasmfilters_are_rejected_naming_the_field_and_the_fix() {
    let cases = cases();
    assert!(
        cases.invalid.len() >= 20,
        "the issue asks for at least 20 invalid WasmFilters"
    );
    let mut failures = Vec::new();
    for case in &cases.invalid {
        let (Some(field), Some(message), Some(by)) = (&case.field, &case.message, &case.by) else {
            panic!("{}: an invalid case needs field, message and by", case.name);
        };
        let errors = admit(&case.object());
        let as_expected = errors.len() == 1
            && &errors[0].field == field
            && errors[0].message.contains(message.as_str())
            && &errors[0].by == by;
        if !as_expected {
            failures.push(format!(
                "{}: expected exactly one error, {field} ({by}): …{message}…; got {errors:#?}",
                case.name
            ));
        }
        // The message names the field (the API server prefixes the path too, but a message
        // that repeats it survives being quoted alone, e.g. in an Event or a CI log).
        if by == "cel" {
            let last = field.rsplit('.').next().unwrap();
            let last = last.split('[').next().unwrap();
            assert!(
                message.contains(last) || errors.iter().any(|e| e.message.contains(last)),
                "{}: the message does not name {last}",
                case.name
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Every CEL rule of the CRD is exercised by at least one invalid case.
    let rules = cel_messages(&schema());
    let unexercised: Vec<&String> = rules
        .iter()
        .filter(|rule| {
            !cases.invalid.iter().any(|c| {
                let errors = admit(&c.object());
                errors.iter().any(|e| &e.message == *rule)
            })
        })
        .collect();
    assert!(
        unexercised.is_empty(),
        "CEL rules no case exercises: {unexercised:#?}"
    );
}

fn cel_messages(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    match schema {
        Value::Object(map) => {
            for (key, value) in map {
                if key == "x-kubernetes-validations" {
                    for rule in value.as_array().unwrap() {
                        out.push(
                            rule["message"]
                                .as_str()
                                .expect("every rule has a message")
                                .to_string(),
                        );
                    }
                } else {
                    out.extend(cel_messages(value));
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| out.extend(cel_messages(i))),
        _ => {}
    }
    out
}

// ---- (d) the example and the conversions into domain types ------------------------------

#[test]
fn the_example_converts_into_domain_types() {
    let filter: WasmFilter = serde_yaml_ng::from_str(&read("examples/wasmfilter.yaml")).unwrap();
    assert_eq!(filter.metadata.name.as_deref(), Some("header-rewrite"));
    let spec = &filter.spec;

    assert_eq!(Phase::from(spec.phase), Phase::Default);
    assert_eq!(
        FailurePolicy::from(spec.failure_policy),
        FailurePolicy::FailClosed
    );
    assert_eq!(Phase::from(FilterPhase::Authn), Phase::Authn);
    assert_eq!(Phase::from(FilterPhase::Authz), Phase::Authz);
    assert_eq!(Phase::from(FilterPhase::Stats), Phase::Stats);
    assert_eq!(
        FailurePolicy::from(FilterFailurePolicy::FailOpen),
        FailurePolicy::FailOpen
    );

    let m = RequestMatch::from(&spec.matches);
    assert!(m.matches("x.example.com:8443", "/api/v1/users", "GET"));
    assert!(m.matches("api.test", "/api", "POST"));
    assert!(!m.matches("example.com", "/api", "GET"));
    assert!(!m.matches("api.test", "/web", "GET"));
    assert!(!m.matches("api.test", "/api", "DELETE"));

    let selector = spec.label_selector().unwrap();
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert!(selector.matches(&labels(&[("gateway", "public"), ("zone", "a")])));
    assert!(!selector.matches(&labels(&[("gateway", "internal")])));
    assert_eq!(
        WasmFilterSpec {
            selector: None,
            ..spec.clone()
        }
        .label_selector()
        .unwrap(),
        LabelSelector::default(),
        "no selector selects every dataplane"
    );

    assert_eq!(
        FilterLimits::try_from(&spec.limits).unwrap(),
        FilterLimits {
            memory_bytes: 64 << 20,
            callback_timeout: Duration::from_millis(100)
        }
    );
    assert_eq!(
        ModuleLocation::try_from(&spec.module).unwrap(),
        ModuleLocation::Image {
            reference: "localhost:5000/filters/header_rewrite:v1".into(),
            pull_secret: None,
            always_pull: false,
            sha256: None,
        }
    );
    let config: Value = serde_json::from_slice(&spec.configuration_bytes().unwrap()).unwrap();
    assert_eq!(config["response"]["add"]["x-filtered-by"], "wasmfilter");
    assert_eq!(
        spec.vm.env.get("LOG_LEVEL").map(String::as_str),
        Some("info")
    );

    // The chain order the dataplane uses, from CRD values.
    let mut chain = [
        (Phase::from(spec.phase), spec.priority, "header-rewrite"),
        (Phase::from(FilterPhase::Authn), 0, "authn"),
        (Phase::from(FilterPhase::Default), 20, "first-default"),
    ];
    chain.sort_by_key(|(p, pr, n)| chain_order(*p, *pr, n));
    let names: Vec<&str> = chain.iter().map(|c| c.2).collect();
    assert_eq!(names, ["authn", "first-default", "header-rewrite"]);
}

#[test]
fn rust_defaults_equal_the_api_server_defaults() {
    // A WasmFilter with a module only: what the operator reads back from the API server
    // (defaults applied there) equals what serde's defaults give for the same input.
    let minimal = json!({
        "apiVersion": "wasmfilter.dev/v1alpha1",
        "kind": "WasmFilter",
        "metadata": {"name": "m"},
        "spec": {"module": {"image": "ghcr.io/acme/auth:v1"}}
    });
    let defaulted = kube::core::cel::apply_defaults(&schema(), &minimal);
    assert_ne!(defaulted, minimal, "the schema has defaults");
    let from_server: WasmFilter = serde_json::from_value(defaulted).unwrap();
    let from_serde: WasmFilter = serde_json::from_value(minimal).unwrap();
    assert_eq!(from_server, from_serde);
    let spec = from_serde.spec;
    assert_eq!(spec.phase, FilterPhase::Default);
    assert_eq!(spec.priority, 0);
    assert_eq!(spec.failure_policy, FilterFailurePolicy::FailClosed);
    assert_eq!(
        FilterLimits::try_from(&spec.limits).unwrap(),
        FilterLimits::default()
    );
}

#[test]
fn conversions_reject_what_admission_would_have_rejected() {
    let mut spec = serde_json::from_value::<WasmFilter>(example())
        .unwrap()
        .spec;

    let mut both = spec.module.clone();
    both.url = Some("https://example.com/a.wasm".into());
    let err = ModuleLocation::try_from(&both).unwrap_err();
    assert_eq!(err.field, "module");

    let mut url_only = spec.module.clone();
    url_only.image = None;
    url_only.url = Some("https://example.com/a.wasm".into());
    let err = ModuleLocation::try_from(&url_only).unwrap_err();
    assert_eq!(
        err.to_string(),
        "spec.module.sha256: required with module.url"
    );

    spec.limits.memory = "2Gi".into();
    let err = FilterLimits::try_from(&spec.limits).unwrap_err();
    assert_eq!(err.field, "limits.memory");
    spec.limits.memory = "64Mi".into();
    spec.limits.callback_timeout = "0ms".into();
    assert_eq!(
        FilterLimits::try_from(&spec.limits).unwrap_err().field,
        "limits.callbackTimeout"
    );

    // The config cap that CEL cannot express: enforced on the serialized form.
    spec.config = Some(Value::String("x".repeat(MAX_CONFIG_BYTES)));
    assert_eq!(spec.configuration_bytes().unwrap().len(), MAX_CONFIG_BYTES);
    spec.config = Some(json!({"blob": "x".repeat(MAX_CONFIG_BYTES)}));
    let err = spec.configuration_bytes().unwrap_err();
    assert_eq!(err.field, "config");
    assert!(err.to_string().contains("256 KiB"), "{err}");
    spec.config = None;
    assert_eq!(spec.configuration_bytes().unwrap(), Vec::<u8>::new());
}
